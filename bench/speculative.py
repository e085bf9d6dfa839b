"""Prompt-lookup speculation: tokens per forward and speed against plain decoding, in one run.

Two prompt groups (bench/speculative_prompts.json): input-grounded (summarize, rewrite, extract,
edit code, answer from a passage) and open chat. For each configuration every prompt is answered
greedily twice through the serving worker, speculation off then on; each row reports the group's
tokens per forward, tokens/s with and without speculation (total new tokens / total time), the
speedup and whether every greedy reply was identical.

    python bench/speculative.py --json                                   # default model, all in RAM
    python bench/speculative.py --json --cpu-memory 0.12 --disk          # split over RAM and disk
    python bench/speculative.py --forward-cost --model bloom-3b ...      # GPU: ms per forward against k
    python bench/speculative.py --json --model TARGET --draft DRAFT      # a draft model instead of lookup

With --draft the speculating runs use a draft model (same tokenizer) instead of prompt lookup; no
draft numbers are recorded yet: no real target/draft pair is available offline here (bench/RESULTS.md).

--forward-cost (a CUDA machine): one forward of 1 + k tokens after a 64-token prompt, offloaded as
configured, for k = 0, 1, 2, 4, 8, 16; with the tokens per forward measured on the CPU with the real
model, the tokens/s that follow are (tokens per forward) / (ms per forward at that k).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = Path(__file__).resolve().parent / "speculative_prompts.json"


def answer(server, tokenizer, prompt: str, speculate: str, max_new: int) -> tuple[list[int], int, float]:
    from pipeline.chat import build_prompt
    from pipeline.params import GenerationParams

    params = GenerationParams(temperature=0, repetition_penalty=1.0, max_new_tokens=max_new, speculate=speculate)
    ids = build_prompt(tokenizer, [{"role": "user", "content": prompt}], server.context_length, max_new).input_ids
    started = time.perf_counter()
    handle = server.submit(ids, params)
    tokens = list(handle)
    return tokens, handle.finished.forwards, time.perf_counter() - started


def run_groups(args) -> list[dict]:
    from pipeline.budgets import GiB, Budgets
    from pipeline.loading import load_model, unload
    from pipeline.presets import resolve_model
    from pipeline.serving import Server, ServingLimits

    prompts = json.loads(PROMPTS.read_text())
    budgets = Budgets(gpu=(), cpu=int(args.cpu_memory * GiB), disk=args.disk, offload_dir=Path("offload"))
    preset = resolve_model(args.model)
    if args.draft:
        preset = preset.with_draft(args.draft)
    mode = "draft" if args.draft else "lookup"
    loaded = load_model(preset, budgets)
    config = "RAM + disk" if "disk" in loaded.plan.bytes_per_device else "all in RAM"
    if args.draft:
        config += f", draft {loaded.plan.draft.model}"
    server = Server(loaded, ServingLimits())
    rows = []
    try:
        answer(server, loaded.tokenizer, "Hello", "off", 4)  # warm-up
        for group, items in prompts.items():
            plain_t = spec_t = 0.0
            plain_n = spec_n = forwards = 0
            identical = True
            for prompt in items:
                best_plain = best_spec = None
                for _ in range(args.repeat):
                    tokens, _, seconds = answer(server, loaded.tokenizer, prompt, "off", args.max_new_tokens)
                    best_plain = min(best_plain or seconds, seconds)
                    fast, used, seconds = answer(server, loaded.tokenizer, prompt, mode, args.max_new_tokens)
                    best_spec = min(best_spec or seconds, seconds)
                    identical &= fast == tokens
                plain_t, plain_n = plain_t + best_plain, plain_n + len(tokens)
                spec_t, spec_n, forwards = spec_t + best_spec, spec_n + len(fast), forwards + used
            rows.append({"group": group, "configuration": f"{loaded.preset.display_name}, {config} (CPU)",
                         "placement": loaded.plan.summary, "prompts": len(items),
                         "tokens_per_forward": round(spec_n / forwards, 2),
                         "tokens_per_s": round(spec_n / spec_t, 2), "plain_tokens_per_s": round(plain_n / plain_t, 2),
                         "speedup": round((spec_n / spec_t) / (plain_n / plain_t), 2),
                         "identical_greedy": identical, "new_tokens": spec_n, "speculation": mode})
    finally:
        server.close()
        unload(loaded)
    return rows


def forward_cost(args) -> list[dict]:
    """GPU: ms of one forward of 1 + k tokens through the offloaded model (cache of a 64-token prompt)."""
    import torch

    from bench.offload import SHAPES, build_checkpoint  # noqa: F401 - same random-weight checkpoints
    from pipeline.budgets import GiB, Budgets
    from pipeline.loading import load_model, unload
    from pipeline.presets import Preset
    from pipeline.quantization import QuantSettings

    path = build_checkpoint(args.model, Path(args.root))
    preset = Preset(name=args.model, source=str(path), dtype="float16")
    rows = []
    for quant in args.quant:
        loaded = load_model(preset, Budgets((int(args.gpu_memory * GiB),), 100 * GiB, False, Path("/tmp/spec-off")),
                            QuantSettings(quant), engine="engine")
        try:
            model = loaded.model
            prompt = torch.randint(100, 20000, (1, 64), device="cuda")
            with torch.inference_mode():
                cache = model(prompt, use_cache=True).past_key_values
                for k in (0, 1, 2, 4, 8, 16):
                    ids = torch.randint(100, 20000, (1, k + 1), device="cuda")
                    times = []
                    for _ in range(args.repeat + 1):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model(ids, past_key_values=cache, use_cache=True)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t)
                        cache.crop(-(k + 1))
                    ms = min(times[1:]) * 1000
                    rows.append({"model": args.model, "quant": quant, "k": k, "ms_per_forward": round(ms, 1),
                                 "placement": loaded.plan.summary})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            unload(loaded)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None, help="a draft model (preset or path, same tokenizer) instead of lookup")
    parser.add_argument("--cpu-memory", type=float, default=4.0, help="GiB of RAM for the model")
    parser.add_argument("--disk", action="store_true", help="allow disk offload (with a small --cpu-memory)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="best of R per prompt and mode")
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    parser.add_argument("--forward-cost", action="store_true", help="GPU: ms per forward against k")
    parser.add_argument("--gpu-memory", type=float, default=2.0)
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"])
    parser.add_argument("--root", default="/tmp/bench-ckpt")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = forward_cost(args) if args.forward_cost else run_groups(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(row)


if __name__ == "__main__":
    main()
