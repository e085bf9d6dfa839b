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

from .budgets import Budgets, Hardware, default_budgets, detect_hardware, make_budgets  # noqa: E402
from .chat import Reply, ReplyStats, build_prompt, chat, stream_chat  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DoesNotFitError,
    GenerationError,
    LoadError,
    ModelSourceError,
    PipelineError,
)
from .loading import LoadedModel, Prepared, load_model, prepare, unload  # noqa: E402
from .params import GenerationParams  # noqa: E402
from .planning import Plan, plan_device_map  # noqa: E402
from .presets import Preset, list_presets, resolve_model  # noqa: E402
from .quantization import QuantSettings  # noqa: E402

__all__ = [
    "Budgets", "ConfigError", "DoesNotFitError", "GenerationError", "GenerationParams", "Hardware", "LoadError",
    "LoadedModel", "ModelSourceError", "PipelineError", "Plan", "Prepared", "Preset", "QuantSettings", "Reply", "ReplyStats",
    "build_prompt", "chat", "default_budgets", "detect_hardware", "list_presets", "load_model", "make_budgets",
    "plan_device_map", "prepare", "resolve_model", "stream_chat", "unload",
]
