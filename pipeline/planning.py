"""Device-map planning: which tier (GPU i, CPU, disk) holds each block, decided before any weight is read.

Pure: takes a model config, budgets and quantization settings; builds the model on the meta
device, ties its weights, and asks accelerate's `infer_auto_device_map` for an explicit dict map.
No CUDA calls, no weights read.
"""

from __future__ import annotations

import json
import math
import logging
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .budgets import Budgets, GiB
from .errors import ConfigError, DoesNotFitError, ModelSourceError
from .presets import Preset
from .moe import expert_bytes, experts_param_names, has_routed_experts
from .quantization import (
    CPU_4BIT_BLOCK_N,
    QuantSettings,
    cpu_4bit_unsupported,
    quantized_weight_names,
    special_dtypes,
)

logger = logging.getLogger(__name__)

Device = int | str  # accelerate's words: GPU index, "cpu", "disk"

# Building a model (accelerate's `init_empty_weights`, transformers' `from_config` and
# `from_pretrained`) patches process-wide state while it runs: `nn.Module.register_parameter`,
# torch's default dtype, `PreTrainedModel.tie_weights`, `torch.linspace`. Each context restores
# what it saw on entry, so two threads building at once restore each other's patches and leave the
# process broken (every later load keeps its weights on the meta device). Every model construction
# in this package holds this lock; a preview asked for during a load waits for the load.
MODEL_BUILD_LOCK = threading.RLock()


@dataclass(frozen=True)
class Block:
    """One bar segment of the plan picture: a layer or another top-level part, in execution order."""

    name: str  # "embeddings", "layer 3", "norm", "lm_head", ...
    device: Device
    bytes: int


@dataclass(frozen=True)
class DraftPlan:
    """A draft model for speculative decoding (pipeline.draft): kept whole on the compute device (GPU, or
    RAM without one), its weights and its KV cache at the context length taken out of that budget."""

    model: str
    source: str
    device: Device  # GPU index or "cpu"
    dtype: torch.dtype
    weight_bytes: int
    cache_bytes: int  # one chat's KV cache at `context_length` (the draft runs for a chat decoding alone)
    context_length: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes

    def describe(self) -> str:
        return (f"draft {self.model} on {device_label(self.device)} ({format_bytes(self.weight_bytes)} + "
                f"{format_bytes(self.cache_bytes)} KV cache for {self.context_length} tokens)")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "source": self.source, "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "weight_bytes": self.weight_bytes,
                "cache_bytes": self.cache_bytes, "context_length": self.context_length}


@dataclass(frozen=True)
class Plan:
    """Where each module goes and what it costs; the loader follows it exactly."""

    model: str
    device_map: dict[str, Device]
    bytes_per_device: dict[Device, int]
    blocks: tuple[Block, ...]
    layers_per_device: dict[Device, tuple[int, ...]]
    dtype: torch.dtype
    quantization: str
    no_split_modules: tuple[str, ...]
    summary: str
    notes: tuple[str, ...] = field(default=())
    skip_modules: tuple[str, ...] = ()  # modules kept unquantized, as priced (the loader passes these to bnb)
    offload_slots: int = 1  # GPU slots reserved for offloaded layers (the engine's, or accelerate's one)
    compressed: bool = False  # offloaded layers are kept and moved quantized (the engine's compressed transfer)
    layer_prefix: str = ""  # the decoder layer list ("model.layers"), "" when the model has none
    offload_gpu: int | None = None  # the GPU whose budget holds the offload slots (the last one with a budget)
    experts: str = ""  # MoE: how the fused experts are stored ("nf4", "int8", "fp4", "none"); "" for other models
    expert_cache_bytes: int = 0  # MoE: GPU budget left for the cache of routed experts of offloaded layers
    expert_bytes: dict[Device, int] = field(default_factory=dict)  # MoE: the experts' share of bytes_per_device
    routed_fraction: float = 1.0  # MoE: the share of a layer's experts one token uses (top_k / experts)
    draft: DraftPlan | None = None  # a draft model beside the target (its bytes are not in bytes_per_device)

    @property
    def offloaded(self) -> bool:
        """True when some modules live on cpu/disk while a GPU computes (or on disk without a GPU)."""
        devices = set(self.device_map.values())
        if any(isinstance(d, int) for d in devices):
            return bool(devices & {"cpu", "disk"})
        return "disk" in devices

    @property
    def compute_device(self) -> str:
        gpus = sorted(d for d in self.device_map.values() if isinstance(d, int))
        return f"cuda:{gpus[0]}" if gpus else "cpu"

    @property
    def offload_device(self) -> str:
        """The GPU that runs offloaded layers with the engine, where its slots are reserved: the last
        GPU with a budget (the plan fills GPU 0..N, then CPU and disk, so offloaded layers follow its
        layers and their hidden states are already there)."""
        return f"cuda:{self.offload_gpu}" if self.offload_gpu is not None else self.compute_device

    @property
    def multi_gpu(self) -> bool:
        """Layers run on more than one GPU: inputs of offloaded layers may come from another GPU."""
        gpus = {d for d in self.device_map.values() if isinstance(d, int)}
        if self.offload_gpu is not None:
            gpus.add(self.offload_gpu)
        return len(gpus) > 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_device.values())

    def share(self) -> dict[str, float]:
        """Fraction of the model's bytes on each tier, e.g. {"GPU": 0.31, "CPU": 0.52, "disk": 0.17}."""
        total = self.total_bytes or 1
        tiers: dict[str, float] = {}
        for device, size in self.bytes_per_device.items():
            tier = "GPU" if isinstance(device, int) else device_label(device)
            tiers[tier] = tiers.get(tier, 0.0) + size / total
        return tiers

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "summary": self.summary,
            "device_map": {k: v for k, v in self.device_map.items()},
            "bytes_per_device": {str(k): v for k, v in self.bytes_per_device.items()},
            "layers_per_device": {str(k): list(v) for k, v in self.layers_per_device.items()},
            "blocks": [{"name": b.name, "device": b.device, "bytes": b.bytes} for b in self.blocks],
            "no_split_modules": list(self.no_split_modules),
            "skip_modules": list(self.skip_modules),
            "notes": list(self.notes),
            "offload_slots": self.offload_slots,
            "compressed": self.compressed,
            "experts": self.experts,
            "expert_cache_bytes": self.expert_cache_bytes,
            "draft": self.draft.to_dict() if self.draft else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def with_draft(plan: Plan, draft: DraftPlan) -> Plan:
    """The target's plan (made with the draft's bytes taken out of its budgets) with the draft shown."""
    return replace(plan, draft=draft, summary=f"{plan.summary} · {draft.describe()}")


