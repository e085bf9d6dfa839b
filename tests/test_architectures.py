"""Any causal LM, any split: tiny random models of many architectures, built from configs.

For each: the planner finds its layers; a CPU+disk split and an all-disk load give the same greedy
tokens as the model loaded on the CPU alone; 8-bit and 4-bit loads quantize and generate.
Quantization with disk offload on a machine without a GPU is refused before loading.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import greedy, save_checkpoint
from pipeline.budgets import Budgets, GiB
from pipeline.errors import DoesNotFitError
from pipeline.loading import load_model, prepare, unload
from pipeline.presets import resolve_model
from pipeline.quantization import QuantSettings

ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
ARCHITECTURES = {
    "llama": ATTN,
    "mistral": {**ATTN, "sliding_window": 64},
    "qwen2": ATTN,
    "gemma2": {**ATTN, "head_dim": 16, "sliding_window": 64},
    "phi3": {**ATTN, "pad_token_id": 0},
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=256),
    # a bool causal-mask buffer held by `transformer` itself: priced at its real size, kept in memory when split
    "gpt_bigcode": dict(n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256),
    "bloom": dict(hidden_size=64, n_layer=4, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, new_decoder_architecture=False,
                   multi_query=True),
    "mixtral": {**ATTN, "num_local_experts": 4, "num_experts_per_tok": 2},  # mixture of experts
    "qwen2_moe": {**ATTN, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2},  # mixture of experts with a shared expert and its 1-wide gate
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("archs")
    return {
        arch: save_checkpoint(AutoConfig.for_model(arch, vocab_size=len(tok), **kwargs), root / arch, tok)
        for arch, kwargs in ARCHITECTURES.items()
    }


def next_token_logits(loaded) -> "torch.Tensor":
    from conftest import PROMPT

    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        return loaded.model(input_ids=ids).logits[0, -1].float()


def budgets(tmp_path: Path, cpu: int, disk: bool = True) -> Budgets:
    return Budgets(gpu=(), cpu=cpu, disk=disk, offload_dir=tmp_path / "offload")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_splits_generate_the_same_tokens(arch: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    preset = resolve_model(str(checkpoints[arch]))
    whole = load_model(preset, budgets(tmp_path, GiB, disk=False))
    assert sorted(whole.plan.layers_per_device["cpu"]) == [0, 1, 2, 3]  # the layer list was found
    expected, total = greedy(whole, n=8), whole.plan.total_bytes
    unload(whole)
    for cpu in (int(total * 0.7), 0):  # some layers on disk, then every layer on disk
        split = load_model(preset, budgets(tmp_path, cpu))
        assert "disk" in split.plan.layers_per_device, split.plan.summary
        assert greedy(split, n=8) == expected, f"{arch}: {split.plan.summary}"
        unload(split)


# Falcon's layers are FalconLinear, an nn.Linear subclass that transformers' bitsandbytes integration
# does not convert: quantizing it would silently change nothing, so the planner refuses it.
QUANTIZABLE = [arch for arch in ARCHITECTURES if arch != "falcon"]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("arch", QUANTIZABLE)
def test_quantized_loads_generate(arch: str, mode: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb

    loaded = load_model(resolve_model(str(checkpoints[arch])), budgets(tmp_path, GiB, disk=False), QuantSettings(mode))
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert any(isinstance(m, kind) for m in loaded.model.modules()), f"{arch}: nothing was quantized"
    tokens = greedy(loaded, n=8)
    assert greedy(loaded, n=8) == tokens  # deterministic
    # The quantized model still computes this model: its next-token logits follow the full-precision ones
    # (unrelated logits score about 0). Measured on these random models (weights N(0, 0.2), which
    # amplify rounding through the layers): int8 0.994-1.000; nf4 0.67-0.98.
    full = load_model(resolve_model(str(checkpoints[arch])), budgets(tmp_path, GiB, disk=False))
    quantized_logits, full_logits = next_token_logits(loaded), next_token_logits(full)
    unload(full)
    similarity = torch.nn.functional.cosine_similarity(quantized_logits, full_logits, dim=0)
    assert similarity > (0.9 if mode == "int8" else 0.5), f"{arch} {mode}: logits cosine similarity {similarity:.3f}"
    unload(loaded)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_quantized_with_disk_and_no_gpu_is_refused_before_loading(arch: str, checkpoints: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    with pytest.raises(DoesNotFitError, match="without a GPU, quantized weights cannot be offloaded to disk"):
        prepare(resolve_model(str(checkpoints[arch])), budgets(tmp_path, 10_000), QuantSettings("int8"))


def test_cpu_4bit_keeps_narrow_gates_unquantized(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    plan = prepare(resolve_model(str(checkpoints["qwen2_moe"])), budgets(tmp_path, GiB, False),
                   QuantSettings("nf4")).plan
    assert any(m.endswith("shared_expert_gate") for m in plan.skip_modules)
    assert any("kept unquantized" in n for n in plan.notes)


def test_quantization_that_changes_nothing_is_refused_before_loading(checkpoints: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="would change nothing.*model type 'falcon'.*FalconLinear"):
        prepare(resolve_model(str(checkpoints["falcon"])), budgets(tmp_path, GiB, False), QuantSettings("int8"))
