"""Chat with language models that do not fit in the GPU: plan a GPU/CPU/disk split under memory
budgets, load quantized with bitsandbytes, and stream replies.

The app and the CLI use this API:
    preset = resolve_model("demo")
    budgets = make_budgets(detect_hardware(), cpu_gib=4)
    loaded = load_model(preset, budgets)
    for piece in stream_chat(loaded, [{"role": "user", "content": "Hello"}]): ...
    unload(loaded)
"""

from . import logs

logs.install()  # before bitsandbytes and accelerate are imported and start logging

# The public names, imported on first use (PEP 562): `python -m pipeline --list-presets` and the plan
# of a model do not pay for torch, transformers and gradio-side modules they never touch.
_EXPORTS = {
    "Budgets": "budgets", "Hardware": "budgets", "default_budgets": "budgets", "detect_hardware": "budgets",
    "make_budgets": "budgets",
    "Reply": "chat", "ReplyStats": "chat", "build_prompt": "chat", "chat": "chat", "stream_chat": "chat",
    "ConfigError": "errors", "DoesNotFitError": "errors", "GenerationError": "errors", "LoadError": "errors",
    "ModelSourceError": "errors", "PipelineError": "errors",
    "LoadedModel": "loading", "Prepared": "loading", "load_model": "loading", "prepare": "loading", "unload": "loading",
    "GenerationParams": "params",
    "Plan": "planning", "plan_device_map": "planning",
    "Preset": "presets", "list_presets": "presets", "resolve_model": "presets",
    "QuantSettings": "quantization",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
