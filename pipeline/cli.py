"""`python -m pipeline`: plan, load and chat from the command line, without the UI;
`python -m pipeline serve`: the same model behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .errors import ConfigError, PipelineError
from .params import SPECULATION, GenerationParams
from .access import API_KEY_ENV
from .presets import ENGINES, QUANTIZATIONS, default_model, list_presets, load_app_config, offload_root, resolve_model

# Heavier modules (torch, transformers, fastapi) are imported where they are used, so that
# `--list-presets` answers at once.


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Plan a GPU/CPU/disk split for a causal LM, load it (optionally quantized) and chat with it.",
    )
    parser.add_argument("--model", default=default_model(defaults),
                        help="preset name, local checkpoint folder or hub ID (default: %(default)s)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    remote = parser.add_argument_group("remote engine (instead of a local model)")
    remote.add_argument("--remote", default=None, metavar="URL",
                        help="chat with a model on an OpenAI-compatible endpoint (vLLM, SGLang, Offload Chat, ...)")
    remote.add_argument("--remote-model", default=None, metavar="NAME", help="the endpoint's model")
    parser.add_argument("--api-key", default=None,
                        help=f"with --remote: the endpoint's key (or set REMOTE_API_KEY); with serve: the key clients "
                             f"must send as 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    budgets = parser.add_argument_group("budgets (GiB)")
    budgets.add_argument("--gpu-memory", nargs="+", metavar="GIB", default=None,
                         help="budget per visible GPU, in order (default: 90%% of each GPU's free memory)")
    budgets.add_argument("--cpu-memory", metavar="GIB", default=None, help="CPU RAM budget (default: 70%% of available)")
    budgets.add_argument("--disk", action="store_true", help="allow offloading to disk")
    budgets.add_argument("--offload-dir", default=None,
                         help="offload folder root; relative to the repository root, as in the app "
                              "(default: offload_dir of configs/app.yaml)")
    budgets.add_argument("--disk-cap", metavar="GIB", default=None, help="most bytes to put on disk")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--quant", choices=QUANTIZATIONS, default=None, help="default: the preset's")
    quant.add_argument("--int8-threshold", type=float, default=6.0)
    quant.add_argument("--skip-modules", default=None, help="comma-separated modules kept unquantized (default: lm_head)")
    quant.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (pickle can run code)")
    parser.add_argument("--offload", choices=ENGINES, default="auto",
                        help="how offloaded layers run: the streamed offload engine (auto: when a CUDA GPU computes) "
                             "or accelerate's hooks")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default=None, help="one message to answer; without it, an interactive chat")
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--max-new-tokens", default=None)
    gen.add_argument("--temperature", default=None)
    gen.add_argument("--top-p", default=None)
    gen.add_argument("--top-k", default=None)
    gen.add_argument("--repetition-penalty", default=None)
    gen.add_argument("--seed", default=None)
    gen.add_argument("--speculate", choices=SPECULATION, default=None,
                     help="speculation when one chat decodes, the same reply in fewer steps: prompt lookup, a draft "
                          "model (needs one: --draft or the preset's draft:) or off (default: the preset's; draft "
                          "when --draft attaches one)")
    gen.add_argument("--draft", default=None, metavar="PRESET_OR_PATH",
                     help="attach a draft model (a smaller model with the same tokenizer) for speculative decoding; "
                          "kept whole on the GPU (in RAM without one); '' detaches the preset's draft")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and exit without loading weights")
    parser.add_argument("--json", action="store_true", help="with --plan-only: print the plan as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    serve = parser.add_argument_group("serve (python -m pipeline serve)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    defaults = load_app_config()
    argv = sys.argv[1:] if argv is None else list(argv)
    serving = argv[:1] == ["serve"]
    parser = build_parser(defaults)
    if serving:
        parser.prog += " serve"
        parser.description = ("Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                              "/v1/models), without the UI.")
        add_serve_arguments(parser)
        argv = argv[1:]
    args = parser.parse_args(argv)
    _quiet(args.verbose, libraries=not args.list_presets)
    # SIGTERM ends the CLI like Ctrl-C: through every `finally`, so the model is unloaded and its
    # offload folder removed (the default action killed the process and left the folder behind).
    signal.signal(signal.SIGTERM, _terminate)
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # invalid UTF-8 typed or piped in becomes U+FFFD, not a traceback
    try:
        return _serve(args, defaults) if serving else _run(args, defaults)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("\nterminated", file=sys.stderr)
        return 143


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so that cleanup runs."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _run(args: argparse.Namespace, defaults: dict) -> int:
    if args.list_presets:
        for name, preset in list_presets().items():
            print(f"{name:28} {preset.source:40} {preset.quantization:5} {preset.display_name}")
        return 0
    from .budgets import beyond_hardware, make_budgets, what_if_hardware
    from .loading import load_model, prepare, unload
    from .quantization import QuantSettings

    if args.remote:
        return _run_remote(args)
    preset = resolve_model(args.model)
    preset = preset if args.draft is None else preset.with_draft(args.draft)
    if args.speculate == "draft" and not preset.draft:
        raise ConfigError(f"--speculate draft needs a draft model, and {preset.display_name} has none: attach one with "
                          "--draft PRESET_OR_PATH (a smaller model with the same tokenizer), or use --speculate lookup")
    offload_dir, hardware, gpu, cpu = _machine_and_budgets(args, defaults)
    what_if = args.plan_only and args.gpu_memory is not None and beyond_hardware(hardware, args.gpu_memory)
    if what_if:  # "would this fit on a 24 GB card, and how fast?": plan for GPUs this machine lacks
        hardware = what_if_hardware(hardware, args.gpu_memory)
    try:
        budgets = make_budgets(hardware, gpu, cpu, args.disk, offload_dir, args.disk_cap)
    except ConfigError as exc:
        if args.gpu_memory is not None and beyond_hardware(hardware, args.gpu_memory):
            raise ConfigError(f"{exc}; loading needs the real hardware (--plan-only plans for a GPU this machine "
                              "does not have)") from None
        raise
    quant = QuantSettings(
        mode=args.quant or preset.quantization,
        int8_threshold=args.int8_threshold,
        skip_modules=args.skip_modules if args.skip_modules is not None else preset.int8_skip_modules,
    )
    prepared = prepare(preset, budgets, quant, args.offload, what_if=what_if)
    plan = prepared.plan
    if args.plan_only:
        if args.json:
            data = plan.to_dict()
            data["estimate"] = prepared.estimate.to_dict() if prepared.estimate else None
            data["what_if"] = what_if
            print(json.dumps(data, indent=2))
        else:
            print(_plan_text(plan, prepared.engine, prepared.estimate, what_if))
        return 0
    print(_plan_text(plan, prepared.engine, prepared.estimate), flush=True)
    params = _params(args, preset.generation)

    interactive = sys.stderr.isatty()
    shown = {"step": -1}

    def progress(fraction: float, message: str) -> None:
        step = int(fraction * 10)  # a line per 10 % when not on a terminal
        if interactive:
            print(f"\r[{fraction * 100:3.0f}%] {message[:100]:100}", end="", file=sys.stderr, flush=True)
        elif step != shown["step"]:
            shown["step"] = step
            print(f"[{fraction * 100:3.0f}%] {message[:100]}", file=sys.stderr, flush=True)

    from .chat import stream_chat

    loaded = load_model(preset, budgets, progress=progress, allow_pickle=args.allow_pickle or None, prepared=prepared)
    if interactive:
        print(file=sys.stderr)
    try:
        return _chat(lambda messages, p, **kw: stream_chat(loaded, messages, p, **kw), args, params)
    finally:
        unload(loaded)


def _machine_and_budgets(args: argparse.Namespace, defaults: dict) -> tuple:
    """The offload folder, this machine's hardware, and the GPU and CPU budgets in GiB (the flags', or
    the proposed defaults of configs/app.yaml)."""
    from .budgets import GiB, app_default_budgets, detect_hardware

    offload_dir = offload_root(args.offload_dir, defaults)
    hardware = detect_hardware(offload_dir)
    proposed = app_default_budgets(hardware, defaults, offload_dir)
    gpu = args.gpu_memory if args.gpu_memory is not None else [b / GiB for b in proposed.gpu]
    cpu = args.cpu_memory if args.cpu_memory is not None else proposed.cpu / GiB
    return offload_dir, hardware, gpu, cpu


def _run_remote(args: argparse.Namespace) -> int:
    """Chat with a model on an OpenAI-compatible endpoint: the same loop, the same stats line."""
    from .remote import connect

    if args.plan_only:
        raise ConfigError("--plan-only plans a local model; a remote engine places nothing on this machine")
    remote = connect(args.remote, args.remote_model or "", args.api_key or os.environ.get("REMOTE_API_KEY"))
    print(f"remote: {remote.describe()}", flush=True)
    base = GenerationParams(max_new_tokens=256, temperature=0.7, top_p=0.95)
    return _chat(remote.stream, args, _params(args, base))


def _chat(stream, args: argparse.Namespace, params: GenerationParams) -> int:
    """One answer (--prompt) or an interactive chat until exit, EOF or a closed stdin."""
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _, interrupted = _answer(stream, history + [{"role": "user", "content": args.prompt}], params)
        return 130 if interrupted else 0
    while True:
        try:
            line = input("> ") if sys.stdin is not None and not sys.stdin.closed else None
        except EOFError:
            line = None
        if line is None:
            return 0
        if line.strip() in {"exit", "quit", "/exit"}:
            return 0
        history.append({"role": "user", "content": line})
        try:
            reply, _ = _answer(stream, history, params)  # Ctrl-C stops the reply; the chat goes on
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _serve(args: argparse.Namespace, defaults: dict) -> int:
    """Load the model into a ModelManager and serve the OpenAI-compatible API until Ctrl-C or SIGTERM."""
    import uvicorn
    from fastapi import FastAPI

    from .api import ApiAccess, openai_routes
    from .loading import unload
    from .quantization import QuantSettings
    from .session import ModelManager, Settings

    if args.remote:
        raise ConfigError("serve serves a local model; point clients at the remote engine itself")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port; accepted: an integer from 1 to 65535")
    offload_dir, hardware, gpu, cpu = _machine_and_budgets(args, defaults)
    quant = QuantSettings(mode=args.quant or "none", int8_threshold=args.int8_threshold,
                          skip_modules=args.skip_modules if args.skip_modules is not None else "lm_head")
    settings = Settings(model=args.model, gpu_gib=tuple(gpu), cpu_gib=cpu, disk=args.disk, offload_dir=str(offload_dir),
                        disk_cap_gib=args.disk_cap, quant=quant, quant_from_preset=args.quant is None, draft=args.draft)
    manager = ModelManager(hardware)
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this address can use it "
              f"(give --api-key or set {API_KEY_ENV})", file=sys.stderr)
    loaded = manager.load(settings)
    print(_plan_text(loaded.plan, loaded.engine is not None), flush=True)  # (serve: the plan only)
    app = FastAPI(title="Offload Chat API", routes=openai_routes(manager, ApiAccess(key)))
    print(f"serving {loaded.preset.name!r} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        unload(loaded)
    return 0


def _answer(stream, messages, params) -> tuple[str, bool]:
    """Stream one reply to stdout; returns its text and whether Ctrl-C stopped it."""
    from .chat import ReplyStats

    stats = ReplyStats()
    cancel = threading.Event()
    parts = []
    interrupted = False
    try:
        for piece in stream(messages, params, cancel=cancel, stats=stats):
            parts.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        cancel.set()
        interrupted = True
        stats.finish_reason = "cancelled"
        print("\n[cancelled]", file=sys.stderr)
    print()
    print(f"[{stats.describe()} · finished: {stats.finish_reason}]", flush=True)
    return "".join(parts), interrupted


def _params(args: argparse.Namespace, base: GenerationParams) -> GenerationParams:
    changes = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "speculate": args.speculate,
    }
    return base.replace(**{k: v for k, v in changes.items() if v is not None})


def _plan_text(plan, engine: bool, estimate=None, what_if: bool = False) -> str:
    offload = "offload engine" if engine else "accelerate hooks"
    lines = [f"plan: {plan.summary}",
             f"dtype: {str(plan.dtype).removeprefix('torch.')} · quantization: {plan.quantization}"
             + (f" · offloaded layers run with the {offload}" if plan.offloaded else "")]
    if plan.draft is not None:
        lines.append(f"{plan.draft.describe()}: taken out of the "
                     f"{'GPU' if isinstance(plan.draft.device, int) else 'CPU'} budget")
    if what_if:
        lines.append("planned for: GPUs this machine does not have (a CUDA machine's pricing); loading needs the "
                     "real hardware")
    if estimate is not None:
        lines.append(f"speed: {estimate.describe()} ({estimate.source})")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _quiet(verbose: bool, libraries: bool = True) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    logging.basicConfig(level=logging.WARNING)
    if not libraries:  # nothing will load a model: do not pay for importing transformers
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
