"""Offloaded decoding speed: all-resident vs accelerate's hooks vs the offload engine, in one run.

Builds random-weight checkpoints of real architectures from their published sizes (decode speed
does not depend on weight values), then loads each configuration through the product's own
`load_model` and measures, per configuration: decode ms/token, time to first token with a
512-token prompt, GPU peak memory, bytes over the host->GPU link per token, the effective GB/s
and its share of the pinned-memory bandwidth measured at the start of the same run, beside the
speed `pipeline.speed` predicted for the same plan before loading it.

Usage (on a CUDA machine):
    python bench/offload.py --models bloom-3b --tokens 8 --out bench/results-DATE-MACHINE.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.budgets import GiB, Budgets  # noqa: E402
from pipeline.loading import load_model, prepare, unload  # noqa: E402
from pipeline.presets import Preset  # noqa: E402
from pipeline.quantization import QuantSettings  # noqa: E402

SHAPES = {
    # Published sizes; vocab as released.
    "bloom-3b": dict(model_type="bloom", hidden_size=2560, n_layer=30, n_head=32, vocab_size=250880),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


@dataclass
class Row:
    model: str
    config: str
    quant: str
    tier: str
    offload: str
    summary: str
    decode_ms_per_token: float
    ttft_512_ms: float
    gpu_peak_gib: float
    link_bytes_per_token: int
    effective_gbps: float
    pct_of_pinned: float
    predicted_ms_per_token: float = 0.0  # pipeline.speed's prediction for this plan, made before loading
    predicted_ttft_512_ms: float = 0.0
    predicted_bottleneck: str = ""


def build_checkpoint(name: str, root: Path) -> Path:
    from transformers import AutoConfig

    path = root / name
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    shape = dict(SHAPES[name])
    return save_random(AutoConfig.for_model(shape.pop("model_type"), **shape), path)


def save_random(config, path: Path) -> Path:
    """A float16 checkpoint of `config` with random weights (made on the GPU), and the demo tokenizer."""
    from transformers import AutoModelForCausalLM

    config.dtype = torch.float16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    # load_model needs a tokenizer; the benchmark feeds token ids directly, so any one will do.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "models" / "demo").save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def pinned_bandwidth(nbytes: int = 2 * GiB) -> float:
    """GB/s of one large pinned host -> GPU copy (best of 5)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del host, dev
    return nbytes / best / 1e9


def timed_generate(loaded, prompt_len: int, new_tokens: int) -> float:
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(100, min(vocab, 20000), (1, prompt_len), generator=torch.Generator().manual_seed(0)).cuda()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def disk_budget(preset: Preset, gpu: int, quant: QuantSettings, engine: str, disk_layers: int) -> int:
    """The CPU budget that leaves exactly `disk_layers` blocks on disk (or the closest above)."""
    lo, hi = 0, 64 * GiB
    for _ in range(40):
        mid = (lo + hi) // 2
        plan = prepare(preset, Budgets((gpu,), mid, True, Path("/tmp/bench-offload")), quant, engine).plan
        on_disk = len(plan.layers_per_device.get("disk", ()))
        if on_disk > disk_layers:
            lo = mid + 1
        else:
            hi = mid
    return hi


def measure(model: str, path: Path, name: str, quant: str, tier: str, offload: str, gpu_gib: float, tokens: int,
            pinned_gbps: float, disk_layers: int) -> Row:
    preset = Preset(name=model, source=str(path), dtype="float16")
    settings = QuantSettings(quant)
    gpu = int(gpu_gib * GiB) if tier != "resident" else 70 * GiB
    engine = "engine" if offload == "engine" else "accelerate"
    cpu = 100 * GiB
    if tier == "disk":
        cpu = disk_budget(preset, gpu, settings, engine, disk_layers)
    budgets = Budgets((gpu,), cpu, tier == "disk", Path("/tmp/bench-offload"))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prepared = prepare(preset, budgets, settings, engine)
    predicted = prepared.estimate
    loaded = load_model(preset, budgets, settings, engine=engine, prepared=prepared)
    try:
        timed_generate(loaded, 16, 2)  # warm-up: kernels, allocator, the disk page cache
        ttft = timed_generate(loaded, 512, 1)
        engine_obj = loaded.engine
        copied = engine_obj.stats.bytes_copied if engine_obj else 0
        short = timed_generate(loaded, 16, 1)
        long = timed_generate(loaded, 16, tokens + 1)
        per_token = (long - short) / tokens
        peak = torch.cuda.max_memory_allocated() / GiB
        offloaded = sum(b for d, b in loaded.plan.bytes_per_device.items() if d in ("cpu", "disk"))
        if engine_obj:
            # Copies during the short and long runs: (tokens + 2) forwards; per forward:
            link = (engine_obj.stats.bytes_copied - copied) // (tokens + 2)
        else:
            link = offloaded  # accelerate moves every offloaded weight on every forward
        gbps = link / per_token / 1e9 if per_token > 0 else 0.0
        return Row(model, name, quant, tier, offload, loaded.plan.summary, round(per_token * 1000, 1),
                   round(ttft * 1000, 1), round(peak, 2), int(link), round(gbps, 1),
                   round(100 * gbps / pinned_gbps, 1),
                   round(1000 / predicted.decode_tokens_per_s, 1) if predicted else 0.0,
                   round(predicted.time_to_first_token_s * 1000, 1) if predicted else 0.0,
                   predicted.bottleneck if predicted else "")
    finally:
        unload(loaded)


