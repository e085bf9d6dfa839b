"""MoE decoding with offloaded layers: routed experts through a GPU cache vs whole-layer streaming vs
accelerate's hooks, in one run.

Random weights with the published per-layer shapes of Mixtral-8x7B and Qwen3-30B-A3B (decode speed does
not depend on weight values, but routing does: random routers spread tokens evenly over the experts,
so the cache hit rates here are a pessimistic case). The GPU machine's 64 GiB disk cannot hold a full
16-bit checkpoint (Mixtral-8x7B: 93 GB), so the checkpoints keep `--layers` of the decoder layers and
the GPU budgets are scaled by layers/total (16 GiB for 32 layers -> 4 GiB for 8). Every configuration
loads through the product's `load_model` with nf4 and measures decode ms/token (after a 16-token
prompt), bytes over the host->GPU link per token (the engine's and the expert cache's counters;
accelerate's: the offloaded layers' bytes, which its hooks move whole for every token), and the expert
cache hit rate.

Usage (on a CUDA machine):
    python bench/moe.py --out bench/results-DATE-MACHINE-moe.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.offload import save_random, timed_generate  # noqa: E402
from pipeline.budgets import GiB, Budgets  # noqa: E402
from pipeline.loading import load_model, prepare, unload  # noqa: E402
from pipeline.presets import Preset  # noqa: E402
from pipeline.quantization import QuantSettings  # noqa: E402

SHAPES = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
}
CONFIGS = {  # name: (offload, expert route)
    "routed experts (engine + GPU expert cache)": ("engine", "gpu"),
    "routed experts (engine, route measured at load)": ("engine", "auto"),
    "routed experts (engine + CPU compute)": ("engine", "cpu"),
    "whole-layer streaming (engine)": ("engine", "whole"),
    "accelerate's hooks (whole layers)": ("accelerate", "whole"),
}


@dataclass
class Row:
    model: str
    layers: int
    full_layers: int
    gpu_budget_gib: float  # the budget used (scaled); the full-depth budget it stands for is below
    stands_for_gib: float
    config: str
    summary: str
    decode_ms_per_token: float
    link_bytes_per_token: int
    expert_cache_hit_rate: float | None
    expert_cache_slots: int
    route_chosen: str
    gpu_ms_per_expert: float | None
    cpu_ms_per_expert: float | None


def build_checkpoint(name: str, layers: int, root: Path) -> Path:
    from transformers import AutoConfig

    path = root / f"{name}-{layers}l"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    shape = dict(SHAPES[name])
    return save_random(AutoConfig.for_model(shape.pop("model_type"), **{**shape, "num_hidden_layers": layers}), path)


def link_bytes(loaded) -> int:
    total = loaded.engine.stats.bytes_copied if loaded.engine is not None else 0
    moe = loaded.moe
    if moe is not None and moe.cache is not None:
        total += moe.cache.stats.bytes_copied
    return total


def accelerate_bytes_per_token(loaded) -> int:
    """What accelerate's hooks move per token: every offloaded module's weights, once per forward."""
    plan = loaded.plan
    offloaded = [k for k, d in plan.device_map.items() if d in ("cpu", "disk")]
    total = 0
    for name in offloaded:
        module = loaded.model.get_submodule(name)
        for sub in module.modules():
            hook = getattr(sub, "_hf_hook", None)
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            for pname, _ in sub.named_parameters(recurse=False):
                try:
                    value = weights[pname]
                except KeyError:
                    continue
                total += value.numel() * value.element_size()
    return total


def measure(model: str, path: Path, layers: int, gpu_gib: float, stands_for: float, config: str,
            tokens: int) -> Row:
    offload, route = CONFIGS[config]
    preset = Preset(name=model, source=str(path), dtype="float16")
    quant = QuantSettings("nf4")
    budgets = Budgets((int(gpu_gib * GiB),), 100 * GiB, False, Path("/tmp/bench-moe"))
    gc.collect()
    torch.cuda.empty_cache()
    prepared = prepare(preset, budgets, quant, offload)
    loaded = load_model(preset, budgets, quant, engine=offload, prepared=prepared, expert_route=route)
    try:
        # Warm-up over every sequence length the measured run uses: SDPA's cuDNN backend builds a plan per new
        # shape (3-10 ms each, host-blocking); a shorter warm-up billed that to whichever config ran first.
        timed_generate(loaded, 16, tokens + 1)
        short = timed_generate(loaded, 16, 1)
        before = link_bytes(loaded)
        cache = loaded.moe.cache if loaded.moe else None
        hits0, misses0 = (cache.stats.hits, cache.stats.misses) if cache else (0, 0)
        long = timed_generate(loaded, 16, tokens + 1)
        after = link_bytes(loaded)
        per_token = (long - short) / tokens
        if offload == "accelerate":
            moved = accelerate_bytes_per_token(loaded)
        else:
            # The long run's bytes include one prefill and its first token (as the short run): take the
            # short run's share out by measuring it again.
            mid = link_bytes(loaded)
            timed_generate(loaded, 16, 1)
            prefill = link_bytes(loaded) - mid
            moved = max(0, (after - before) - prefill) // tokens
        hit_rate = None
        if cache:
            hits, misses = cache.stats.hits - hits0, cache.stats.misses - misses0
            hit_rate = hits / max(1, hits + misses)
        moe = loaded.moe
        return Row(model, layers, SHAPES[model]["num_hidden_layers"], gpu_gib, stands_for, config,
                   loaded.plan.summary, round(per_token * 1000, 1), int(moved),
                   None if hit_rate is None else round(hit_rate, 3), cache.slots if cache else 0,
                   moe.route if moe else "", moe.gpu_ms if moe else None, moe.cpu_ms if moe else None)
    finally:
        unload(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12], help="decoder layers kept, per model")
    parser.add_argument("--budgets", type=float, nargs="+", default=[16, 24], help="full-depth GPU budgets, GiB")
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if "GPU expert cache" not in c and "CPU" not in c],
                        choices=list(CONFIGS), help="default: the product's measured route (it measures GPU fetch "
                        "against CPU compute per expert) and the two whole-layer baselines")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--root", default="/tmp/bench-moe-models")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for model, layers in zip(args.models, args.layers * len(args.models)):
        path = build_checkpoint(model, layers, Path(args.root))
        full = SHAPES[model]["num_hidden_layers"]
        for budget in args.budgets:
            scaled = round(budget * layers / full, 2)
            for config in args.configs:
                try:
                    row = measure(model, path, layers, scaled, budget, config, args.tokens)
                except Exception as exc:  # noqa: BLE001 - record and go on with the next configuration
                    print(json.dumps({"model": model, "config": config, "error": f"{type(exc).__name__}: {exc}"}),
                          flush=True)
                    continue
                rows.append(asdict(row))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
