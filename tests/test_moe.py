"""Mixture-of-experts models: experts quantized per expert, placed where the plan says, fetched per route.

Tiny random mixtral, qwen2_moe (shared expert) and qwen3_moe models on the CPU: the experts module is
pipeline.moe's, reading the checkpoint expert by expert; 16-bit experts give the tokens of the plain
transformers model on one device, split over RAM and disk too; quantized experts give the tokens of
transformers' own experts module holding the same weights dequantized (the reference); the expert cache
fetches exactly the routed experts. Plans of the published Mixtral-8x7B and Qwen3-30B-A3B shapes price
the experts quantized. GPU routes (cache, CPU compute, whole layers) are in tests/test_gpu.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import PROMPT, save_checkpoint
from pipeline.budgets import Budgets, GiB
from pipeline.loading import load_model, unload
from pipeline.moe import ExpertCache, RoutedExperts, expert_bytes, set_up_routing
from pipeline.presets import resolve_model
from pipeline.quantization import QuantSettings

ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "mixtral": {**ATTN, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**ATTN, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2},
    "qwen3_moe": {**ATTN, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("moe")
    return {arch: save_checkpoint(AutoConfig.for_model(arch, vocab_size=len(tok), **kw), root / arch, tok)
            for arch, kw in MOE.items()}


def tokens(model, tokenizer, n: int = 10) -> list[int]:
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def experts_of(model) -> list[RoutedExperts]:
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def cpu_budgets(tmp_path: Path, cpu: int, disk: bool = False) -> Budgets:
    return Budgets(gpu=(), cpu=cpu, disk=disk, offload_dir=tmp_path / "offload")


@pytest.mark.parametrize("arch", MOE)
def test_16bit_experts_read_per_expert_give_the_single_device_tokens(arch: str, moe_checkpoints, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = moe_checkpoints[arch]
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # transformers' own experts
    assert not experts_of(plain)
    expected = tokens(plain, AutoTokenizer.from_pretrained(folder))
    preset = resolve_model(str(folder))
    whole = load_model(preset, cpu_budgets(tmp_path, GiB))
    modules = experts_of(whole.model)
    assert len(modules) == 4 and {m.home for m in modules} == {"cpu"} and whole.plan.experts == "none"
    assert not any("experts" in name for name, _ in whole.model.named_parameters())  # transformers loaded none
    assert tokens(whole.model, whole.tokenizer) == expected
    total = whole.plan.total_bytes
    unload(whole)

    split = load_model(preset, cpu_budgets(tmp_path, int(total * 0.6), disk=True))  # later layers on disk
    on_disk = [m for m in experts_of(split.model) if m.home == "disk"]
    assert on_disk, split.plan.summary
    files = sorted(p.name for p in split.offload_dir.glob("experts-*.none.bin"))
    assert files == sorted(f"experts-{m.layer}.none.bin" for m in on_disk)
    assert tokens(split.model, split.tokenizer) == expected, split.plan.summary
    offload_dir = split.offload_dir
    unload(split)
    assert not offload_dir.exists()  # the experts' files go with the model


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("arch", MOE)
def test_quantized_experts_match_the_dequantized_reference(arch: str, mode: str, moe_checkpoints, tmp_path: Path) -> None:
    """Tokens equal transformers' experts module holding the same weights dequantized (computing in the
    model's dtype); on the CPU both dequantize then multiply, so the tolerance is exact tokens and
    next-token logits within 1e-4."""
    from safetensors.torch import load_file

    folder = moe_checkpoints[arch]
    loaded = load_model(resolve_model(str(folder)), cpu_budgets(tmp_path, GiB), QuantSettings(mode=mode))
    modules = experts_of(loaded.model)
    assert loaded.plan.experts == mode and len(modules) == 4
    module = modules[0]
    per_expert = expert_bytes(mode, module.intermediate_dim, module.hidden_dim, torch.float32)
    assert module.rows.shape == (module.num_experts, per_expert)
    sixteen_bit = 3 * module.intermediate_dim * module.hidden_dim * 2
    assert per_expert < sixteen_bit * (0.6 if mode == "int8" else 0.32)  # really stored quantized

    # The dequantized weights are the checkpoint's, within the format's error.
    state = load_file(str(folder / "model.safetensors"))
    reference = module.dequantized()
    original = next(v for k, v in state.items() if re.search(r"layers\.0\..*experts\.1\.(w2|down_proj)\.", k))
    error = (reference.down_proj[1] - original).norm() / original.norm()
    assert error < (0.15 if mode == "nf4" else 0.02), error

    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0, -1]
    got = tokens(loaded.model, loaded.tokenizer)
    for name, m in list(loaded.model.named_modules()):  # swap in the reference: transformers' module, dequantized
        if isinstance(m, RoutedExperts):
            parent, attribute = name.rsplit(".", 1)
            setattr(loaded.model.get_submodule(parent), attribute, m.dequantized())
    assert not experts_of(loaded.model)
    with torch.inference_mode():
        ref_logits = loaded.model(input_ids=ids).logits[0, -1]
    assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max()
    assert got == tokens(loaded.model, loaded.tokenizer)
    unload(loaded)


@pytest.mark.parametrize("slots", [2, 64])
def test_the_expert_cache_fetches_exactly_the_routed_experts(slots: int, moe_checkpoints, tmp_path: Path) -> None:
    """Route every layer's experts through a cache of `slots` (2: evictions all the time; 64: all fit).
    Same tokens; one decode step fetches top_k experts per layer; bytes counted are whole experts."""
    folder = moe_checkpoints["qwen3_moe"]
    loaded = load_model(resolve_model(str(folder)), cpu_budgets(tmp_path, GiB))
    expected = tokens(loaded.model, loaded.tokenizer)
    modules = experts_of(loaded.model)
    slot = modules[0].layout.nbytes
    cache = ExpertCache(torch.device("cpu"), slot, slots)
    for m in modules:
        m.cache, m.route = cache, "gpu"
    assert tokens(loaded.model, loaded.tokenizer) == expected
    stats = cache.stats
    assert stats.misses > 0 and stats.bytes_copied == stats.misses * slot
    assert (stats.hits > 0) == (slots == 64)  # a 2-slot cache never keeps 2 experts for the next step
    before = stats.hits + stats.misses
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[5]]))  # one token: top_k distinct experts in each of 4 layers
    assert stats.hits + stats.misses - before == 4 * 2
    unload(loaded)


def test_bad_route_names_the_value(moe_checkpoints, tmp_path: Path) -> None:
    loaded = load_model(resolve_model(str(moe_checkpoints["mixtral"])), cpu_budgets(tmp_path, GiB))
    with pytest.raises(ValueError, match=r"'sideways'.*accepted: \['auto', 'gpu', 'cpu', 'whole'\]"):
        set_up_routing(experts_of(loaded.model), "none", torch.device("cpu"), 0, "sideways")
    assert len(tokens(loaded.model, loaded.tokenizer, 3)) == 3  # still usable
    unload(loaded)


PUBLISHED = {
    # name: (model type, config sizes, nf4 target in GiB)
    "Mixtral-8x7B": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2), 26),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                                        tie_word_embeddings=False), 17.5),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_moe_shapes_plan_with_quantized_experts(name: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from pipeline.planning import plan_device_map

    model_type, sizes, target = PUBLISHED[name]
    config = AutoConfig.for_model(model_type, **sizes)
    budgets = Budgets(gpu=(16 * GiB,), cpu=512 * GiB, disk=False, offload_dir=tmp_path)
    plain = plan_device_map(config, budgets, QuantSettings(), torch.float16, model_name=name, offload_slots=2)
    nf4 = plan_device_map(config, budgets, QuantSettings(mode="nf4"), torch.float16, model_name=name,
                          offload_slots=2, compressed_offload=True)
    assert nf4.experts == "nf4" and plain.experts == "none"
    assert nf4.total_bytes <= target * GiB, nf4.summary
    assert nf4.total_bytes < 0.32 * plain.total_bytes  # the experts (most of the model) are priced at 4-bit
    note = next(n for n in nf4.notes if n.startswith("MoE:"))
    assert "quantized nf4" in note and "kept 16-bit" in note and "embed_tokens" in note
    # The GPU budget holds resident layers, the engine's slots and the expert cache, and no more.
    assert 0 < nf4.expert_cache_bytes and nf4.bytes_per_device[0] + nf4.expert_cache_bytes <= 16 * GiB
    assert {0, "cpu"} <= set(nf4.layers_per_device)
    assert nf4.to_dict()["expert_cache_bytes"] == nf4.expert_cache_bytes


def test_the_stats_line_shows_the_expert_cache_hit_rate(moe_checkpoints, tmp_path: Path) -> None:
    """With offloaded experts going through the cache, each reply's stats line says how the cache did
    during it (as the app shows it under the reply)."""
    from pipeline.chat import chat
    from pipeline.moe import MoeInfo
    from pipeline.params import GenerationParams

    loaded = load_model(resolve_model(str(moe_checkpoints["qwen3_moe"])), cpu_budgets(tmp_path, GiB))
    modules = experts_of(loaded.model)
    assert chat(loaded, [{"role": "user", "content": "Hello there"}], GenerationParams(max_new_tokens=4)).stats.experts == ""
    cache = ExpertCache(torch.device("cpu"), modules[0].layout.nbytes, 64)
    for m in modules:
        m.cache, m.route = cache, "gpu"
    loaded.moe = MoeInfo(mode="none", route="gpu", cache=cache, stats=cache.stats, modules=modules)
    before = (cache.stats.hits, cache.stats.misses)
    reply = chat(loaded, [{"role": "user", "content": "Hello there"}], GenerationParams(max_new_tokens=6, temperature=0))
    hits, misses = cache.stats.hits - before[0], cache.stats.misses - before[1]
    assert misses > 0 and hits > 0
    assert f"expert cache {hits / (hits + misses):.0%} hits ({hits + misses} routed experts)" in reply.stats.describe()
    unload(loaded)


def test_the_speed_estimate_counts_only_routed_experts(tmp_path: Path) -> None:
    """A token reads and moves top_k of a MoE layer's experts: the predicted bytes per token over the
    link are the offloaded layers' other weights plus that share of their experts."""
    from dataclasses import replace

    from transformers import AutoConfig

    from pipeline.planning import plan_device_map
    from pipeline.speed import ASSUMED, estimate

    model_type, sizes, _ = PUBLISHED["Mixtral-8x7B"]
    budgets = Budgets(gpu=(16 * GiB,), cpu=512 * GiB, disk=False, offload_dir=tmp_path)
    plan = plan_device_map(AutoConfig.for_model(model_type, **sizes), budgets, QuantSettings(mode="nf4"),
                           torch.float16, offload_slots=2, compressed_offload=True)
    assert plan.routed_fraction == 2 / 8
    offloaded, experts = plan.bytes_per_device["cpu"], plan.expert_bytes["cpu"]
    assert 0.9 * offloaded < experts < offloaded  # nearly all of an offloaded Mixtral layer is experts
    routed = estimate(plan, ASSUMED, engine=True)
    assert routed.link_bytes_per_token == offloaded - int(experts * 0.75)
    whole = estimate(replace(plan, routed_fraction=1.0), ASSUMED, engine=True)
    assert whole.link_bytes_per_token == offloaded and routed.decode_tokens_per_s > 2.5 * whole.decode_tokens_per_s


def test_a_checkpoint_with_fused_experts_is_read_per_expert(moe_checkpoints, tmp_path: Path) -> None:
    """A checkpoint saved with transformers 5's fused 3-D expert tensors (not per-expert matrices) is
    read one expert slice at a time and gives the same tokens."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(moe_checkpoints["mixtral"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(moe_checkpoints["mixtral"])
    fused = tmp_path / "fused"
    plain.config.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    assert any(k.endswith(".experts.gate_up_proj") and v.ndim == 3 for k, v in state.items())
    save_file(state, str(fused / "model.safetensors"))
    loaded = load_model(resolve_model(str(fused)), cpu_budgets(tmp_path, GiB))
    assert len(experts_of(loaded.model)) == 4
    assert tokens(loaded.model, loaded.tokenizer) == tokens(plain, tokenizer)
    unload(loaded)
