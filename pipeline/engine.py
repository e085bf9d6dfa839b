"""Streamed offload engine: offloaded decoder layers run from a few reusable GPU slots.

accelerate's hooks copy every offloaded weight to the GPU synchronously, tensor by tensor, from
pageable memory, on every forward. This engine instead keeps each offloaded layer as one flat,
pinned host buffer (allocated once at load) and copies it into one of a small set of GPU slots on
a dedicated copy stream while earlier layers compute. CUDA events order the copies and the
reuse of a slot: a slot is refilled only after the layer that used it has finished.

Layers on disk are read from their safetensors files (memory-mapped once) by a background thread
into pinned staging buffers, ahead of need, and copied from there. With quantization on, offloaded
layers are quantized once at load (`pipeline.compress`) and kept, read and copied in that form.

The scheduling is device-agnostic: `CudaOps` drives real streams and events; `SyncOps` does the
same work synchronously on the CPU, so the logic is unit-tested without a GPU.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

from .compress import linears_by_layer, quantize_layer
from .quantization import QuantSettings

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes: every tensor in a flat buffer starts on this boundary (safe for any dtype view)
READ_THREADS = 4  # parallel copies out of memory-mapped safetensors into pinned staging
STAGING_BYTES = 320 * 2**20  # pinned staging for disk layers: 2 buffers at least, 8 at most, about this much
CHUNK = 8 * 2**20  # bytes per parallel copy when a layer's file already holds its flat layout


# --- device operations -------------------------------------------------------------------------


class SyncOps:
    """Synchronous stand-in for streams and events (CPU): copies happen at once, events are no-ops."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def event(self) -> Any:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, done: Any) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        """The compute stream waits for `event`."""

    def record(self, event: Any) -> None:
        """`event` marks the compute stream's current position."""

    def host_wait(self, event: Any) -> None:
        """The calling thread waits for `event`."""