def device_label(device: Device) -> str:
    return f"GPU{device}" if isinstance(device, int) else {"cpu": "CPU", "disk": "disk"}.get(device, str(device))


def format_bytes(size: int) -> str:
    if size >= GiB:
        return f"{size / GiB:.1f} GiB"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / 1024:.1f} KiB"


def load_model_config(preset: Preset) -> Any:
    """Read config.json (and nothing else) for a preset, local or on the hub."""
    from transformers import AutoConfig

    source = preset.local_path or preset.source
    if preset.local_path is None:
        _check_hub_reachable(preset.source)
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=preset.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelSourceError(
                f"model {preset.source!r} needs custom code from its repository; it runs only when a preset opts in "
                "with 'trust_remote_code: true'"
            ) from None
        raise ModelSourceError(f"model {preset.source!r}: unsupported config: {exc}") from None
    except OSError as exc:
        reason = _first_line(exc)
        if "connect" in reason or "offline" in reason.lower():
            reason = "not in the local cache, and the Hugging Face hub cannot be reached (offline?)"
        elif "is not a local folder and is not a valid model identifier" in str(exc) or "404" in str(exc):
            reason = "no such model on the Hugging Face hub (check the ID, or log in for gated models)"
        raise ModelSourceError(f"model {preset.source!r}: cannot read its config.json: {reason}") from None
    except Exception as exc:  # a malformed config.json: zero heads, null or mistyped sizes, ...
        logger.info("reading the config of %s failed", preset.source, exc_info=True)
        raise ModelSourceError(
            f"model {preset.source!r}: its config.json is malformed ({type(exc).__name__}: "
            f"{' '.join(line.strip() for line in str(exc).strip().splitlines()[:2])})"
        ) from None
    check_config_sizes(config, preset.source)
    return config


# Sizes no released causal LM comes near; a config beyond them would make planning build millions of
# modules (num_hidden_layers: 20000 took 199 s and 1.5 GB per plan) or overflow.
CONFIG_LIMITS = {
    ("num_hidden_layers", "n_layer", "num_layers"): (1, 1024),
    ("hidden_size", "n_embd", "d_model"): (1, 131072),
    ("num_attention_heads", "n_head"): (1, 4096),
    ("num_key_value_heads",): (1, 4096),
    ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size"): (1, 1 << 20),
    ("vocab_size",): (1, 1 << 22),
    ("num_experts", "num_local_experts", "n_routed_experts"): (1, 4096),
    ("max_position_embeddings", "n_positions"): (1, 1 << 24),
}


