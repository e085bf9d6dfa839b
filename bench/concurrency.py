"""N simultaneous chats through the serving layer: aggregate and per-chat speed, time to first token.

Every chat is a request to the product's serving worker (`pipeline.serving.Server`), submitted at the
same moment and read on its own thread, as the app's sessions do. Each chat has its own prompt,
decodes greedily and runs to exactly `--new-tokens` (end-of-sequence is switched off). For each
N in `--chats`, in one run:

- aggregate_tokens_per_s: all chats' new tokens / wall time from the submits to the last token;
- per_chat_tokens_per_s: the mean over chats of its new tokens / its own time from submit to end;
- ttft_p50_s / ttft_p95_s: time from submit to each chat's first token.

`--baseline` adds the path the app used before the serving layer, one `model.generate` with a
`TextIteratorStreamer` on a worker thread per chat (row `"path": "generate"`, one chat), so that
"one chat alone is no slower than before" is measured in the same run.

Usage:
    python bench/concurrency.py --chats 1 2 4 --json                        # CPU, the demo model
    python bench/concurrency.py --model bloom-3b --gpu-memory 2 --quant nf4 --chats 1 2 4 8 16 --json
(`bloom-3b` and `llama-2-7b` name random-weight checkpoints of those shapes built on the GPU, as in
bench/offload.py; any preset, hub ID or local path works too.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.budgets import GiB, Budgets  # noqa: E402
from pipeline.loading import load_model, unload  # noqa: E402
from pipeline.params import GenerationParams  # noqa: E402
from pipeline.presets import Preset, resolve_model  # noqa: E402
from pipeline.quantization import QuantSettings  # noqa: E402
from pipeline.serving import Server, ServingLimits  # noqa: E402


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, min(vocab, 20000)), (n, length), generator=generator).tolist()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_chats(server: Server, batch: list[list[int]], new_tokens: int) -> dict:
    params = GenerationParams(temperature=0, max_new_tokens=new_tokens, repetition_penalty=1.0)
    firsts: list[float] = [0.0] * len(batch)
    ends: list[float] = [0.0] * len(batch)
    counts = [0] * len(batch)
    start = time.perf_counter()
    handles = [server.submit(p, params) for p in batch]

    def read(i: int) -> None:
        for _ in handles[i]:
            if counts[i] == 0:
                firsts[i] = time.perf_counter()
            counts[i] += 1
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(ends) - start
    assert all(c == new_tokens for c in counts), f"a chat ended early: {counts}"
    ttfts = [f - start for f in firsts]
    return {
        "chats": len(batch),
        "path": "serving",
        "aggregate_tokens_per_s": round(sum(counts) / wall, 2),
        "per_chat_tokens_per_s": round(statistics.mean(c / (e - start) for c, e in zip(counts, ends)), 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 4),
        "peak_batch": server.peak_batch,
    }


def run_generate(loaded, prompt: list[int], new_tokens: int) -> dict:
    """Before the serving layer: generate on a worker thread feeding a TextIteratorStreamer."""
    from transformers import TextIteratorStreamer

    ids = torch.tensor([prompt], device=loaded.plan.compute_device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True)
    start = time.perf_counter()

    def work() -> None:
        with torch.inference_mode():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer,
                                  temperature=None, top_p=None, top_k=None)

    thread = threading.Thread(target=work)
    thread.start()
    first = None
    for _ in streamer:
        first = first or time.perf_counter()
    thread.join()
    wall = time.perf_counter() - start
    return {"chats": 1, "path": "generate", "aggregate_tokens_per_s": round(new_tokens / wall, 2),
            "per_chat_tokens_per_s": round(new_tokens / wall, 2), "ttft_p50_s": round((first or start) - start, 4),
            "ttft_p95_s": round((first or start) - start, 4)}


def load(args: argparse.Namespace):
    gpu = [int(g * GiB) for g in args.gpu_memory]
    if args.model in ("bloom-3b", "llama-2-7b"):
        from offload import build_checkpoint  # bench/offload.py: random weights of the published shape

        preset = Preset(name=args.model, source=str(build_checkpoint(args.model, Path(args.root))), dtype="float16")
    else:
        preset = resolve_model(args.model)
    cpu = int((args.cpu_memory if args.cpu_memory is not None else (100 if gpu else 4)) * GiB)
    budgets = Budgets(tuple(gpu), cpu, args.disk, Path("/tmp/bench-concurrency-offload"))
    loaded = load_model(preset, budgets, QuantSettings(args.quant))
    loaded.model.generation_config.eos_token_id = None  # every chat runs to --new-tokens
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--model", default="demo", help="preset, path, hub ID, or bloom-3b / llama-2-7b (random shape)")
    parser.add_argument("--gpu-memory", nargs="*", type=float, default=[], metavar="GIB")
    parser.add_argument("--cpu-memory", type=float, default=None, metavar="GIB")
    parser.add_argument("--disk", action="store_true")
    parser.add_argument("--quant", default="none", choices=["none", "int8", "nf4", "fp4"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs per N; the best aggregate is kept")
    parser.add_argument("--baseline", action="store_true", help="also time one chat on the old generate path")
    parser.add_argument("--root", default="/tmp/bench-ckpt")
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = load(args)
    rows = []
    try:
        server = Server(loaded, ServingLimits(max_batch=max(args.chats), cache_gib=64))
        vocab = loaded.model.config.vocab_size
        run_chats(server, prompts(2, args.prompt_tokens, vocab, seed=99), 4)  # warm-up: kernels, allocator, caches
        for n in args.chats:
            best = None
            for r in range(args.repeat):
                server.peak_batch = 0
                row = run_chats(server, prompts(n, args.prompt_tokens, vocab, seed=r), args.new_tokens)
                if best is None or row["aggregate_tokens_per_s"] > best["aggregate_tokens_per_s"]:
                    best = row
            rows.append(best)
            if not args.json:
                print(best, flush=True)
        server.close()
        if args.baseline:
            for r in range(args.repeat):
                rows.append(run_generate(loaded, prompts(1, args.prompt_tokens, vocab, seed=r)[0], args.new_tokens))
                if not args.json:
                    print(rows[-1], flush=True)
    finally:
        unload(loaded)
    header = {"model": args.model, "quant": args.quant, "gpu_memory": args.gpu_memory, "plan": loaded.plan.summary,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    print(json.dumps(rows if args.json else {"run": header, "rows": rows}, indent=None if args.json else 1))
    if args.json:
        print(json.dumps(header), file=sys.stderr)


if __name__ == "__main__":
    main()
