"""The one loaded model an app serves, shared safely by every browser session.

Every reply is a request to the loaded model's serving worker (`pipeline.serving`), which batches
them. A reload closes that worker first (replies in flight end at once with a message saying why),
then swaps the model. If the new model fails to load, for any reason, the previous settings are
loaded again, or the status says plainly that no model is loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .budgets import Budgets, Hardware, detect_hardware, make_budgets, what_if_hardware
from .chat import Message, ReplyStats, stream_chat, stream_completion
from .errors import GenerationError, LoadError, PipelineError
from .loading import LoadedModel, Prepared, ProgressCallback, check_disk_space, load_model, prepare, unload
from .params import GenerationParams
from .planning import Plan, device_label, format_bytes
from .presets import Preset, resolve_model
from .quantization import QuantSettings
from .remote import RemoteModel, connect
from .serving import ServingLimits, server_for

logger = logging.getLogger(__name__)

RELOAD_MESSAGE = "the reply was stopped because the model is being reloaded"
REMOTE_MESSAGE = "the reply was stopped because the app switched to a remote engine"


@dataclass(frozen=True)
class Served:
    """What the app serves now, as API clients name it."""

    id: str
    names: tuple[str, ...]  # every name a request may use for it
    context_length: int | None  # None: a remote engine's, unknown here
    default_max_tokens: int
    remote: str | None = None  # the endpoint's URL for a remote engine
    defaults: GenerationParams | None = None  # sampling for fields a request leaves out (the preset's)


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
    draft: str | None = None  # a draft model (preset or local path) for speculate="draft"; None: the preset's own


@dataclass(frozen=True)
class Resolved:
    preset: Preset
    budgets: Budgets
    quant: QuantSettings


class ModelManager:
    """Owns the current LoadedModel; every app session goes through it."""

    def __init__(self, hardware: Hardware | None = None, allowed_roots: Sequence[Path] | None = None,
                 limits: ServingLimits | None = None) -> None:
        self.hardware = hardware
        self.allowed_roots = allowed_roots  # set: local model paths must lie in these folders (shared apps)
        self.limits = limits  # the serving worker's limits (None: configs/app.yaml)
        self.current: LoadedModel | None = None
        self.settings: Settings | None = None
        self.status = "No model loaded."
        self.remote: RemoteModel | None = None  # set: replies come from this endpoint instead of a local model
        self._remote_running = 0  # replies streaming from the remote engine now
        self._count_lock = threading.Lock()
        self._swap = threading.Lock()  # held while the model is replaced; a reply starts before or after

    def resolve(self, settings: Settings, hardware: Hardware | None = None) -> Resolved:
        """Validate settings into a preset, byte budgets and quantization settings (raises PipelineError);
        `hardware` replaces this machine's (a plan for GPUs it does not have)."""
        hardware = hardware or self.hardware or detect_hardware(settings.offload_dir)
        preset = resolve_model(settings.model, allowed_roots=self.allowed_roots)
        if settings.draft is not None:
            draft = settings.draft.strip() or None
            if draft is not None:
                resolve_model(draft, allowed_roots=self.allowed_roots)  # a shared app's folder limits hold for drafts
            preset = preset.with_draft(draft)
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
        return self.prepare(settings).plan

    def prepare(self, settings: Settings, what_if_gpu_gib: float | None = None) -> Prepared:
        """The plan and its predicted speed, without loading; `what_if_gpu_gib`: for one GPU of that size
        instead of this machine's GPUs (a plan that cannot be loaded here)."""
        if what_if_gpu_gib is None:
            resolved = self.resolve(settings)
            return prepare(resolved.preset, resolved.budgets, resolved.quant)
        hardware = what_if_hardware(self.hardware or detect_hardware(settings.offload_dir), [what_if_gpu_gib])
        resolved = self.resolve(replace(settings, gpu_gib=(what_if_gpu_gib,)), hardware)
        return prepare(resolved.preset, resolved.budgets, resolved.quant, what_if=True)

    def load(self, settings: Settings, progress: ProgressCallback | None = None) -> LoadedModel:
        """Replace the current model by one loaded with `settings`.

        Streams in flight are cancelled first. On failure the previous settings are loaded again
        and the error is re-raised; `status` says what is loaded afterwards.
        """
        resolved = self.resolve(settings)  # bad input fails here, before anything is unloaded
        prepared = prepare(resolved.preset, resolved.budgets, resolved.quant)  # so does "does not fit"
        check_disk_space(prepared, resolved.preset, resolved.budgets)  # ... and offload files the disk cannot hold
        with self._swap:
            previous, previous_settings = self.current, self.settings
            if previous is not None:
                unload(previous, RELOAD_MESSAGE)  # replies in flight end now, with this message
                self.current = None
            try:
                self.current = load_model(resolved.preset, resolved.budgets, progress=progress, prepared=prepared)
                self.settings, self.remote = settings, None
                self.status = f"Loaded {resolved.preset.display_name}."
                return self.current
            except Exception as exc:
                if not isinstance(exc, PipelineError):  # a library error no check foresaw: keep its traceback
                    logger.exception("loading %s failed", settings.model)
                    exc = LoadError(f"loading {settings.model!r} failed: {type(exc).__name__}: {exc}")
                self.status = self._restore(previous_settings, exc)
                raise exc from None

    def _restore(self, previous: Settings | None, exc: Exception) -> str:
        if self.remote is not None:  # the remote engine was never disconnected: it still answers
            return f"Loading failed ({exc}); still connected to {self.remote.describe()}."
        if previous is None:
            return f"No model loaded: {exc}"
        try:
            resolved = self.resolve(previous)
            self.current = load_model(resolved.preset, resolved.budgets, resolved.quant)
            self.settings = previous
            return f"Loading failed ({exc}); {resolved.preset.display_name} is loaded again."
        except Exception as again:
            logger.error("restoring the previous model failed: %s", again, exc_info=not isinstance(again, PipelineError))
            self.current, self.settings = None, None
            return f"No model loaded: {exc}; restoring the previous model also failed: {again}"

    def connect_remote(self, url: str, model: str, api_key: str | None = None) -> RemoteModel:
        """Serve replies from an OpenAI-compatible endpoint. The endpoint is checked first (reachable,
        key accepted, model served): if it fails, nothing changes and the current backend still answers.
        On success the local model, if any, is unloaded (its replies end with a message)."""
        remote = connect(url, model, api_key)
        with self._swap:
            if self.current is not None:
                unload(self.current, REMOTE_MESSAGE)
            self.current, self.settings, self.remote = None, None, remote
            self.status = f"Connected to {remote.describe()}."
        logger.info("replies now come from %s", remote.describe())
        return remote

    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        cancel: threading.Event | None = None,
        stats: ReplyStats | None = None,
    ) -> Iterator[str]:
        """Stream a reply from the current model; a reload ends it with a GenerationError saying so."""
        yield from self._route("stream", stream_chat, messages, params, cancel, stats)

    def _route(self, remote_method: str, local: Any, payload: Any, params: GenerationParams,
               cancel: threading.Event | None, stats: ReplyStats | None) -> Iterator[str]:
        """The same request to a remote engine (counted, for the status line) or to the local model."""
        backend = self._serving()
        if not isinstance(backend, RemoteModel):
            yield from local(backend, payload, params, cancel=cancel, stats=stats)
            return
        with self._count_lock:
            self._remote_running += 1
        try:
            yield from getattr(backend, remote_method)(payload, params, cancel=cancel, stats=stats)
        finally:
            with self._count_lock:
                self._remote_running -= 1

    def served(self) -> Served | None:
        """What API clients may ask for now (None: nothing is loaded)."""
        remote, loaded = self.remote, self.current
        if remote is not None:
            return Served(remote.model, (remote.model,), None, 256, remote.url)
        if loaded is None or not loaded.loaded:
            return None
        preset = loaded.preset
        return Served(preset.name, (preset.name, preset.display_name, preset.source), loaded.context_length,
                      max(1, min(preset.generation.max_new_tokens, loaded.context_length // 2)),
                      defaults=preset.generation)

    def stream_completion(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        cancel: threading.Event | None = None,
        stats: ReplyStats | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of a raw prompt (no chat template) from the current model."""
        yield from self._route("stream_completion", stream_completion, prompt, params, cancel, stats)

    @property
    def loading(self) -> bool:
        """True while a model is being (re)loaded."""
        return self._swap.locked()

    def _serving(self) -> LoadedModel | RemoteModel:
        with self._swap:  # a reply never starts half-way through a swap
            if self.remote is not None:
                return self.remote
            loaded = self.current
            if loaded is None or not loaded.loaded:
                raise GenerationError(f"no model is loaded. {self.status}")
            server_for(loaded, self.limits)
        return loaded

    def describe(self) -> dict[str, Any]:
        """Status for the UI: model, quantization, placement and memory per device."""
        remote = self.remote
        if remote is not None:
            running = self._remote_running
            return {"loaded": True, "remote": remote.url, "model": remote.model, "status": self.status,
                    "serving": f"{running} chat{'s' if running != 1 else ''} streaming from the endpoint" if running
                    else "idle", "running": running, "waiting": 0}
        loaded = self.current
        if loaded is None or not loaded.loaded:
            return {"loaded": False, "status": self.status}
        plan = loaded.plan
        placement = " · ".join(f"{tier} {share * 100:.0f} %" for tier, share in plan.share().items())
        if plan.draft is not None:
            placement += f" · {plan.draft.describe()}"
        memory = " · ".join(
            f"{device_label(d)} {format_bytes(b)}" for d, b in plan.bytes_per_device.items()
        )
        return {
            "loaded": True,
            "remote": None,
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
            "serving": serving_text(loaded),
            "running": loaded.server.running if loaded.server else 0,  # chats being answered now
            "waiting": loaded.server.waiting if loaded.server else 0,  # ... and waiting for a place in the batch
        }


def serving_text(loaded: LoadedModel) -> str:
    """How many chats the worker answers together now, and how many wait."""
    server = loaded.server
    if server is None:
        return "idle"
    running, waiting = server.running, server.waiting
    text = f"{running} chat{'s' if running != 1 else ''} being answered together" if running else "idle"
    if waiting:
        text += f", {waiting} waiting"
    if server.batchable is False:
        text += " (this model's cache is served one chat at a time)"
    return text


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
    size = 0
    if loaded.offload_dir is not None and loaded.offload_dir.exists():
        size = sum(p.stat().st_size for p in loaded.offload_dir.rglob("*") if p.is_file())
    on_disk = loaded.plan.bytes_per_device.get("disk", 0)
    if on_disk and size < on_disk // 2:
        # safetensors layers on the disk tier are read in place from the checkpoint, not copied
        parts.append(f"disk {format_bytes(on_disk)} read from the checkpoint's files"
                     + (f" + offload folder {format_bytes(size)}" if size else ""))
    elif size:
        parts.append(f"offload folder {format_bytes(size)}")
    return " · ".join(parts)
