"""The one loaded model an app serves, shared safely by every browser session.

Generation and reload never race: replies hold the model's lock while they stream; a reload first
cancels the streams in flight (each ends within one token with a message), then swaps the model.
If the new model fails to load, the previous settings are loaded again, or the status says plainly
that no model is loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .budgets import Budgets, Hardware, detect_hardware, make_budgets
from .chat import Message, ReplyStats, stream_chat
from .errors import GenerationError, PipelineError
from .loading import LoadedModel, ProgressCallback, load_model, prepare, unload
from .params import GenerationParams
from .planning import Plan, device_label, format_bytes
from .presets import Preset, resolve_model
from .quantization import QuantSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything a person chooses in the model panel; budgets in GiB as typed."""

    model: str = "demo"
    gpu_gib: tuple[float, ...] = ()
    cpu_gib: float | None = None
    disk: bool = True
    offload_dir: str = "offload"
    disk_cap_gib: float | None = None
    quant: QuantSettings = field(default_factory=QuantSettings)
    quant_from_preset: bool = False  # take the preset's default quantization instead of `quant.mode`


@dataclass(frozen=True)
class Resolved:
    preset: Preset
    budgets: Budgets
    quant: QuantSettings


class ModelManager:
    """Owns the current LoadedModel; every app session goes through it."""

    def __init__(self, hardware: Hardware | None = None, allowed_roots: Sequence[Path] | None = None) -> None:
        self.hardware = hardware
        self.allowed_roots = allowed_roots  # set: local model paths must lie in these folders (shared apps)
        self.current: LoadedModel | None = None
        self.settings: Settings | None = None
        self.status = "No model loaded."
        self._swap = threading.Lock()  # held while the model is replaced
        self._streams: set[threading.Event] = set()
        self._streams_lock = threading.Lock()

    def resolve(self, settings: Settings) -> Resolved:
        """Validate settings into a preset, byte budgets and quantization settings (raises PipelineError)."""
        hardware = self.hardware or detect_hardware(settings.offload_dir)
        preset = resolve_model(settings.model, allowed_roots=self.allowed_roots)
        budgets = make_budgets(
            hardware, list(settings.gpu_gib), settings.cpu_gib, settings.disk, Path(settings.offload_dir),
            settings.disk_cap_gib,
        )
        quant = settings.quant
        if settings.quant_from_preset:
            quant = replace(quant, mode=preset.quantization, skip_modules=preset.int8_skip_modules)
        return Resolved(preset, budgets, quant)

    def plan(self, settings: Settings) -> Plan:
        """Plan without loading (the live preview)."""
        resolved = self.resolve(settings)
        return prepare(resolved.preset, resolved.budgets, resolved.quant).plan

    def load(self, settings: Settings, progress: ProgressCallback | None = None) -> LoadedModel:
        """Replace the current model by one loaded with `settings`.

        Streams in flight are cancelled first. On failure the previous settings are loaded again
        and the error is re-raised; `status` says what is loaded afterwards.
        """
        resolved = self.resolve(settings)  # bad input fails here, before anything is unloaded
        prepared = prepare(resolved.preset, resolved.budgets, resolved.quant)  # so does "does not fit"
        with self._swap:
            self.cancel_all()
            previous, previous_settings = self.current, self.settings
            if previous is not None:
                unload(previous)  # waits for the model lock: cancelled streams end within one token
                self.current = None
            try:
                self.current = load_model(resolved.preset, resolved.budgets, progress=progress, prepared=prepared)
                self.settings = settings
                self.status = f"Loaded {resolved.preset.display_name}."
                return self.current
            except PipelineError as exc:
                self.status = self._restore(previous_settings, exc)
                raise

    def _restore(self, previous: Settings | None, exc: Exception) -> str:
        if previous is None:
            return f"No model loaded: {exc}"
        try:
            resolved = self.resolve(previous)
            self.current = load_model(resolved.preset, resolved.budgets, resolved.quant)
            self.settings = previous
            return f"Loading failed ({exc}); {resolved.preset.display_name} is loaded again."
        except PipelineError as again:
            logger.error("restoring the previous model failed: %s", again)
            self.current, self.settings = None, None
            return f"No model loaded: {exc}; restoring the previous model also failed: {again}"

    def cancel_all(self) -> None:
        with self._streams_lock:
            for event in self._streams:
                event.set()

    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        cancel: threading.Event | None = None,
        stats: ReplyStats | None = None,
    ) -> Iterator[str]:
        """Stream a reply from the current model; a reload cancels it (GenerationError tells why)."""
        cancel = cancel or threading.Event()
        reloaded = threading.Event()
        with self._swap:  # a reply never starts half-way through a swap
            loaded = self.current
            if loaded is None or not loaded.loaded:
                raise GenerationError(f"no model is loaded. {self.status}")
            with self._streams_lock:
                self._streams.add(reloaded)
        watcher_done = threading.Event()

        def forward() -> None:  # a reload's cancel reaches this stream's generation
            while not watcher_done.wait(0.05):
                if reloaded.is_set():
                    cancel.set()
                    return

        watcher = threading.Thread(target=forward, daemon=True, name="reload-watch")
        watcher.start()
        try:
            yield from stream_chat(loaded, messages, params, cancel=cancel, stats=stats)
        finally:
            watcher_done.set()
            watcher.join()
            with self._streams_lock:
                self._streams.discard(reloaded)
        if reloaded.is_set():
            raise GenerationError("the reply was stopped because the model is being reloaded")

    def describe(self) -> dict[str, Any]:
        """Status for the UI: model, quantization, placement and memory per device."""
        loaded = self.current
        if loaded is None or not loaded.loaded:
            return {"loaded": False, "status": self.status}
        plan = loaded.plan
        placement = " · ".join(f"{tier} {share * 100:.0f} %" for tier, share in plan.share().items())
        memory = " · ".join(
            f"{device_label(d)} {format_bytes(b)}" for d, b in plan.bytes_per_device.items()
        )
        return {
            "loaded": True,
            "in_use": memory_in_use(loaded),
            "status": self.status,
            "model": loaded.preset.display_name,
            "quantization": plan.quantization,
            "dtype": str(plan.dtype).removeprefix("torch."),
            "placement": placement,
            "memory": memory,
            "summary": plan.summary,
            "context_length": loaded.context_length,
            "offload": _offload_path(loaded) if plan.offloaded else "",
        }


def _offload_path(loaded: LoadedModel) -> str:
    if loaded.engine is None:
        return "accelerate hooks"
    if loaded.plan.compressed:
        return f"offload engine, layers moved quantized ({loaded.plan.quantization})"
    return "offload engine"


def memory_in_use(loaded: LoadedModel) -> str:
    """What the process really uses now: GPU memory allocated per device, process RSS, offload files."""
    import psutil
    import torch

    parts = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            parts.append(f"GPU{index} {format_bytes(torch.cuda.memory_allocated(index))} allocated")
    parts.append(f"process RSS {format_bytes(psutil.Process().memory_info().rss)}")
    if loaded.offload_dir is not None and loaded.offload_dir.exists():
        size = sum(p.stat().st_size for p in loaded.offload_dir.rglob("*") if p.is_file())
        parts.append(f"offload folder {format_bytes(size)}")
    return " · ".join(parts)
