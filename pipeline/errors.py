"""Errors raised at the pipeline's public boundaries.

Every message names the bad value and what would be accepted, so the CLI can print it as one line
and the app can show it with `gr.Error` without a stack trace.
"""


class PipelineError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(PipelineError, ValueError):
    """A preset, budget, quantization or generation setting is invalid."""


class ModelSourceError(PipelineError, ValueError):
    """A model name, hub ID or path cannot be used."""


class DoesNotFitError(PipelineError, RuntimeError):
    """The model does not fit in the given budgets, even with disk offload."""


class LoadError(PipelineError, RuntimeError):
    """Loading the weights failed (corrupt file, out of memory, ...)."""


class GenerationError(PipelineError, RuntimeError):
    """Generation failed in the background thread."""
