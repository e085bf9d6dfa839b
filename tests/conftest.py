"""Shared fixtures: tiny random checkpoints built on the spot (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Memory budgets decide which layers live on the GPU, in CPU RAM or on disk.",
    "Hello! How are you today? I am fine, thank you. What is your name?",
] * 20


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def make_tokenizer(directory: Path, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (~300 tokens) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|end|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def tiny_llama_config(vocab_size: int, layers: int = 4, tie: bool = True, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )


def save_checkpoint(config, directory: Path, tokenizer=None, seed: int = 0, dtype=torch.float32) -> Path:
    """Random weights for `config`, saved as safetensors (plus the tokenizer, when given)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger-than-default init so greedy decoding does not collapse onto one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


PROMPT = "In the beginning God created"


def greedy(loaded, n: int = 12) -> list[int]:
    """Exactly `n` greedy tokens after PROMPT from a LoadedModel, on its compute device."""
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]], device=loaded.plan.compute_device)
    with torch.inference_mode():
        out = loaded.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 4-layer Llama with tied embeddings, random weights, float32, and a chat tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    directory = tmp_path_factory.mktemp("tiny-llama")
    return save_checkpoint(tiny_llama_config(len(tokenizer)), directory, tokenizer)


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random model that never emits eos (context 4096): every reply runs to max_new_tokens or until
    stopped, so streams are long and predictable."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llama_config(len(tok), layers=4, hidden=256)
    config.max_position_embeddings = 4096
    path = save_checkpoint(config, tmp_path_factory.mktemp("endless"), tok)
    generation = path / "generation_config.json"
    data = json.loads(generation.read_text())
    data["eos_token_id"] = None
    generation.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    assert (DEMO / "config.json").is_file(), f"the bundled demo model is missing at {DEMO}"
    return DEMO


def all_layers_on(loaded, tier: str) -> tuple[str, dict]:
    """The loaded model's layer prefix and its device map with every decoder layer moved to `tier`
    (tests attach the engine to such a map: the layers run as if the plan had offloaded them)."""
    from pipeline.planning import layer_list

    prefix, layers = layer_list(loaded.model)
    return prefix, {**loaded.plan.device_map, **{f"{prefix}.{i}": tier for i in range(len(layers))}}