def check_config_sizes(config: Any, source: str) -> None:
    """Refuse absurd or malformed sizes with the field and the accepted range, before building anything."""
    for names, (low, high) in CONFIG_LIMITS.items():
        for name in names:
            if name not in getattr(config, "__dict__", {}) and not hasattr(type(config), name):
                continue
            value = getattr(config, name, None)
            if value is None and name in ("n_inner", "num_key_value_heads", "intermediate_size", "num_experts",
                                          "num_local_experts", "n_routed_experts", "moe_intermediate_size", "ffn_dim"):
                continue  # optional: the model derives it
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ModelSourceError(
                    f"model {source!r}: config.json has {name}={value!r}; accepted: an integer from {low} to {high:,}"
                )


HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 2.0


def _check_hub_reachable(repo_id: str) -> None:
    """Fail at once, in one line, for a hub model that is not in the local cache while the hub cannot
    be reached: huggingface_hub would otherwise retry for 20-25 s, warning on every retry."""
    import os
    import socket

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: transformers reads it without the network
    except Exception:  # noqa: BLE001 - an ID the cache cannot even look up fails in from_pretrained, with its reason
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(f"model {repo_id!r} is not in the local Hugging Face cache and offline mode is on "
                               "(HF_HUB_OFFLINE=1); download it first, or give a local folder")
    endpoint = os.environ.get("HF_ENDPOINT", "")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0] if endpoint else HUB_HOST
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=HUB_PROBE_SECONDS).close()
    except (OSError, ValueError):
        raise ModelSourceError(f"model {repo_id!r} is not in the local Hugging Face cache, and the hub ({host}) cannot "
                               f"be reached from this machine; download it where there is a network, or give a "
                               "local folder") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def resolve_dtype(preset_dtype: str, config: Any, on_gpu: bool) -> torch.dtype:
    """The load dtype: explicit in the preset; else the checkpoint's 16-bit type (or fp16) on a GPU,
    and float32 on CPU: CPUs without bf16 kernels run bf16 matmuls tens of times slower (measured
    2.6 vs 145 tokens/s for the demo model on this project's CI machine)."""
    if preset_dtype != "auto":
        return getattr(torch, preset_dtype)
    if not on_gpu:
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float16


