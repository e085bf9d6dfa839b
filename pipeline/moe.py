"""Mixture-of-experts layers: quantized experts, and only the routed experts cross the link.

transformers 5 keeps a MoE layer's experts as two fused 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]). bitsandbytes replaces only `nn.Linear`, so with "4-bit" on, those stayed
16-bit (Mixtral-8x7B: 45 of its 46.7 B parameters), and the offload engine copied an offloaded layer's
experts whole for every token although the router picks a few (Mixtral 2 of 8, Qwen3-30B-A3B 8 of 128).

Here, while a MoE model is built, its experts class is swapped for `RoutedExperts`, which has no
parameters: transformers then leaves the experts' checkpoint tensors unread, and `fill_experts` reads
them expert by expert from the safetensors files, quantizes each one on the compute device with
bitsandbytes' functional API (nf4: blocks of 64, fp32 absmax; int8: per-row absmax) and stores it as
one flat byte row per expert, where the plan put its layer: on the GPU, in pinned RAM, or in a file in
the offload folder. No 16-bit copy of the experts is ever held whole.

For an offloaded layer the offload engine streams the layer's other weights as before (the experts
are not parameters, so it does not see them), and the experts module fetches only the experts its
router selected for this step, through an LRU `ExpertCache` of expert slots on the GPU (inside the
GPU budget), or computes them on the CPU where the load-time measurement says that is faster.

bitsandbytes has no module for 3-D expert weights (its Linear4bit is one 2-D matrix, a module per
expert would multiply Python overhead by E and break the flat per-expert byte rows that the cache
copies), hence this module; the kernels are bitsandbytes' own (`quantize_4bit`, `matmul_4bit`,
`dequantize_4bit`, `int8_vectorwise_quant`/`_dequant`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

BLOCKSIZE = 64  # nf4 block size: one fp32 absmax per 64 weights (bitsandbytes' default)
ALIGN = 64  # byte alignment of each segment inside an expert's row
MODES = ("none", "int8", "nf4", "fp4")
ROUTES = ("auto", "gpu", "cpu", "whole")  # offloaded experts: measured choice, GPU cache, CPU compute, whole layer
# Checkpoint names of one expert's three matrices: Mixtral's w1/w3/w2, the Qwen/DeepSeek family's *_proj.
ROLE_NAMES = {"gate": ("w1", "gate_proj"), "up": ("w3", "up_proj"), "down": ("w2", "down_proj")}


def experts_param_names(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Modules holding fused 3-D experts in the layout `RoutedExperts` runs, by name: (E, I, H).

    The layout is transformers' default one (`use_experts_implementation`): gate and up concatenated,
    not transposed, no biases. Others (gpt-oss' transposed experts with biases, ...) are left alone."""
    found = {}
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
            continue
        if gate_up.ndim != 3 or down.ndim != 3 or not hasattr(module, "act_fn"):
            continue
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) \
                or not getattr(module, "has_gate", True) or not getattr(module, "is_concatenated", True):
            continue
        experts, two_i, hidden = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (experts, hidden, two_i // 2):
            continue
        found[name] = (experts, two_i // 2, hidden)
    return found


def expert_bytes(mode: str, intermediate: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one expert's row (gate_up and down, with their scales) as `RoutedExperts` stores it."""
    return ExpertLayout.build(mode, intermediate, hidden, dtype).nbytes


# --- one expert's bytes ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, row: torch.Tensor) -> torch.Tensor:
        return row[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """Where each piece of one expert sits in its flat uint8 row."""

    mode: str
    dtype: torch.dtype  # the model's compute dtype
    matrices: dict[str, tuple[int, int]]  # "gate_up": (2I, H), "down": (H, I)
    segments: dict[str, _Segment]
    nbytes: int

    @classmethod
    def build(cls, mode: str, intermediate: int, hidden: int, dtype: torch.dtype) -> ExpertLayout:
        if mode not in MODES:
            raise ValueError(f"expert quantization {mode!r} is not supported; accepted: {list(MODES)}")
        matrices = {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}
        pieces: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, (rows, cols) in matrices.items():
            n = rows * cols
            if mode == "none":
                pieces.append((name, dtype, (rows, cols)))
            elif mode == "int8":
                pieces += [(name, torch.int8, (rows, cols)), (f"{name}.scale", torch.float32, (rows,))]
            else:
                pieces += [(name, torch.uint8, ((n + 1) // 2, 1)), (f"{name}.absmax", torch.float32, (-(-n // BLOCKSIZE),))]
        segments, offset = {}, 0
        for name, piece_dtype, shape in pieces:
            nbytes = piece_dtype.itemsize * int(torch.Size(shape).numel())
            segments[name] = _Segment(offset, nbytes, piece_dtype, shape)
            offset += -(-nbytes // ALIGN) * ALIGN
        return cls(mode, dtype, matrices, segments, offset)

    def quantize(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write one expert's 16/32-bit matrices ({"gate_up", "down"} on the compute device) into `out`."""
        import bitsandbytes.functional as bnbf

        for name, weight in weights.items():
            weight = weight.to(self.dtype)
            if self.mode == "none":
                self.segments[name].view(out).copy_(weight)
            elif self.mode == "int8":
                q, scale, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
                self.segments[name].view(out).copy_(q)
                self.segments[f"{name}.scale"].view(out).copy_(scale)
            else:
                q, state = bnbf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type=self.mode,
                                              compress_statistics=False)
                self.segments[name].view(out).copy_(q.view(-1, 1))
                self.segments[f"{name}.absmax"].view(out).copy_(state.absmax)

    def dequantize(self, row: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One matrix of one expert, back in `dtype` (the model's by default)."""
        import bitsandbytes.functional as bnbf

        dtype = dtype or self.dtype
        if self.mode == "none":
            return self.segments[name].view(row).to(dtype)
        if self.mode == "int8":
            q, scale = self.segments[name].view(row), self.segments[f"{name}.scale"].view(row)
            return bnbf.int8_vectorwise_dequant(q, scale).to(dtype)
        return bnbf.dequantize_4bit(self.segments[name].view(row), self._state(row, name, dtype)).to(dtype)

    def linear(self, x: torch.Tensor, row: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W.T for one of the expert's matrices, W read from its row (on x's device)."""
        if self.mode in ("nf4", "fp4") and x.is_cuda:
            import bitsandbytes as bnb

            # bitsandbytes picks its kernel: a fused 4-bit GEMV for one token, dequantize + matmul for more.
            q = self.segments[name].view(row)
            return bnb.matmul_4bit(x, q.t(), quant_state=self._state(row, name, x.dtype))
        return F.linear(x, self.dequantize(row, name, x.dtype))

    def _state(self, row: torch.Tensor, name: str, dtype: torch.dtype) -> Any:
        from bitsandbytes.functional import QuantState, get_4bit_type

        code = _CODES.get((self.mode, row.device))
        if code is None:
            code = _CODES[(self.mode, row.device)] = get_4bit_type(self.mode, device=row.device)
        return QuantState(absmax=self.segments[f"{name}.absmax"].view(row), shape=torch.Size(self.matrices[name]),
                          code=code, blocksize=BLOCKSIZE, quant_type=self.mode, dtype=dtype)


_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}


# --- the GPU cache of experts ------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0
    cpu_experts: int = 0  # experts computed on the CPU (route "cpu")


class ExpertCache:
    """Slots of one expert's bytes each on the compute device, shared by a model's offloaded MoE layers,
    most recently used kept. Copies run on a side CUDA stream so the next experts arrive while the
    current one computes; a slot is overwritten only after the compute that read it is done."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int) -> None:
        if slots < 2:
            raise ValueError(f"an expert cache needs at least 2 slots (got {slots})")
        self.device = device
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.pool = torch.empty((slots, slot_bytes), dtype=torch.uint8, device=device)
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self.free = list(range(slots))
        self.busy: set[int] = set()
        self.stats = CacheStats()
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.released: dict[int, Any] = {}  # slot -> event recorded after its last compute

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def _slot(self) -> int:
        if self.free:
            return self.free.pop()
        for key, slot in self.where.items():  # least recently used first
            if slot not in self.busy:
                del self.where[key]
                return slot
        raise RuntimeError("every expert slot is in use")  # cannot happen: lookahead < slots

    def _fetch(self, key: tuple[int, int], source: torch.Tensor) -> tuple[int, Any]:
        slot = self.where.get(key)
        if slot is not None:
            self.stats.hits += 1
            self.where.move_to_end(key)
            return slot, None
        self.stats.misses += 1
        slot = self._slot()
        event = None
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if slot in self.released:
                    self.stream.wait_event(self.released.pop(slot))
                self.pool[slot].copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            self.pool[slot].copy_(source)
        self.stats.bytes_copied += source.numel()
        self.where[key] = slot
        return slot, event

    def stream_experts(self, layer: int, experts: list[int], rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (expert, its row on the compute device) for `experts`, fetching ahead of the consumer."""
        ahead = min(self.slots - 1, 8)
        queue: deque[tuple[int, int, Any]] = deque()
        pending = iter(experts)
        done = False
        # With slots to spare, the slots read in this call are released together at its end (one event);
        # when they are scarce a slot may be needed again within the call, so each is released after use.
        scarce = self.slots < len(experts) + ahead + 1
        used: list[int] = []
        while True:
            while not done and len(queue) < ahead:
                expert = next(pending, None)
                if expert is None:
                    done = True
                    break
                slot, event = self._fetch((layer, expert), rows[expert])
                self.busy.add(slot)
                queue.append((expert, slot, event))
            if not queue:
                break
            expert, slot, event = queue.popleft()
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            try:
                yield expert, self.pool[slot]
            finally:
                if scarce:
                    self._release([slot])
                else:
                    used.append(slot)
        self._release(used)

    def _release(self, slots: list[int]) -> None:
        if slots and self.cuda:
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.device))
            for slot in slots:
                self.released[slot] = released
        self.busy.difference_update(slots)


# --- the experts module ------------------------------------------------------------------------


class RoutedExperts(nn.Module):
    """Drop-in for transformers' fused experts module (same forward signature and result) whose experts
    are flat byte rows, quantized or not, read wherever the plan put them. It has no parameters, so
    transformers does not load the experts and the offload engine does not stream them."""

    def __init__(self, config: Any, reference: type[nn.Module]) -> None:
        super().__init__()
        with torch.device("meta"):
            ref = reference(config)
        experts, two_i, hidden = ref.gate_up_proj.shape
        self.num_experts, self.intermediate_dim, self.hidden_dim = experts, two_i // 2, hidden
        self.act_fn = ref.act_fn
        self.reference_class = reference
        self.config = config
        # transformers' weight initialization touches these two names on its experts class (which this
        # module stands in for while the model is built): empty placeholders, not parameters.
        self.gate_up_proj = torch.empty(0)
        self.down_proj = torch.empty(0)
        self.layout: ExpertLayout | None = None
        self.rows: torch.Tensor | None = None  # [E, layout.nbytes] uint8: GPU, pinned RAM, or a memory-mapped file
        self.home = ""  # "gpu", "cpu" or "disk"
        self.layer = -1  # index in the model's layer list (the cache's key)
        self.route = "resident"  # "resident", "gpu" (through `cache`), "cpu" (computed there), "whole"
        self.cache: ExpertCache | None = None
        self.cpu_stats: CacheStats | None = None

    def extra_repr(self) -> str:
        mode = self.layout.mode if self.layout else "unfilled"
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, " \
               f"mode={mode}, home={self.home}, route={self.route}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.layout is None or self.rows is None:
            raise RuntimeError("RoutedExperts used before fill_experts() gave it its weights")
        device = hidden_states.device
        if self.route == "cpu" and device.type != "cpu":
            out = self._compute(hidden_states.to("cpu", torch.float32), top_k_index.cpu(), top_k_weights.cpu(),
                                torch.device("cpu"))
            return out.to(device, hidden_states.dtype)
        return self._compute(hidden_states, top_k_index, top_k_weights, device)

    def _compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
        assert self.layout is not None and self.rows is not None
        out = torch.zeros_like(hidden_states)
        one_token = hidden_states.shape[0] == 1
        if one_token:  # decoding: one host sync for the routed experts, no index searches (each one a sync)
            routed = sorted((e, pos) for pos, e in enumerate(top_k_index[0].tolist()) if e < self.num_experts)
            hit = [e for e, _ in routed]
        else:  # the experts this step's tokens were routed to (transformers skips index E, a padding value)
            hit = [e for e in torch.unique(top_k_index).tolist() if e < self.num_experts]
        whole = self._parameters.get("whole")  # route "whole": the engine (or accelerate) brought every expert
        if whole is not None and whole.device == device:
            rows: Iterator[tuple[int, torch.Tensor]] = ((e, whole[e]) for e in hit)
        elif self.cache is not None and self.cache.device == device:
            rows = self.cache.stream_experts(self.layer, hit, self.rows)
        elif self.rows.device == device:
            rows = ((e, self.rows[e]) for e in hit)
        else:  # no cache: copy each routed expert over (accelerate-style, for an unplanned device)
            rows = ((e, self.rows[e].to(device)) for e in hit)
        if self.route == "cpu" and self.cpu_stats is not None:
            self.cpu_stats.cpu_experts += len(hit)
        if one_token:
            for (expert, row), (_, pos) in zip(rows, routed):
                # transformers' eager arithmetic for its one token: expert ids ascending, each output times
                # its routing weight, added in the hidden states' dtype.
                gate, up = self.layout.linear(hidden_states, row, "gate_up").chunk(2, dim=-1)
                current = self.layout.linear(self.act_fn(gate) * up, row, "down") * top_k_weights[:, pos, None]
                out += current.to(out.dtype)
            return out
        by_k = top_k_index.t()
        for expert, row in rows:
            # Same order and arithmetic as transformers' eager experts forward.
            top_k_pos, token_idx = torch.where(by_k == expert)
            gate, up = self.layout.linear(hidden_states[token_idx], row, "gate_up").chunk(2, dim=-1)
            current = self.layout.linear(self.act_fn(gate) * up, row, "down")
            current = current * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, current.to(out.dtype))
        return out

    def dequantized(self) -> nn.Module:
        """transformers' own experts module holding this module's weights dequantized to the model's dtype:
        the reference the quantized experts are tested against."""
        assert self.layout is not None and self.rows is not None
        with torch.device("cpu"):
            ref = self.reference_class(self.config)
        rows = self.rows.cpu()
        with torch.no_grad():
            for name in ("gate_up", "down"):
                full = torch.stack([self.layout.dequantize(rows[e], name) for e in range(self.num_experts)])
                getattr(ref, f"{name}_proj" if name == "down" else "gate_up_proj").data = full
        return ref.to(self.layout.dtype).eval()


def _experts_classes(config: Any) -> tuple[Any, list[str]]:
    """The modeling module of `config`'s causal LM and the names of its fused experts classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None, []
    module = sys.modules.get(model_class.__module__)
    if module is None:
        return None, []
    names = []
    for name, obj in vars(module).items():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and name.endswith("Experts") \
                and not issubclass(obj, RoutedExperts):
            with torch.device("meta"):
                try:
                    instance = obj(config)
                except Exception:  # noqa: BLE001 - a class this config does not build is not ours to swap
                    continue
            wrapper = nn.Module()
            wrapper.add_module("experts", instance)
            if experts_param_names(wrapper):
                names.append(name)
    return module, names


def has_routed_experts(config: Any) -> bool:
    return bool(_experts_classes(config)[1])


@contextlib.contextmanager
def routed_experts(config: Any) -> Iterator[bool]:
    """While a model of `config` is built inside this context, its fused experts modules are
    `RoutedExperts` (without parameters, so from_pretrained reads none of the experts' tensors).
    Callers hold planning.MODEL_BUILD_LOCK: this patches the modeling module."""
    module, names = _experts_classes(config)
    if not names:
        yield False
        return
    saved = {name: getattr(module, name) for name in names}

    def stand_in(reference: type[nn.Module]) -> type[RoutedExperts]:
        class Routed(RoutedExperts):
            def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(config, reference)

        Routed.__name__ = Routed.__qualname__ = f"Routed{reference.__name__}"
        return Routed

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    ignored = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected", None)
    try:
        for name, cls in saved.items():
            setattr(module, name, stand_in(cls))
        # The checkpoint's expert tensors are read by fill_experts, not by transformers: not "unexpected".
        model_class._keys_to_ignore_on_load_unexpected = [*(ignored or []), r"\.experts\."]
        yield True
    finally:
        for name, cls in saved.items():
            setattr(module, name, cls)
        if ignored is None:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = ignored


# --- reading, quantizing and placing the experts -----------------------------------------------


class _Checkpoint:
    """The safetensors files of a checkpoint folder, opened once, by tensor name."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {str(folder)!r}: MoE experts are read from safetensors")
        self.handles = [safe_open(str(path), framework="pt") for path in files]
        self.where = {key: handle for handle in self.handles for key in handle.keys()}

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def get_expert(self, name: str, expert: int) -> torch.Tensor:
        """One expert of a fused 3-D tensor, read alone (not the whole tensor once per expert)."""
        return self.where[name].get_slice(name)[expert]

    def expert_names(self, layer_path: str) -> dict[str, dict[int, str]] | dict[str, str]:
        """Checkpoint names of one layer's experts: per expert and role ({"gate": {0: name, ...}, ...}),
        or fused 3-D tensors ({"gate_up_proj": name, "down_proj": name})."""
        pattern = re.compile(rf"^{re.escape(layer_path)}\.(?:[^.]+\.)*experts\.(\d+)\.([a-z0-9_]+)\.weight$")
        per_role: dict[str, dict[int, str]] = {role: {} for role in ROLE_NAMES}
        fused: dict[str, str] = {}
        for key in self.where:
            match = pattern.match(key)
            if match:
                for role, names in ROLE_NAMES.items():
                    if match.group(2) in names:
                        per_role[role][int(match.group(1))] = key
            elif key.startswith(layer_path + ".") and re.search(r"\.experts\.(gate_up_proj|down_proj)$", key):
                fused[key.rsplit(".", 1)[1]] = key
        if len(fused) == 2:
            return fused
        return per_role


def checkpoint_folder(source: str | Path, local: bool) -> Path:
    """The folder holding a model's safetensors files (a local path, or its hub snapshot in the cache)."""
    if local:
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))


def fill_experts(model: nn.Module, folder: Path, tiers: dict[str, str], mode: str, dtype: torch.dtype,
                 compute_device: torch.device, offload_dir: Path | None) -> list[RoutedExperts]:
    """Read, quantize (`mode`) and place every RoutedExperts module's experts.

    `tiers` maps each experts module's name to its layer's place in the plan: a CUDA device ("cuda:1"),
    "cpu" or "disk". Each expert is read from the memory-mapped checkpoint, quantized on that GPU (on
    `compute_device` for the other tiers) and written to its layer's home: GPU memory, pinned RAM (when
    a GPU will fetch from it), or one file per layer in `offload_dir`, memory-mapped back."""
    checkpoint = _Checkpoint(folder)
    pinned = compute_device.type == "cuda"
    modules = []
    for name, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        layer_path, index = _layer_of(name)
        module.layer = index
        layout = ExpertLayout.build(mode, module.intermediate_dim, module.hidden_dim, dtype)
        tier = tiers.get(name, str(compute_device) if pinned else "cpu")
        names = checkpoint.expert_names(layer_path)
        on_gpu = tier.startswith("cuda")
        quantize_on = torch.device(tier) if on_gpu else compute_device
        if on_gpu:
            rows = torch.empty((module.num_experts, layout.nbytes), dtype=torch.uint8, device=quantize_on)
        elif tier == "cpu":
            rows = torch.empty((module.num_experts, layout.nbytes), dtype=torch.uint8, pin_memory=pinned)
        else:
            if offload_dir is None:
                raise ValueError(f"{name} is planned on disk but there is no offload folder")
            rows = torch.empty((module.num_experts, layout.nbytes), dtype=torch.uint8)
        # Quantized straight into the row where the rows live on the quantizing device, else staged there.
        staging = None if rows.device == quantize_on else torch.empty(layout.nbytes, dtype=torch.uint8,
                                                                      device=quantize_on)
        for expert in range(module.num_experts):
            weights = _read_expert(checkpoint, names, expert, name)
            layout.quantize({k: v.to(quantize_on) for k, v in weights.items()},
                            rows[expert] if staging is None else staging)
            if staging is not None:
                rows[expert].copy_(staging)
        if tier == "disk":
            assert offload_dir is not None
            path = Path(offload_dir) / f"experts-{index}.{mode}.bin"
            rows.numpy().tofile(path)
            rows = _map_file(path, rows.shape)
        module.layout, module.rows, module.home = layout, rows, "gpu" if on_gpu else tier
        module.route = "resident" if (on_gpu or compute_device.type == "cpu") else "gpu"
        modules.append(module)
    return modules


def _map_file(path: Path, shape: torch.Size) -> torch.Tensor:
    """A memory map of a file of uint8 rows (pages come from the page cache as they are used; copy-on-write,
    so nothing is ever written back)."""
    import numpy as np

    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=tuple(shape)))


def _layer_of(name: str) -> tuple[str, int]:
    """("model.layers.3", 3) for "model.layers.3.mlp.experts"."""
    match = re.match(r"^(.*?\.(\d+))\.", name)
    if not match:
        raise ValueError(f"experts module {name!r} is not inside a numbered layer")
    return match.group(1), int(match.group(2))


def _read_expert(checkpoint: _Checkpoint, names: dict, expert: int, module: str) -> dict[str, torch.Tensor]:
    if "gate_up_proj" in names:
        return {"gate_up": checkpoint.get_expert(names["gate_up_proj"], expert),
                "down": checkpoint.get_expert(names["down_proj"], expert)}
    try:
        gate, up, down = (checkpoint.get(names[role][expert]) for role in ("gate", "up", "down"))
    except KeyError:
        raise KeyError(f"the checkpoint has no weights for expert {expert} of {module} "
                       f"(looked for {', '.join(n for ns in ROLE_NAMES.values() for n in ns)})") from None
    return {"gate_up": torch.cat([gate, up], dim=0), "down": down}


# --- choosing how offloaded experts are computed ------------------------------------------------


@dataclass
class MoeInfo:
    """What the loader did with a MoE model's experts (shown with the loaded model and in stats)."""

    mode: str
    route: str  # "resident" (no offloaded experts), "gpu", "cpu" or "whole"
    cache: ExpertCache | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    gpu_ms: float | None = None  # measured: fetch one expert and run one token through it on the GPU
    cpu_ms: float | None = None  # measured: run one token through one expert on the CPU
    modules: list[RoutedExperts] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"experts {self.mode if self.mode != 'none' else '16-bit'}"]
        if self.route == "gpu":
            slots = self.cache.slots if self.cache else 0
            parts.append(f"routed experts fetched to a GPU cache of {slots} experts")
        elif self.route == "cpu":
            parts.append("routed experts computed on the CPU")
        elif self.route == "whole":
            parts.append("offloaded layers copied whole (expert routing off)")
        if self.gpu_ms is not None and self.cpu_ms is not None:
            parts.append(f"measured per expert: GPU fetch+compute {self.gpu_ms:.2f} ms, CPU {self.cpu_ms:.2f} ms")
        return "; ".join(parts)

    def snapshot(self) -> tuple[int, int, int]:
        return self.stats.hits, self.stats.misses, self.stats.cpu_experts

    def since(self, before: tuple[int, int, int]) -> str:
        """The stats line's words for what the offloaded experts did after `before` (a snapshot): the
        expert cache's hit rate, or how many experts the CPU computed. The cache is the model's, so
        with several chats at once this counts theirs too."""
        hits, misses, cpu = (now - then for now, then in zip(self.snapshot(), before))
        if self.route == "gpu" and hits + misses:
            return f"expert cache {hits / (hits + misses):.0%} hits ({hits + misses} routed experts)"
        if self.route == "cpu" and cpu:
            return f"{cpu} experts computed on the CPU"
        return ""


def _time(fn: Any, device: torch.device, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def measure_routes(module: RoutedExperts, device: torch.device) -> tuple[float, float]:
    """Milliseconds for one token through one offloaded expert: fetched to the GPU and computed there,
    against computed on the CPU from where it is kept (best of 5 each)."""
    assert module.rows is not None and module.layout is not None
    x = torch.randn(1, module.hidden_dim, dtype=module.layout.dtype, device=device)
    index = torch.zeros(1, 1, dtype=torch.long, device=device)
    weight = torch.ones(1, 1, dtype=torch.float32, device=device)
    scratch = torch.empty(module.layout.nbytes, dtype=torch.uint8, device=device)

    def on_gpu() -> None:
        scratch.copy_(module.rows[0], non_blocking=True)
        gate, up = module.layout.linear(x, scratch, "gate_up").chunk(2, dim=-1)
        module.layout.linear(module.act_fn(gate) * up, scratch, "down")

    def on_cpu() -> None:
        saved = module.route, module.cache, module.cpu_stats
        module.route, module.cache, module.cpu_stats = "cpu", None, None
        try:
            module(x, index, weight)
        finally:
            module.route, module.cache, module.cpu_stats = saved

    on_gpu(), on_cpu()  # warm up (kernels, page cache)
    return _time(on_gpu, device), _time(on_cpu, device)


def set_up_routing(modules: list[RoutedExperts], mode: str, compute_device: torch.device, cache_bytes: int,
                   route: str = "auto") -> MoeInfo:
    """Give the offloaded experts modules their route and, for "gpu", a shared expert cache of
    `cache_bytes` (at least 2 slots). "auto" measures GPU fetch against CPU compute and takes the faster."""
    if route not in ROUTES:
        raise ValueError(f"expert route {route!r} is not supported; accepted: {list(ROUTES)}")
    offloaded = [m for m in modules if m.home != "gpu" and compute_device.type == "cuda"]
    info = MoeInfo(mode=mode, route="resident", modules=modules)
    if not offloaded:
        return info
    gpu_ms = cpu_ms = None
    if route == "auto":
        gpu_ms, cpu_ms = measure_routes(offloaded[0], compute_device)
        route = "cpu" if cpu_ms < gpu_ms else "gpu"
    info.route, info.gpu_ms, info.cpu_ms = route, gpu_ms, cpu_ms
    if route == "gpu":
        slot = offloaded[0].layout.nbytes  # type: ignore[union-attr]
        top_k = max(2, _top_k(offloaded[0].config))
        slots = max(top_k + 1, cache_bytes // slot)
        info.cache = ExpertCache(compute_device, slot, slots)
        info.stats = info.cache.stats
    for module in offloaded:
        module.route = route
        module.cache = info.cache if route == "gpu" else None
        module.cpu_stats = info.stats
    return info


def _top_k(config: Any) -> int:
    return int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "moe_topk", 0) or 2)


def make_whole(modules: list[RoutedExperts], compute_device: torch.device, engine: bool) -> None:
    """The whole-layer baselines: each offloaded experts module's rows become a parameter `whole`, which
    the offload engine streams with the rest of its layer (`engine`; call before it is attached), or
    accelerate's own offload hook moves to `compute_device` for every forward (as it moves any
    offloaded module's weights): every expert crosses the link for every token."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for module in modules:
        if module.home == "gpu":
            continue
        assert module.rows is not None
        rows = module.rows if module.home == "cpu" else module.rows.clone()
        module.whole = nn.Parameter(rows, requires_grad=False)
        module.route = "whole"
        if not engine:
            add_hook_to_module(module, AlignDevicesHook(execution_device=compute_device, offload=True,
                                                        weights_map={"whole": rows}))
