"""Compressed transfer on CPU: offloaded layers quantized by the engine hold the same bytes as
transformers' own quantization of a resident layer, and (int8) give the same tokens.

On a GPU the same code runs with CUDA streams; tests/test_gpu.py compares tokens there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import all_layers_on, greedy
from pipeline.budgets import Budgets, GiB
from pipeline.engine import attach_engine
from pipeline.loading import load_model, unload
from pipeline.planning import plan_device_map
from pipeline.presets import resolve_model
from pipeline.quantization import QuantSettings

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def int8_reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """Tokens and layer-1 int8 weights of the tiny model quantized by transformers, all in RAM."""
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path_factory.mktemp("off")),
                        QuantSettings("int8"))
    proj = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(proj, bnb.nn.Linear8bitLt)
    weights = (proj.weight.data.clone(), proj.weight.SCB.clone())
    tokens = greedy(loaded)
    unload(loaded)
    return tokens, weights


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_int8_offloaded_layers_match_resident_int8(tier: str, tiny_llama: Path, tmp_path: Path,
                                                   int8_reference) -> None:
    tokens, (cb, scb) = int8_reference
    loaded = load_model(resolve_model(str(tiny_llama)),
                        Budgets((), GiB if tier == "cpu" else 0, tier == "disk", tmp_path / "off"), engine="accelerate")
    prefix, as_offloaded = all_layers_on(loaded, tier)
    full_bytes = sum(p.numel() * p.element_size() for p in loaded.model.model.layers[1].parameters())
    cache = tmp_path / "quantized"
    cache.mkdir()
    engine = attach_engine(loaded.model, prefix, as_offloaded, torch.device("cpu"), slots=2, tiers=(tier,),
                           quant=QuantSettings("int8"), cache_dir=cache)
    loaded.engine = engine
    proj = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(proj, bnb.nn.Linear8bitLt)
    layer = engine.layers[1]
    assert layer.nbytes < full_bytes / 3  # float32 weights became int8 (plus row scales and norms)
    if tier == "cpu":
        layer.bind(layer.host)
        assert torch.equal(proj.state.CB, cb) and torch.equal(proj.state.SCB, scb)
    else:
        assert sorted(p.name for p in cache.iterdir()) == [f"layer-{i}.int8.safetensors" for i in range(4)]
    assert greedy(loaded) == tokens
    assert greedy(loaded) == tokens  # the cycle wraps into the next reply
    if tier == "disk":
        assert engine.stats.disk_reads > 4 * 12  # read back (quantized) from the cache files on every pass
    unload(loaded)


@pytest.mark.parametrize("mode,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_offloaded_layers_hold_transformers_quantized_bytes(mode: str, double_quant: bool, tiny_llama: Path,
                                                                 tmp_path: Path) -> None:
    settings = QuantSettings(mode, double_quant=double_quant)
    reference = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path / "a"), settings)
    expected = reference.model.model.layers[2].self_attn.q_proj
    assert isinstance(expected, bnb.nn.Linear4bit)

    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path / "b"), engine="accelerate")
    prefix, as_offloaded = all_layers_on(loaded, "cpu")
    engine = attach_engine(loaded.model, prefix, as_offloaded, torch.device("cpu"), slots=2, tiers=("cpu",),
                           quant=settings)
    layer = engine.layers[2]
    layer.bind(layer.host)
    proj = loaded.model.model.layers[2].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.quant_type == mode
    assert torch.equal(proj.weight.data, expected.weight.data)
    got, want = proj.weight.quant_state, expected.weight.quant_state
    assert got.shape == want.shape and got.blocksize == want.blocksize and got.nested == double_quant
    assert torch.equal(got.absmax, want.absmax) and torch.equal(got.code, want.code)
    if double_quant:
        assert torch.equal(got.offset, want.offset) and torch.equal(got.state2.absmax, want.state2.absmax)
    # Everything in the layer's buffer: the norms stay float32, every linear is 4-bit.
    assert torch.equal(loaded.model.model.layers[2].input_layernorm.weight,
                       reference.model.model.layers[2].input_layernorm.weight)
    assert {type(m).__name__ for m in loaded.model.model.layers[2].modules() if "proj" in type(m).__name__.lower()
            or isinstance(m, torch.nn.Linear)} == {"Linear4bit"}
    engine.close()
    unload(loaded)
    unload(reference)


def test_conv1d_layers_are_quantized_transposed_like_transformers(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config

    from conftest import save_checkpoint

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128)
    path = save_checkpoint(config, tmp_path / "gpt2", tok)
    reference = load_model(resolve_model(str(path)), Budgets((), GiB, False, tmp_path / "a"), QuantSettings("int8"))
    tokens = greedy(reference, n=6)
    want = reference.model.transformer.h[1].mlp.c_fc.weight.data.clone()
    unload(reference)
    loaded = load_model(resolve_model(str(path)), Budgets((), GiB, False, tmp_path / "b"), engine="accelerate")
    prefix, as_offloaded = all_layers_on(loaded, "cpu")
    loaded.engine = attach_engine(loaded.model, prefix, as_offloaded, torch.device("cpu"), slots=1, tiers=("cpu",),
                                  quant=QuantSettings("int8"))
    layer = loaded.engine.layers[1]
    layer.bind(layer.host)
    assert torch.equal(loaded.model.transformer.h[1].mlp.c_fc.state.CB, want)  # (out, in), as transformers stores it
    assert greedy(loaded, n=6) == tokens
    unload(loaded)


def test_planner_prices_offloaded_layers_quantized_with_compressed_transfer() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False)
    budgets = Budgets((5_000_000,), 4_000_000, True, Path("/nonexistent"))
    quant = QuantSettings("int8")
    plain = plan_device_map(config, budgets, quant, torch.float16, offload_slots=2)
    packed = plan_device_map(config, budgets, quant, torch.float16, offload_slots=2, compressed_offload=True)
    assert packed.compressed and not plain.compressed
    plain_layer, packed_layer = ({b.device: b.bytes for b in plan.blocks if b.name == "layer 6"}
                                 for plan in (plain, packed))
    assert plain_layer == {"disk": 1_311_744}  # float16 off the GPU without compressed transfer
    assert packed_layer == {"cpu": 656_384}  # int8: 1 byte per weight, the norms in float16
    # Quantized slots leave room for more GPU layers; quantized RAM holds more of the rest.
    assert len(packed.layers_per_device[0]) > len(plain.layers_per_device[0])
    assert len(packed.layers_per_device["cpu"]) > len(plain.layers_per_device["cpu"])
    assert len(packed.layers_per_device["disk"]) < len(plain.layers_per_device["disk"])
    assert packed.bytes_per_device["cpu"] <= budgets.cpu
    assert any("quantized (int8)" in note for note in packed.notes)


def test_engine_layers_reach_transformers_as_indexed_disk_layers(tiny_llama: Path, tmp_path: Path) -> None:
    """With a GPU, layers the engine runs from RAM are mapped to "disk" for transformers: it indexes them in the
    safetensors files instead of holding a 16/32-bit copy in RAM, and the engine reads them from there once."""
    from pipeline.loading import _loader_map, prepare

    preset = resolve_model(str(tiny_llama))
    budgets = Budgets((250_000,), GiB, True, tmp_path)  # a GPU planned for, not used: nothing is loaded
    plan = prepare(preset, budgets, engine="engine").plan
    assert "cpu" in plan.layers_per_device and plan.compute_device == "cuda:0", plan.summary
    prefix = plan.layer_prefix
    assert prefix == "model.layers"
    mapped = _loader_map(plan, True, preset, allow_pickle=False)
    for key, device in plan.device_map.items():
        is_layer = key.startswith(prefix + ".") and key[len(prefix) + 1:].isdigit()
        assert mapped[key] == ("disk" if is_layer and device == "cpu" else device), key
    assert _loader_map(plan, False, preset, allow_pickle=False) == plan.device_map  # accelerate's hooks: as planned
    cpu_plan = prepare(preset, Budgets((), 300_000, True, tmp_path), engine="engine").plan
    assert _loader_map(cpu_plan, True, preset, allow_pickle=False) == cpu_plan.device_map  # the CPU computes