class CudaOps:
    """Copies on a dedicated CUDA stream from pinned memory, ordered by events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None, done: Any) -> None:
        """Copy on the copy stream, after `after` (the slot's last reader), then record `done`."""
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def record(self, event: torch.cuda.Event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def host_wait(self, event: torch.cuda.Event) -> None:
        event.synchronize()


# --- reading offloaded weights straight from safetensors files ------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A safetensors file memory-mapped once, its header parsed once: tensors are views, not reads.

    Copying such a view into a pinned buffer is the only copy (accelerate's loader opens the file,
    copies the tensor out, and converts it, for every tensor on every forward).
    """

    def __init__(self, path: str) -> None:
        import json

        import numpy as np

        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
        self.base = 8 + size
        self.map = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        raw = torch.from_numpy(self.map[self.base + start : self.base + end])
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


# --- layers as flat buffers --------------------------------------------------------------------


@dataclass
class _Tensor:
    targets: tuple[tuple[Any, str, bool], ...]  # (owner, attribute, is an nn.Parameter): where the view is bound
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int


@dataclass
class OffloadedLayer:
    """One decoder layer's weights, laid out as one flat byte buffer."""

    index: int  # position in the model's layer list
    module: nn.Module
    tier: str  # "cpu" or "disk"
    tensors: list[_Tensor]
    nbytes: int
    read: Callable[[], Iterator[tuple[_Tensor, torch.Tensor]]] | None = None  # disk: yields source tensors
    host: torch.Tensor | None = None  # cpu: the pinned flat buffer
    bindings: dict[int, list] = field(default_factory=dict)  # buffer address -> what bind() assigns
    flat: torch.Tensor | None = None  # disk: the layer's bytes already in flat layout (a memory-mapped file)

    def fill(self, buffer: torch.Tensor, pool: Any = None) -> None:
        """Write this layer's bytes into a flat host buffer (tensors copied in parallel with `pool`).

        Copies convert dtypes on the way (a bf16 checkpoint loaded in fp16) and release the GIL.
        """
        if self.flat is not None:  # the file holds the flat layout: copy it in large chunks
            copies = [(buffer[start : start + CHUNK], self.flat[start : start + CHUNK])
                      for start in range(0, self.nbytes, CHUNK)]
        else:
            assert self.read is not None
            copies = [(_flat_view(buffer, spec), value) for spec, value in self.read()]
        if pool is None:
            for target, value in copies:
                target.copy_(value)
            return
        for future in [pool.submit(target.copy_, value) for target, value in copies]:
            future.result()

    def bind(self, flat: torch.Tensor) -> None:
        """Point the module's parameters (and quantization states) at their bytes in `flat` (a slot).

        The views and parameter objects for each buffer are made on first use and kept, so binding
        is only attribute assignments: it runs before every offloaded layer, on the critical path.
        """
        key = flat.data_ptr()
        binding = self.bindings.get(key)
        if binding is None:
            binding = self.bindings[key] = self._binding(flat)
        for owner, name, is_param, value in binding:
            if is_param:
                owner._parameters[name] = value
            else:
                setattr(owner, name, value)

    def _binding(self, flat: torch.Tensor) -> list[tuple[Any, str, bool, torch.Tensor]]:
        binding = []
        for spec in self.tensors:
            view = _flat_view(flat, spec)
            for owner, name, is_param in spec.targets:
                binding.append((owner, name, is_param, _like(getattr(owner, name), view) if is_param else view))
        return binding


def _like(param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A parameter of `param`'s class (nn.Parameter, bitsandbytes' Params4bit/Int8Params) over `data`,
    carrying the same attributes (block size, quantization state, ...)."""
    new = torch.Tensor._make_subclass(type(param), data, False)
    new.__dict__.update(param.__dict__)
    return new


def _flat_view(flat: torch.Tensor, spec: _Tensor) -> torch.Tensor:
    return flat[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)


def _layout(module: nn.Module) -> tuple[list[_Tensor], int]:
    """Offsets of every parameter of `module` in a flat buffer, each aligned to ALIGN bytes.

    Parameters keep the dtype the model was loaded in (they are meta tensors of that dtype here).
    """
    entries = [((target,), getattr(target[0], target[1])) for target in _named_tensors(module).values()]
    return _pack(entries)


def _pack(entries: list[tuple[tuple[tuple[Any, str, bool], ...], torch.Tensor]]) -> tuple[list[_Tensor], int]:
    """Lay tensors (real or meta) out one after another, each aligned to ALIGN bytes."""
    specs: list[_Tensor] = []
    offset = 0
    for targets, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(_Tensor(targets, tensor.dtype, tensor.shape, offset, nbytes))
        offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return specs, offset


def _named_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    tensors: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, owner in module.named_modules():
        for name, _ in owner.named_parameters(recurse=False):
            tensors[f"{prefix}.{name}" if prefix else name] = (owner, name, True)
    return tensors


# --- the engine --------------------------------------------------------------------------------


@dataclass
class EngineStats:
    copies: int = 0  # host -> slot copies issued
    bytes_copied: int = 0
    resyncs: int = 0  # the layer order broke (an interrupted forward) and the prefetch queue was rebuilt
    disk_reads: int = 0


@dataclass
class _Slot:
    buffer: torch.Tensor
    ready: Any  # event: the copy into this slot is done
    free: Any  # event: the layer that read this slot is done


class _DiskStager:
    """A thread that reads disk layers into pinned staging buffers ahead of need, in cycle order."""

    def __init__(self, ops: Any, layers: list[OffloadedLayer], buffers: int) -> None:
        self.ops = ops
        self.layers = layers
        self.order = [pos for pos, layer in enumerate(layers) if layer.tier == "disk"]
        size = max(layers[pos].nbytes for pos in self.order)
        self.buffers = [ops.host_buffer(size) for _ in range(min(buffers, len(self.order)))]
        self.released: list[Any] = [None] * len(self.buffers)  # event after which a buffer may be refilled
        self.filled: dict[int, int] = {}  # cycle position -> buffer index
        self.free = deque(range(len(self.buffers)))
        self.next = 0  # index into self.order of the next layer to read
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.closed = False
        self.generation = 0  # bumped by restart_at: a read started before it is stale
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="offload-disk-copy")
        self.thread = threading.Thread(target=self._run, name="offload-disk-reader", daemon=True)
        self.thread.start()

    def restart_at(self, pos: int) -> None:
        """Forget staged layers and continue reading from cycle position `pos` (after a resync)."""
        with self.cond:
            for buffer in self.filled.values():
                self.free.append(buffer)
            self.filled.clear()
            self.generation += 1
            later = [i for i, p in enumerate(self.order) if p >= pos]
            self.next = later[0] if later else 0
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.free:
                    self.cond.wait()
                if self.closed:
                    return
                buffer = self.free.popleft()
                pos = self.order[self.next]
                self.next = (self.next + 1) % len(self.order)
                released = self.released[buffer]
                generation = self.generation
            try:
                if released is not None:
                    self.ops.host_wait(released)  # the previous copy out of this buffer is done
                self.layers[pos].fill(self.buffers[buffer], self.pool)
            except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
                with self.cond:
                    self.error = exc
                    self.cond.notify_all()
                return
            with self.cond:
                if generation == self.generation:
                    self.filled[pos] = buffer
                else:  # restarted while reading: the layer may no longer be next; the buffer is free again
                    self.free.append(buffer)
                self.cond.notify_all()

    def take(self, pos: int, layer_index: int) -> int:
        """Wait until cycle position `pos` is staged; returns its buffer index (give it back after the copy)."""
        with self.cond:
            while pos not in self.filled:
                if self.error is not None:
                    raise RuntimeError(f"reading offloaded layer {layer_index} from disk failed: "
                                       f"{self.error}") from self.error
                self.cond.wait(timeout=1.0)
            return self.filled.pop(pos)

    def give_back(self, buffer: int, after: Any) -> None:
        with self.cond:
            self.released[buffer] = after
            self.free.append(buffer)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
        self.pool.shutdown(wait=True)


class OffloadEngine:
    """Runs the offloaded layers of a model from `slots` reusable device buffers.

    Each forward of an offloaded layer: the compute stream waits for the copy into its slot, the
    layer's parameters are pointed at the slot, and after the layer the slot is refilled with the
    layer `slots` positions later in the cyclic order of offloaded layers (so the next token's
    first offloaded layers load while this token's last layers compute).
    """

    def __init__(self, layers: list[OffloadedLayer], ops: Any, slots: int = 2, disk_buffers: int | None = None,
                 align: bool = False, skip_keys: tuple[str, ...] = ()) -> None:
        """`align`: move each offloaded layer's inputs to the engine's device first (when other GPUs
        run other layers, hidden states and position embeddings may arrive from another GPU);
        `skip_keys` names inputs left where they are (the KV cache: each layer keeps its own)."""
        if not layers:
            raise ValueError("no offloaded layers to run")
        self.layers = sorted(layers, key=lambda layer: layer.index)
        self.ops = ops
        self.stats = EngineStats()
        self.position = {id(layer.module): pos for pos, layer in enumerate(self.layers)}
        size = max(layer.nbytes for layer in self.layers)
        count = max(1, min(slots, len(self.layers)))
        self.slots = [_Slot(ops.device_buffer(size), ops.event(), ops.event()) for _ in range(count)]
        self.resident = len(self.layers) <= count  # every offloaded layer fits in a slot: copy once
        self.stager = (
            _DiskStager(ops, self.layers, disk_buffers or max(2, min(8, STAGING_BYTES // size)))
            if any(layer.tier == "disk" for layer in self.layers) and not self.resident
            else None
        )
        self.queue: deque[tuple[int, int]] = deque()  # (cycle position, slot index), in execution order
        self.lock = threading.Lock()
        self.handles: list[Any] = []
        self._prime(0)
        self.skip_keys = list(skip_keys)
        for layer in self.layers:
            if align:
                self.handles.append(layer.module.register_forward_pre_hook(self._align, with_kwargs=True))
            self.handles.append(layer.module.register_forward_pre_hook(self._before))
            self.handles.append(layer.module.register_forward_hook(self._after))

    # The queue holds the next `len(slots)` layers in cycle order, each in its slot.
    def _prime(self, start: int) -> None:
        self.queue.clear()
        if self.stager is not None:
            self.stager.restart_at(start)
        for i in range(len(self.slots)):
            pos = (start + i) % len(self.layers)
            self._load(pos, i)
            self.queue.append((pos, i))

    def _load(self, pos: int, slot_index: int) -> None:
        layer, slot = self.layers[pos], self.slots[slot_index]
        target = slot.buffer[: layer.nbytes]
        if layer.tier == "disk" and self.stager is not None:
            buffer_index = self.stager.take(pos, self.layers[pos].index)
            source = self.stager.buffers[buffer_index][: layer.nbytes]
            self.ops.copy(target, source, slot.free, slot.ready)
            self.stager.give_back(buffer_index, slot.ready)
            self.stats.disk_reads += 1
        elif layer.tier == "disk":
            staging = self.ops.host_buffer(layer.nbytes)  # resident mode: read once
            layer.fill(staging)
            self.ops.copy(target, staging, slot.free, slot.ready)
            self.ops.host_wait(slot.ready)
        else:
            self.ops.copy(target, layer.host, slot.free, slot.ready)
        self.stats.copies += 1
        self.stats.bytes_copied += layer.nbytes

    def _align(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        device = self.ops.device
        return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=self.skip_keys)

    def _before(self, module: nn.Module, args: Any) -> None:
        pos = self.position[id(module)]
        with self.lock:
            if not self.queue or self.queue[0][0] != pos:
                # A forward was interrupted (exception, cancel) or started elsewhere: rebuild from here.
                self.stats.resyncs += 1
                self._prime(pos)
            slot = self.slots[self.queue[0][1]]
            self.ops.wait(slot.ready)
            self.layers[pos].bind(slot.buffer)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        pos = self.position[id(module)]
        with self.lock:
            if not self.queue or self.queue[0][0] != pos:
                return
            _, slot_index = self.queue.popleft()
            slot = self.slots[slot_index]
            self.ops.record(slot.free)
            if self.resident:
                self.queue.append((pos, slot_index))  # stays loaded; next token uses it as is
                return
            last = self.queue[-1][0] if self.queue else pos
            nxt = (last + 1) % len(self.layers)
            self._load(nxt, slot_index)
            self.queue.append((nxt, slot_index))

    def close(self) -> None:
        """Remove the hooks and free slots, pinned buffers and the disk reader."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        for layer in self.layers:
            layer.host = None
            layer.flat = None  # the memory map of its quantized file
            layer.bindings.clear()
        self.slots.clear()
        self.queue.clear()


# --- attaching to a model loaded with accelerate's hooks ---------------------------------------


def _strip_hooks(module: nn.Module) -> None:
    """Remove accelerate's hooks from a module tree without re-materializing offloaded weights."""
    for sub in module.modules():
        if hasattr(sub, "_old_forward"):
            sub.forward = sub._old_forward
            del sub._old_forward
        if hasattr(sub, "_hf_hook"):
            del sub._hf_hook


def _accelerate_sources(layer: nn.Module, files: dict[str, SafetensorsFile]) -> dict[str, Callable[[], torch.Tensor]]:
    """For every parameter of an offloaded layer, a function returning its CPU value.

    accelerate keeps offloaded weights in each leaf module's hook (`weights_map`): CPU tensors for
    the cpu tier; for the disk tier an index pointing into the checkpoint's safetensors files,
    which are read here directly through a memory map (`files` caches one per file).
    """
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for prefix, owner in layer.named_modules():
        hook = getattr(owner, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook]) if hook is not None else []
        weights = next((h.weights_map for h in hooks if getattr(h, "offload", False) and h.weights_map is not None),
                       None)
        for name, param in owner.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if weights is None:  # not offloaded (already a real tensor)
                sources[full] = (lambda p=param: p.data)
                continue
            entry = _index_entry(weights, name)
            if entry is not None and entry.get("safetensors_file"):
                path = entry["safetensors_file"]
                if path not in files:
                    files[path] = SafetensorsFile(path)
                sources[full] = (lambda f=files[path], n=entry.get("weight_name"): f.tensor(n))
            else:
                sources[full] = (lambda w=weights, n=name: w[n])
    return sources


def _index_entry(weights: Any, name: str) -> dict | None:
    """accelerate's disk index entry for a parameter (None when it is held in memory)."""
    dataset, prefix = getattr(weights, "dataset", None), getattr(weights, "prefix", "")
    key = f"{prefix}{name}"
    if dataset is None or key in getattr(dataset, "state_dict", {}):
        return None
    entry = getattr(dataset, "index", {}).get(key)
    return entry if isinstance(entry, dict) and entry.get("weight_name") else None


def attach_engine(model: nn.Module, layer_prefix: str, device_map: dict[str, Any], compute_device: torch.device,
                  slots: int = 2, ops: Any | None = None, tiers: tuple[str, ...] | None = None,
                  quant: QuantSettings | None = None, cache_dir: Path | None = None,
                  align: bool = False) -> OffloadEngine | None:
    """Take over the offloaded decoder layers of a model dispatched by accelerate.

    Offloaded means "cpu" and "disk" when a GPU computes, only "disk" when the CPU does (`tiers`
    overrides that, for tests). Layers on "cpu" become pinned flat buffers (the CPU copies
    accelerate held are dropped); layers on "disk" are read ahead by a thread. Other modules keep
    accelerate's hooks. Returns None when no decoder layer is offloaded.

    With `quant` enabled (compressed transfer), each offloaded layer's linear modules are quantized
    on the compute device as transformers quantizes resident ones (see `pipeline.compress`): its
    flat buffer holds the quantized bytes, and disk layers are rewritten quantized into `cache_dir`
    (the model's offload folder), so RAM, disk reads and the link all carry the quantized form.

    `compute_device` is the GPU that runs the offloaded layers: with several GPUs, the one running
    the layers just before them (`Plan.offload_device`), with `align` moving their inputs there.
    """
    tiers = tiers or (("cpu", "disk") if compute_device.type != "cpu" else ("disk",))
    layer_list = model.get_submodule(layer_prefix)
    ops = ops or (CudaOps(compute_device) if compute_device.type == "cuda" else SyncOps(compute_device))
    compressed = quant is not None and quant.enabled
    convert = linears_by_layer(model, layer_prefix, quant) if compressed else {}
    layers: list[OffloadedLayer] = []
    files: dict[str, SafetensorsFile] = {}
    for index, module in enumerate(layer_list):
        tier = device_map.get(f"{layer_prefix}.{index}")
        if tier not in tiers:
            continue
        sources = _accelerate_sources(module, files)
        held = _cpu_weight_keys(module)
        if compressed:
            layer = _quantized_layer(index, module, tier, convert.get(index, set()), sources, quant, compute_device,
                                     ops, cache_dir)
        else:
            layer = _plain_layer(index, module, tier, sources, compute_device, ops)
        for state, key in held:  # the pinned buffer (or the disk) now holds the only host copy
            state.pop(key, None)
        for sub in module.modules():  # buffers (rare in layers) live on the compute device for good
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and buf.device.type != "meta":
                    setattr(sub, name, buf.to(compute_device))
        _strip_hooks(module)
        layers.append(layer)
    if not layers:
        return None
    skip = getattr(model, "_skip_keys_device_placement", None) or ()
    return OffloadEngine(layers, ops, slots=slots, align=align, skip_keys=(skip,) if isinstance(skip, str) else tuple(skip))


def _plain_layer(index: int, module: nn.Module, tier: str, sources: dict[str, Callable[[], torch.Tensor]],
                 compute_device: torch.device, ops: Any) -> OffloadedLayer:
    """A layer moved as loaded (16/32-bit): cpu layers copied once into pinned memory, disk layers read
    from their safetensors files on every pass."""
    specs, nbytes = _layout(module)
    names = list(_named_tensors(module))

    def read() -> Iterator[tuple[_Tensor, torch.Tensor]]:
        for full, spec in zip(names, specs):
            yield spec, sources[full]()

    layer = OffloadedLayer(index, module, tier, specs, nbytes, read=read)
    if tier == "cpu":
        layer.host = ops.host_buffer(nbytes)
        layer.fill(layer.host)
        layer.read = None
    for spec in specs:  # fresh parameters on the compute device (meta ones cannot take its tensors)
        for owner, name, _ in spec.targets:
            empty = torch.empty(0, dtype=spec.dtype, device=compute_device)
            owner._parameters[name] = nn.Parameter(empty, requires_grad=False)
    return layer


def _quantized_layer(index: int, module: nn.Module, tier: str, convert: set[str],
                     sources: dict[str, Callable[[], torch.Tensor]], quant: QuantSettings,
                     compute_device: torch.device, ops: Any, cache_dir: Path | None) -> OffloadedLayer:
    """A layer quantized once at load: cpu layers keep the quantized bytes pinned; disk layers are
    written quantized to one file in `cache_dir` and read back from its memory map on every pass."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float16)
    pieces = quantize_layer(module, convert, sources, quant, dtype, compute_device)
    specs, nbytes = _pack([(piece.targets, piece.value) for piece in pieces])
    layer = OffloadedLayer(index, module, tier, specs, nbytes)
    host = ops.host_buffer(nbytes) if tier == "cpu" else torch.zeros(nbytes, dtype=torch.uint8)
    for spec, piece in zip(specs, pieces):
        _flat_view(host, spec).copy_(piece.value)
    if tier == "cpu":
        layer.host = host
        return layer
    if cache_dir is None:
        raise ValueError(f"layer {index} is on disk: compressed transfer needs a folder for its quantized copy")
    from safetensors.torch import save_file

    path = Path(cache_dir) / f"layer-{index}.{quant.mode}.safetensors"
    save_file({"flat": host}, str(path))
    layer.flat = SafetensorsFile(str(path)).tensor("flat")
    return layer


def _cpu_weight_keys(layer: nn.Module) -> list[tuple[dict, str]]:
    """Where accelerate holds a layer's CPU weights (its loader's state dict holds the only reference)."""
    keys = []
    for owner in layer.modules():
        hook = getattr(owner, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            weights = getattr(h, "weights_map", None)
            state = getattr(getattr(weights, "dataset", None), "state_dict", None)
            prefix = getattr(weights, "prefix", None)
            if isinstance(state, dict) and prefix is not None:
                keys += [(state, f"{prefix}{name}") for name, _ in owner.named_parameters(recurse=False)]
    return keys