def empty_model(config: Any, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the meta device, in the load dtype, with its weights tied: shapes and names, no memory.

    The dtype matters: accelerate prices each tensor at the smaller of its own dtype and the
    requested one, so a bf16 config built as-is would be priced at half its float32 size.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with MODEL_BUILD_LOCK, init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as exc:
        raise ModelSourceError(
            f"model type {getattr(config, 'model_type', '?')!r} is not a causal language model transformers can "
            f"build ({_first_line(exc)})"
        ) from None
    except Exception as exc:  # malformed configs: a division by zero heads, a None where a size belongs, ...
        logger.info("building %s from its config failed", getattr(config, "model_type", "?"), exc_info=True)
        raise ModelSourceError(
            f"model type {getattr(config, 'model_type', '?')!r}: its config.json does not describe a model transformers "
            f"can build ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    # Without this a tied lm_head may land on another tier than the embeddings (KeyError at generate).
    model.tie_weights()
    return model


def _output_layer(model: nn.Module) -> str | None:
    """The name of the output embedding module (usually "lm_head")."""
    try:
        output = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((name for name, module in model.named_modules() if module is output), None) if output else None


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder's repeated blocks: the largest ModuleList in the model."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def no_split_classes(model: nn.Module, override: tuple[str, ...] | None) -> tuple[tuple[str, ...], str | None]:
    """Classes accelerate must not split across devices, and a note when a fallback was used."""
    if override:
        return tuple(override), None
    declared = getattr(model, "_no_split_modules", None)
    if declared:
        return tuple(sorted(declared)), None
    layers = layer_list(model)
    if layers is None:
        return (), "the model declares no _no_split_modules and has no layer list: modules may be split anywhere"
    fallback = tuple(sorted({type(m).__name__ for m in layers[1]}))
    return fallback, f"the model declares no _no_split_modules; using its layer class {', '.join(fallback)} instead"


def plan_device_map(
    config: Any,
    budgets: Budgets,
    quant: QuantSettings = QuantSettings(),
    dtype: torch.dtype = torch.float32,
    *,
    model_name: str = "",
    no_split_override: tuple[str, ...] | None = None,
    trust_remote_code: bool = False,
    offload_slots: int = 1,
    compressed_offload: bool = False,
) -> Plan:
    """Plan where every module of the model goes under the budgets.

    `offload_slots` is how many offloaded layers the GPU holds at once while they run: 1 for
    accelerate's hooks (accelerate reserves it), more for the offload engine, whose extra slots
    are taken from the last GPU's budget (the one that runs offloaded layers). `compressed_offload` (the engine with quantization on a
    GPU) prices offloaded decoder layers at their quantized size in RAM, on disk and in the slots.
    Raises DoesNotFitError when the model does not fit, even with disk.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, find_tied_parameters

    if not isinstance(budgets, Budgets):
        raise ConfigError(f"budgets={budgets!r} must be a Budgets (see pipeline.budgets.make_budgets)")
    model = empty_model(config, trust_remote_code, dtype)
    no_split, note = no_split_classes(model, no_split_override)
    notes = [note] if note else []
    output = _output_layer(model)
    if quant.enabled and output and output not in quant.skip_modules:
        # transformers' own default skip list keeps the output layer unquantized; a user's list replaces
        # that default, and an int8 output layer (tied to the embeddings in most models) breaks every reply.
        quant = replace(quant, skip_modules=quant.skip_modules + (output,))
        notes.append(f"kept unquantized: {output} (the output layer, which transformers never quantizes by default)")
    if quant.enabled and not quantized_weight_names(model, quant):
        linear = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"quantization {quant.mode!r} would change nothing in {model_name or 'this model'} "
            f"(model type {getattr(config, 'model_type', '?')!r}): bitsandbytes converts only plain nn.Linear layers "
            f"and this model's are {', '.join(linear) or 'none'} (or all are in the skip list "
            f"{list(quant.skip_modules)}); choose quantization 'none'"
        )
    if not budgets.has_gpu:
        unsupported = cpu_4bit_unsupported(model, quant)
        if unsupported:
            quant = replace(quant, skip_modules=quant.skip_modules + tuple(unsupported))
            notes.append(
                f"kept unquantized: {', '.join(unsupported[:4])}{' …' if len(unsupported) > 4 else ''} "
                f"(bitsandbytes' CPU 4-bit kernel needs output sizes that are multiples of {CPU_4BIT_BLOCK_N})"
            )
    full = _real_buffer_sizes(model, compute_module_sizes(model, dtype=dtype))
    special = special_dtypes(model, quant)
    priced = _real_buffer_sizes(model, compute_module_sizes(model, dtype=dtype, special_dtypes=special)) if special else full
    # Only experts the loader will swap for pipeline.moe's module (transformers' own model classes) are
    # priced its way; others (remote code, other layouts) stay as transformers loads them.
    experts = experts_param_names(model) if not trust_remote_code and has_routed_experts(config) else {}
    expert_mode = (quant.mode if quant.enabled else "none") if experts else ""
    if experts:
        # Fused experts are stored per expert by pipeline.moe, quantized in every tier (not only on the GPU).
        full, priced = _expert_sizes(full, experts, expert_mode, dtype), _expert_sizes(priced, experts, expert_mode, dtype)
        notes.append(_experts_note(model, experts, expert_mode, quant, dtype))
        if special:  # accelerate's own pricing (infer_auto_device_map) sees them quantized too
            quantized_type = special[next(iter(special))]
            special = {**special, **{f"{n}.{p}": quantized_type for n in experts for p in ("gate_up_proj", "down_proj")}}
    tied = find_tied_parameters(model)

    # Tensors held directly by the modules around the layer list go with the first module (_with_orphans):
    # their bytes are taken from the first device's budget up front.
    orphan_bytes = int(sum(full.get(name, 0) for name in _orphan_names(model)))

    output_tied = bool(output) and any(p.startswith(f"{output}.") for group in tied for p in group)

    def accelerate_map(max_memory: dict[Device, int], special_: dict | None) -> dict[str, Device]:
        return _with_orphans(model, _normalize(model, dict(infer_auto_device_map(
            model,
            max_memory=max_memory,
            no_split_module_classes=list(no_split),
            dtype=dtype,
            special_dtypes=special_,
            clean_result=False,
        ))))

    def output_to_gpu(device_map: dict[str, Device], max_memory: dict[Device, int],
                      special_: dict | None) -> dict[str, Device]:
        """The output layer runs once per token, last: left on the CPU by accelerate's in-order filling, its
        hooks would copy it (Mixtral's 250 MiB) from pageable memory for every token. When layers are
        offloaded anyway, keep it on the GPU and give up that much of the GPU budget to layers."""
        if not output or output_tied or output not in device_map or isinstance(device_map[output], int):
            return device_map
        gpus = [d for d in max_memory if isinstance(d, int)]
        size = int(priced.get(output, 0))
        if not gpus or not size or size > max_memory[gpus[-1]] // 4:
            return device_map
        moved = accelerate_map({**max_memory, gpus[-1]: max_memory[gpus[-1]] - size}, special_)
        if output in moved:
            moved[output] = gpus[-1]
        return moved

    def infer(max_memory: dict[Device, int], special_: dict | None) -> dict[str, Device]:
        if orphan_bytes:
            first = next(iter(max_memory))
            max_memory = {**max_memory, first: max(0, max_memory[first] - orphan_bytes)}
        for _ in range(4):
            device_map = output_to_gpu(accelerate_map(max_memory, special_), max_memory, special_)
            if not experts:
                return device_map
            # accelerate prices 4-bit experts at half a byte per weight; their absmax scales add 1/8 more.
            # Where that overfills a GPU, ask again with that GPU's budget lowered by the excess.
            over = {d: sum(priced.get(k, 0) for k, v in device_map.items() if v == d) - max_memory[d]
                    for d in max_memory if isinstance(d, int)}
            over = {d: v for d, v in over.items() if v > 0}
            if not over:
                return device_map
            max_memory = {d: max(0, int(b - over.get(d, 0))) for d, b in max_memory.items()}
        return device_map

    gpu_memory = {i: b for i, b in enumerate(budgets.gpu) if b > 0}
    # The slots live on the last GPU with a budget: it runs the offloaded layers, which come after its own.
    offload_gpu = max(gpu_memory) if gpu_memory else None
    decoder = layer_list(model)  # (prefix, ModuleList) of the repeated blocks, or None
    max_full = _max_block(model, full)  # the largest layer at its unquantized size
    # accelerate keeps room for one offloaded layer on the first GPU. The engine's slots live on the
    # last GPU: on the first (one GPU) that room is its first slot; with several GPUs all its slots
    # are reserved on the last one.
    extra_slots = (offload_slots if len(gpu_memory) > 1 and offload_slots > 1 else offload_slots - 1)
    slot_reserve = max(0, extra_slots) * max_full if gpu_memory else 0

    def offloads(device_map: dict[str, Device]) -> bool:
        return any(not isinstance(d, int) for d in device_map.values())

    def minus(memory: dict[Device, int], amount: int) -> dict[Device, int]:
        return {**memory, offload_gpu: max(0, memory.get(offload_gpu, 0) - amount)}

    compressed = False
    if not quant.enabled:
        device_map = infer(budgets.max_memory(), None)
        if slot_reserve and offloads(device_map):
            device_map = infer(minus(budgets.max_memory(), slot_reserve), None)
        sizes = {k: full.get(k, 0) for k in device_map}
    elif gpu_memory and compressed_offload and decoder is not None:
        # The engine quantizes offloaded layers too: they cost their quantized size everywhere.
        prefix = decoder[0] + "."
        layer_keys = {k for k in full if k.startswith(prefix) and "." not in k[len(prefix):]}
        device_map = infer(gpu_memory, special)
        if offloads(device_map):
            max_priced = _max_block(model, priced)
            device_map = infer(minus(gpu_memory, max(0, extra_slots) * max_priced), special)
        stored = {k: priced[k] if k in layer_keys else full[k] for k in full}
        device_map = _refill_offloaded(device_map, stored, budgets.cpu - max_full, tied)
        sizes = {k: (priced if isinstance(d, int) else stored).get(k, 0) for k, d in device_map.items()}
        if set(device_map.values()) & {"cpu", "disk"}:
            notes.append(f"offloaded layers are kept in RAM/on disk and sent to the GPU quantized ({quant.mode}) "
                         "by the offload engine")
        compressed = True
    elif gpu_memory:
        # GPU modules are quantized; offloaded ones stay 16/32-bit, priced at full size.
        device_map = infer(gpu_memory, special)
        if offloads(device_map):
            # Offloaded blocks come to the GPU unquantized: reserve their full size (and the extra slots).
            extra = max_full - _max_block(model, priced)
            reduced = minus({i: max(0, b - extra) for i, b in gpu_memory.items()}, slot_reserve)
            device_map = infer(reduced, special)
        device_map = _refill_offloaded(device_map, full, budgets.cpu - max_full, tied)
        sizes = {k: (priced if isinstance(d, int) else full).get(k, 0) for k, d in device_map.items()}
        if set(device_map.values()) & {"cpu", "disk"}:
            notes.append("modules offloaded to CPU/disk stay unquantized (bitsandbytes quantizes only GPU modules)")
    else:
        device_map = infer({"cpu": budgets.cpu}, special)
        sizes = {k: priced.get(k, 0) for k in device_map}
        if "disk" in device_map.values():
            raise DoesNotFitError(
                f"{model_name or 'the model'} needs {format_bytes(sum(sizes.values()))} quantized ({quant.mode}) plus "
                f"room for one block, but the CPU budget is {format_bytes(budgets.cpu)}; without a GPU, quantized "
                "weights cannot be offloaded to disk. Raise the CPU budget, or choose quantization 'none' to use the "
                "disk tier."
            )

    sizes = {k: int(math.ceil(v)) for k, v in sizes.items()}  # 4-bit halves: whole bytes in the plan and its JSON
    bytes_per_device: dict[Device, int] = {}
    for key, device in device_map.items():
        bytes_per_device[device] = bytes_per_device.get(device, 0) + sizes[key]
    _check_fits(bytes_per_device, budgets, model_name)
    _check_tied(device_map, tied)

    blocks, layers = _blocks(model, device_map, sizes)
    order = [d for d in gpu_memory] + ["cpu", "disk"]
    cache_bytes = 0
    if experts and offload_gpu is not None and offloads(device_map) and decoder is not None:
        # Offloaded MoE layers cross the link without their experts: the engine's slots hold the rest of a
        # layer, and what the budget kept for whole offloaded layers caches routed experts instead.
        per_layer_experts = max(_expert_bytes_of_layer(experts, decoder[0], i, expert_mode, dtype)
                                for i in range(len(decoder[1])))
        slots_bytes = offload_slots * max(0, _max_block(model, priced) - per_layer_experts)
        cache_bytes = max(0, budgets.gpu[offload_gpu] - bytes_per_device.get(offload_gpu, 0) - slots_bytes)
        slot = max(expert_bytes(expert_mode, i, h, dtype) for _, i, h in experts.values())
        notes.append(f"offloaded MoE layers send only their routed experts to the GPU; {format_bytes(cache_bytes)} "
                     f"of the GPU budget caches recently used experts (about {int(cache_bytes // slot)}), or the CPU "
                     "computes them where that measures faster at load")
    bytes_per_device = {d: bytes_per_device[d] for d in order if d in bytes_per_device}
    layers = {d: layers[d] for d in order if d in layers}
    return Plan(
        model=model_name,
        device_map=device_map,
        bytes_per_device=bytes_per_device,
        blocks=tuple(blocks),
        layers_per_device=layers,
        dtype=dtype,
        quantization=quant.mode,
        no_split_modules=no_split,
        summary=_summary(blocks, bytes_per_device, order),
        notes=tuple(notes),
        skip_modules=quant.skip_modules if quant.enabled else (),
        offload_slots=offload_slots,
        layer_prefix=decoder[0] if decoder else "",
        offload_gpu=offload_gpu,
        compressed=compressed and any(not isinstance(d, int) for d in device_map.values()),
        experts=expert_mode,
        expert_cache_bytes=int(cache_bytes),
        expert_bytes=_experts_per_device(experts, device_map, expert_mode, dtype),
        routed_fraction=_routed_fraction(config, experts),
    )


def _experts_per_device(experts: dict[str, tuple[int, int, int]], device_map: dict[str, Device], mode: str,
                        dtype: torch.dtype) -> dict[Device, int]:
    per_device: dict[Device, int] = {}
    for name, (count, intermediate, hidden) in experts.items():
        device = planned_device(name, device_map)
        per_device[device] = per_device.get(device, 0) + count * expert_bytes(mode, intermediate, hidden, dtype)
    return per_device


def planned_device(name: str, device_map: dict[str, Device]) -> Device:
    """The device a plan gives module `name`: that of its entry, or of the closest module holding it."""
    best = None
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, device)
    if best is None:
        raise KeyError(f"the plan does not place {name!r}")
    return best[1]


def _routed_fraction(config: Any, experts: dict[str, tuple[int, int, int]]) -> float:
    if not experts:
        return 1.0
    count = max(e for e, _, _ in experts.values())
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    return min(1.0, top_k / count) if top_k > 0 else 1.0


def _expert_sizes(sizes: dict[str, float], experts: dict[str, tuple[int, int, int]], mode: str,
                  dtype: torch.dtype) -> dict[str, float]:
    """Module sizes with each fused experts module priced as pipeline.moe stores it (`mode`, per expert,
    with its scales), and every module holding it adjusted by the difference."""
    sizes = dict(sizes)
    for name, (count, intermediate, hidden) in experts.items():
        _add_to_holders(sizes, name, count * expert_bytes(mode, intermediate, hidden, dtype) - sizes.get(name, 0))
    return sizes


def _expert_bytes_of_layer(experts: dict[str, tuple[int, int, int]], prefix: str, index: int, mode: str,
                           dtype: torch.dtype) -> int:
    head = f"{prefix}.{index}."
    return sum(count * expert_bytes(mode, i, h, dtype) for name, (count, i, h) in experts.items()
               if name.startswith(head))


def _experts_note(model: nn.Module, experts: dict[str, tuple[int, int, int]], mode: str, quant: QuantSettings,
                  dtype: torch.dtype) -> str:
    """What a MoE plan does with the experts, and what stays 16-bit and why."""
    count = len(experts)
    params = sum(e * 3 * i * h for e, i, h in experts.values())
    if mode == "none":
        return f"MoE: {count} experts modules ({params / 1e9:.2f} B parameters) kept {str(dtype).removeprefix('torch.')}, " \
               "stored per expert so offloaded layers can send only their routed experts"
    quantized = set(quantized_weight_names(model, quant)) | {f"{n}.{p}" for n in experts for p in ("gate_up_proj", "down_proj")}
    kept: dict[str, int] = {}
    for name, param in model.named_parameters():
        if name in quantized:
            continue
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = model.get_submodule(owner_name)
        kind = type(owner).__name__ if re.search(r"\.\d+\.", name) else owner_name  # inside a layer: its class
        kept[kind] = kept.get(kind, 0) + param.numel() * param.element_size()
    top = sorted(kept.items(), key=lambda kv: -kv[1])[:4]
    listed = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in top)
    return (f"MoE: {count} experts modules ({params / 1e9:.2f} B parameters) quantized {mode} per expert by Offload "
            f"Chat (bitsandbytes functional, blocks of {64 if mode in ('nf4', 'fp4') else 'one row'}); kept 16-bit: "
            f"{listed} (bitsandbytes converts only nn.Linear; embeddings, the output layer, norms and routers stay "
            "in the model dtype)")


def _max_block(model: nn.Module, sizes: dict[str, int]) -> int:
    layers = layer_list(model)
    if layers is None:
        return 0
    prefix = layers[0]
    return max(sizes[f"{prefix}.{i}"] for i in range(len(layers[1])))


def _owner(param: str, keys: list[str]) -> str | None:
    for key in keys:
        if param == key or param.startswith(key + "."):
            return key
    return None


def _refill_offloaded(
    device_map: dict[str, Device], full: dict[str, int], cpu_capacity: int, tied: list[list[str]]
) -> dict[str, Device]:
    """Re-place the modules accelerate did not put on a GPU: CPU first, then disk, at their full size.

    Keeps the execution order (CPU blocks before disk blocks) and puts a module sharing a tied
    parameter with an already placed one on that module's device.
    """
    keys = list(device_map)
    placed: dict[str, Device] = {}
    used = 0
    cpu_full = False
    for key, device in device_map.items():
        if isinstance(device, int):
            placed[key] = device
            continue
        tied_device = None
        for group in tied:
            if any(p == key or p.startswith(key + ".") for p in group):
                for p in group:
                    owner = _owner(p, keys)
                    if owner in placed and owner != key:
                        tied_device = placed[owner]
        if tied_device is not None:
            placed[key] = tied_device
            continue
        if not cpu_full and used + full.get(key, 0) <= cpu_capacity:
            placed[key] = "cpu"
            used += full.get(key, 0)
        else:
            cpu_full = True
            placed[key] = "disk"
    return placed


def _is_top(key: str, device_map: dict[str, Device]) -> bool:
    return not any(key.startswith(other + ".") for other in device_map if other != key)


def _real_buffer_sizes(model: nn.Module, sizes: dict[str, float]) -> dict[str, float]:
    """accelerate prices a bool tensor at 1/8 byte per element (a bit); torch stores a byte. Correct the
    sizes of bool buffers (gpt_bigcode's causal mask: 1024x1024 priced 128 KiB, stored in 1 MiB) and
    of every module that holds them."""
    sizes = dict(sizes)
    for name, buffer in model.named_buffers():
        if buffer.dtype != torch.bool:
            continue
        _add_to_holders(sizes, name, buffer.numel() - buffer.numel() / 8)
    return sizes


def _add_to_holders(sizes: dict[str, float], name: str, delta: float) -> None:
    """Add `delta` bytes to the size of `name` and of every module holding it (accelerate's size dict)."""
    parts = name.split(".")
    for i in range(len(parts) + 1):
        key = ".".join(parts[:i])
        if key in sizes:
            sizes[key] += delta


def _orphan_names(model: nn.Module) -> list[str]:
    """Parameters and buffers held directly by the modules that contain the layer list."""
    layers = layer_list(model)
    if layers is None:
        return []
    parts = layers[0].split(".")
    names = []
    for i in range(len(parts)):
        prefix = ".".join(parts[:i])
        module = model.get_submodule(prefix) if prefix else model
        dot = prefix + "." if prefix else ""
        names += [dot + n for n, _ in module.named_parameters(recurse=False)]
        names += [dot + n for n, _ in module.named_buffers(recurse=False)]
    return names


def _with_orphans(model: nn.Module, device_map: dict[str, Device]) -> dict[str, Device]:
    """Parameters and buffers held directly by a module whose children are mapped one by one (gpt_bigcode's
    `transformer.bias` mask) are left out of accelerate's map when the model is split: put them with the
    first module that runs, where the forward pass starts (in memory: a buffer such as a causal mask is
    built at init, not read from the checkpoint, so it never goes to disk)."""
    if not device_map:
        return device_map
    first = next((d for d in device_map.values() if d != "disk"), "cpu")
    named = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in named:
        parts = name.split(".")
        covered = any(".".join(parts[:i]) in device_map for i in range(len(parts) + 1))
        if not covered:
            device_map[name] = first
    return device_map


def _normalize(model: nn.Module, device_map: dict[str, Device]) -> dict[str, Device]:
    """One entry per layer at least: expand entries that contain the layer list, drop covered children.

    accelerate maps a whole subtree to one device when it fits ("" or "model.layers"); the plan
    picture and the offload engine need each layer's device, so such entries are split into
    their children, in module order, down to the individual layers.
    """
    device_map = {k: d for k, d in device_map.items() if _is_top(k, device_map)}
    layers = layer_list(model)
    if layers is None:
        return device_map
    target = layers[0]
    modules = dict(model.named_modules())
    out: dict[str, Device] = {}
    for key, device in device_map.items():
        stack = [key]
        while stack:
            name = stack.pop(0)
            contains_layers = name == "" or target == name or target.startswith(name + ".")
            if not contains_layers:
                out[name] = device
                continue
            module = modules[name]
            prefix = f"{name}." if name else ""
            children = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
            children += [f"{prefix}{n}" for n, _ in module.named_children()]
            children += [f"{prefix}{n}" for n, _ in module.named_buffers(recurse=False)]
            stack = children + stack
    return out


def _check_fits(bytes_per_device: dict[Device, int], budgets: Budgets, model_name: str) -> None:
    on_disk = bytes_per_device.get("disk", 0)
    if on_disk == 0:
        return
    total = sum(bytes_per_device.values())
    memory = total - on_disk
    name = model_name or "the model"
    if not budgets.disk:
        raise DoesNotFitError(
            f"{name} does not fit: it needs {format_bytes(total)} but the GPU and CPU budgets hold only "
            f"{format_bytes(memory)} of it (one block's worth is kept free for offloaded layers); "
            f"{format_bytes(on_disk)} would have to go to disk, which is off. Turn disk offload on or raise the budgets."
        )
    if budgets.disk_cap is not None and on_disk > budgets.disk_cap:
        raise DoesNotFitError(
            f"{name} does not fit even with disk: {format_bytes(on_disk)} would go to disk but the disk cap is "
            f"{format_bytes(budgets.disk_cap)}. Raise the disk cap or the GPU/CPU budgets."
        )


def _check_tied(device_map: dict[str, Device], tied: list[list[str]]) -> None:
    keys = list(device_map)
    for group in tied:
        devices = {device_map[o] for p in group if (o := _owner(p, keys)) is not None}
        assert len(devices) <= 1, f"tied parameters {group} split over {devices}"


_EMBED = re.compile(r"(embed|wte|wpe|word_embeddings|embed_in)", re.I)


def _blocks(
    model: nn.Module, device_map: dict[str, Device], sizes: dict[str, int]
) -> tuple[list[Block], dict[Device, list[int]]]:
    """Group map entries into displayable blocks: each layer, then the named parts around them."""
    layers = layer_list(model)
    prefix = layers[0] + "." if layers else None
    blocks: list[Block] = []
    layer_devices: dict[Device, list[int]] = {}
    by_name: dict[str, int] = {}
    for key, device in device_map.items():
        if prefix and key.startswith(prefix):
            index = int(key[len(prefix):].split(".")[0])
            name = f"layer {index}"
            if index not in layer_devices.get(device, []):
                layer_devices.setdefault(device, []).append(index)
        elif prefix and prefix.startswith(key + "."):
            continue  # the whole layer list on one device is expanded by clean_result=False already
        else:
            leaf = key.split(".")[-1]
            name = "embeddings" if _EMBED.search(leaf) else leaf
        if name in by_name and blocks[by_name[name]].device == device:
            old = blocks[by_name[name]]
            blocks[by_name[name]] = Block(name, device, old.bytes + sizes[key])
        else:
            by_name[name] = len(blocks)
            blocks.append(Block(name, device, sizes[key]))
    return blocks, {d: tuple(sorted(v)) for d, v in layer_devices.items()}


def format_ranges(indices: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}–{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}–{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def _summary(blocks: list[Block], bytes_per_device: dict[Device, int], order: list[Device]) -> str:
    parts = []
    for device in order:
        if device not in bytes_per_device:
            continue
        names = []
        layer_ids = [int(b.name.split()[1]) for b in blocks if b.device == device and b.name.startswith("layer ")]
        seen = set()
        for b in blocks:
            if b.device != device:
                continue
            if b.name.startswith("layer "):
                if "layers" not in seen:
                    seen.add("layers")
                    label = "layer" if len(layer_ids) == 1 else "layers"
                    names.append(f"{label} {format_ranges(layer_ids)}")
            elif b.name not in seen:
                seen.add(b.name)
                names.append(b.name)
        parts.append(f"{device_label(device)}: {' + '.join(names)} ({format_bytes(bytes_per_device[device])})")
    return " · ".join(parts)