CONFIGS = [
    # name, quantization, tier, offload
    ("fp16 resident", "none", "resident", "none"),
    ("fp16 cpu accelerate", "none", "cpu", "accelerate"),
    ("fp16 cpu engine", "none", "cpu", "engine"),
    ("fp16 disk accelerate", "none", "disk", "accelerate"),
    ("fp16 disk engine", "none", "disk", "engine"),
    ("int8 resident", "int8", "resident", "none"),
    ("int8 cpu accelerate", "int8", "cpu", "accelerate"),
    ("int8 cpu engine", "int8", "cpu", "engine"),
    ("int8 disk accelerate", "int8", "disk", "accelerate"),
    ("int8 disk engine", "int8", "disk", "engine"),
    ("nf4 resident", "nf4", "resident", "none"),
    ("nf4 cpu accelerate", "nf4", "cpu", "accelerate"),
    ("nf4 cpu engine", "nf4", "cpu", "engine"),
    ("nf4 disk accelerate", "nf4", "disk", "accelerate"),
    ("nf4 disk engine", "nf4", "disk", "engine"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bloom-3b"], choices=sorted(SHAPES))
    parser.add_argument("--configs", nargs="*", default=None, help="subset of config names (default: all)")
    parser.add_argument("--gpu-budget", type=float, default=2.0, help="GiB for the offloaded configurations")
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens timed per configuration")
    parser.add_argument("--disk-layers", type=int, default=15, help="blocks on disk in the disk-tier rows")
    parser.add_argument("--root", default="/tmp/bench-ckpt")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from pipeline.speed import machine_speeds

    speeds = machine_speeds("/tmp/bench-offload")  # measured before any model is loaded; used by prepare()
    print(f"# speeds: {speeds.to_dict()}", flush=True)
    pinned = pinned_bandwidth()
    print(f"# {torch.cuda.get_device_name(0)} · pinned host->GPU {pinned:.1f} GB/s · torch {torch.__version__}",
          flush=True)
    rows = []
    for model in args.models:
        path = build_checkpoint(model, Path(args.root))
        for name, quant, tier, offload in CONFIGS:
            if args.configs and name not in args.configs:
                continue
            try:
                row = measure(model, path, name, quant, tier, offload, args.gpu_budget, args.tokens, pinned,
                              args.disk_layers)
            except Exception as exc:  # noqa: BLE001 - a benchmark row that fails is reported, not fatal
                print(f"{model:10} {name:22} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            rows.append(row)
            print(f"{model:10} {name:22} {row.decode_ms_per_token:8.1f} ms/tok  ttft512 {row.ttft_512_ms:8.1f} ms  "
                  f"peak {row.gpu_peak_gib:5.2f} GiB  link {row.link_bytes_per_token / 1e9:5.2f} GB/tok  "
                  f"{row.effective_gbps:5.1f} GB/s ({row.pct_of_pinned:4.1f} %)  | predicted "
                  f"{row.predicted_ms_per_token:7.1f} ms/tok ({row.predicted_ms_per_token / row.decode_ms_per_token:4.2f}x) "
                  f"ttft {row.predicted_ttft_512_ms:7.1f} ms [{row.predicted_bottleneck}] | {row.summary}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"pinned_gbps": pinned, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
