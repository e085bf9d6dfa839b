"""Where the offload engine's time per token goes: copies, its own Python work, or the model's.

Loads one configuration with the engine and times decoding four ways, in one run:
  engine          as shipped;
  no copies       the copy stream does nothing (slots keep stale bytes: the tokens are wrong, the
                  kernels' cost is the same), so what remains is compute plus the engine's CPU work;
  hooks timed     as shipped, with the CPU time spent inside the engine's hooks summed;
and the same model fully resident (more GPU budget) for reference.

Usage (on a CUDA machine):
    python bench/engine_overhead.py --model bloom-3b --quant nf4 --tokens 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload import SHAPES, build_checkpoint, timed_generate  # noqa: E402

from pipeline.budgets import Budgets, GiB  # noqa: E402
from pipeline.loading import load_model, unload  # noqa: E402
from pipeline.presets import Preset  # noqa: E402
from pipeline.quantization import QuantSettings  # noqa: E402


def decode_ms(loaded, tokens: int) -> float:
    timed_generate(loaded, 16, 2)
    short = timed_generate(loaded, 16, 1)
    long = timed_generate(loaded, 16, tokens + 1)
    return (long - short) / tokens * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bloom-3b", choices=sorted(SHAPES))
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--gpu-budget", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--root", default="/tmp/bench-ckpt")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = build_checkpoint(args.model, Path(args.root))
    preset = Preset(name=args.model, source=str(path), dtype="float16")
    quant = QuantSettings(args.quant)

    resident = load_model(preset, Budgets((70 * GiB,), 100 * GiB, False, Path("/tmp/bench-offload")), quant)
    print(f"resident                {decode_ms(resident, args.tokens):7.1f} ms/token", flush=True)
    unload(resident)

    loaded = load_model(preset, Budgets((int(args.gpu_budget * GiB),), 100 * GiB, False, Path("/tmp/bench-offload")),
                        quant, engine="engine")
    engine = loaded.engine
    layers = len(engine.layers)
    print(f"# {loaded.plan.summary} · {layers} offloaded layers, {engine.layers[0].nbytes / 1e6:.1f} MB each",
          flush=True)
    print(f"engine                  {decode_ms(loaded, args.tokens):7.1f} ms/token", flush=True)

    spent = [0.0]
    before, after = engine._before, engine._after

    def timed(hook):
        def run(*a):
            t = time.perf_counter()
            hook(*a)
            spent[0] += time.perf_counter() - t
        return run

    for handle in engine.handles:
        handle.remove()
    engine.handles = []
    for layer in engine.layers:
        engine.handles.append(layer.module.register_forward_pre_hook(timed(before)))
        engine.handles.append(layer.module.register_forward_hook(timed(after)))
    timed_generate(loaded, 16, 2)
    spent[0] = 0.0
    total = decode_ms(loaded, args.tokens)
    forwards = args.tokens + 4  # decode_ms runs warm-up (2), short (1) and long (tokens + 1) forwards
    hook_ms = spent[0] * 1000 / forwards
    print(f"engine, hooks timed     {total:7.1f} ms/token · hooks {hook_ms:5.2f} ms/token "
          f"({hook_ms * 1000 / layers:5.0f} us per layer)", flush=True)

    ops = engine.ops
    copy = ops.copy

    def no_copy(dst, src, after_event, done):
        if after_event is not None:
            ops.stream.wait_event(after_event)
        done.record(ops.stream)

    ops.copy = no_copy
    print(f"engine, no copies       {decode_ms(loaded, args.tokens):7.1f} ms/token", flush=True)
    ops.copy = copy
    unload(loaded)


if __name__ == "__main__":
    main()
