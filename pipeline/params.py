"""Sampling parameters: one validated dataclass shared by presets, the CLI, the app and chat."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MAX_NEW_TOKENS_LIMIT = 32768
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 0.01
MIN_PENALTY = 0.01
SPECULATION = ("off", "lookup", "draft")


@dataclass(frozen=True)
class GenerationParams:
    """How to sample a reply. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # When a chat decodes alone: "lookup" (prompt-lookup speculation), "draft" (a draft model proposes;
    # the loaded model needs one: a preset's `draft:` or --draft), or "off".
    speculate: str = "lookup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_new_tokens", _int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT))
        object.__setattr__(self, "temperature", _float("temperature", self.temperature, 0.0, 5.0))
        if 0 < self.temperature < MIN_TEMPERATURE:  # dividing logits by 1e-300 overflows them to inf
            raise ConfigError(f"temperature={self.temperature!r} is out of range; accepted: 0 (greedy) or "
                              f"{MIN_TEMPERATURE} <= value <= 5.0")
        object.__setattr__(self, "top_p", _float("top_p", self.top_p, 0.0, 1.0, low_open=True))
        object.__setattr__(self, "top_k", _int("top_k", self.top_k, 0, 100_000))
        object.__setattr__(
            self, "repetition_penalty", _float("repetition_penalty", self.repetition_penalty, MIN_PENALTY, 10.0)
        )
        if self.seed is not None:
            object.__setattr__(self, "seed", _int("seed", self.seed, 0, MAX_SEED))
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop={self.stop!r} is invalid: expected a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.speculate not in SPECULATION:
            raise ConfigError(f"speculate={self.speculate!r} is not supported; accepted: {list(SPECULATION)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: GenerationParams | None = None) -> GenerationParams:
        """Build from a mapping (a preset's `generation:` block); unknown keys are an error."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {unknown}; allowed: {sorted(allowed)}")
        return dataclasses.replace(base or cls(), **data)


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; "True" as a temperature is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value) if isinstance(value, str) else None
        except ValueError:
            value = None
        if value is None:
            raise ConfigError(f"{name}={value!r} is not a number")
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{name}={value!r} is not a finite number")
    return float(value)


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    original = value
    try:
        value = _number(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={original!r} is not a number; accepted: {_range(low, high, low_open)}") from None
    if value > high or value < low or (low_open and value == low):
        raise ConfigError(f"{name}={original!r} is out of range; accepted: {_range(low, high, low_open)}")
    return value


def _int(name: str, value: Any, low: int, high: int) -> int:
    original = value
    if isinstance(value, int) and not isinstance(value, bool):  # exact: float() would round 2**63-1 up
        if not low <= value <= high:
            raise ConfigError(f"{name}={original!r} is out of range; accepted: integers {low}..{high}")
        return value
    try:
        number = _number(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={original!r} is not an integer; accepted: integers {low}..{high}") from None
    if number != int(number):
        raise ConfigError(f"{name}={original!r} is not an integer; accepted: integers {low}..{high}")
    if not low <= number <= high:
        raise ConfigError(f"{name}={original!r} is out of range; accepted: integers {low}..{high}")
    return int(number)


def _range(low: float, high: float, low_open: bool) -> str:
    return f"{low} {'<' if low_open else '<='} value <= {high}"
