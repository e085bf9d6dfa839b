"""Library log noise, tamed once for the whole process (filters are thread-safe, where raising and
restoring a logger's level around a call was not).

- Warnings that libraries repeat on every call are shown once per distinct message: one 19-token
  8-bit reply on the CPU logged bitsandbytes' "MatMul8bitLt: inputs will be cast ..." 798 times.
- accelerate warns "Device N is not available" on every plan for GPUs this machine lacks; planning
  for them is allowed (what-if plans, tests), so those lines are dropped.
- A failed optional import is not an error of this app: bitsandbytes warns that its optional CPU
  4-bit kernel package (`kernels`) is missing, and works without it; that line goes to DEBUG.
"""

from __future__ import annotations

import logging
import threading

REPEATING = ("bitsandbytes.autograd._functions", "bitsandbytes.functional", "accelerate.utils.modeling",
             "accelerate.big_modeling", "transformers.modeling_utils")
OPTIONAL_IMPORTS = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",)}


class OncePerMessage(logging.Filter):
    """Let each distinct warning through once (by its format string and level)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.levelno, str(record.msg))
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class MissingGpu(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Device ") and "is not available" in message)


class OptionalImport(logging.Filter):
    """Demote a library's notice about a missing optional package to DEBUG."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_installed = False


def install() -> None:
    """Attach the filters (idempotent); called when `pipeline` is imported, before the libraries log."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in REPEATING:
        logging.getLogger(name).addFilter(OncePerMessage())
    for name, prefixes in OPTIONAL_IMPORTS.items():
        logging.getLogger(name).addFilter(OptionalImport(prefixes))
    logging.getLogger("accelerate.utils.modeling").addFilter(MissingGpu())
