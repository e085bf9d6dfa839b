"""Predicted speed of a plan: decode tokens/s and time to first token, from the bytes each token moves
over each link and the measured speed of each link.

Per decode token (one chat), every weight is read once:
- GPU-resident layers: their bytes at the GPU's rate for that weight type (fp16, int8, 4-bit kernels
  differ), plus a fixed cost per layer (kernel launches; it dominates small models at batch 1);
- offloaded layers with the offload engine: their bytes cross host->GPU in pinned memory while the
  previous layer computes, so they cost max(copy time, compute time); disk layers are first read
  into pinned staging (at memory speed when they fit in the page cache, else at the disk's speed);
- offloaded layers with accelerate's hooks: copied from pageable memory, one module at a time,
  not overlapped with compute;
- without a GPU, every layer runs on the CPU at its rate for that weight type.
Time to first token for a prompt of P tokens: one pass over the weights (as a decode step) plus the
prompt's compute (2 x parameters x P FLOPs) at the device's measured FLOP rate.

The rates are measured once per machine and cached (`speeds.json` in the offload root): host->GPU
pinned and pageable copies, GPU and CPU weight-read rates per weight type, the offload folder's cold
read speed. Plans for a GPU this machine does not have use the ASSUMED values (stated in the plan).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .planning import Plan, format_bytes

logger = logging.getLogger(__name__)

GB = 1e9
SPEEDS_VERSION = 2  # part of the cache key: a change in what is measured measures again
QUANT_KINDS = ("none", "int8", "4bit")


def _kind(quantization: str) -> str:
    return "4bit" if quantization in ("nf4", "fp4") else ("int8" if quantization == "int8" else "none")


@dataclass(frozen=True)
class Speeds:
    """Link and compute speeds of one machine (bytes/s, FLOP/s, seconds)."""

    source: str  # "measured on ..." or "assumed ..."
    h2d_pinned: float = 25 * GB  # host->GPU from pinned memory
    h2d_pageable: float = 8 * GB  # host->GPU from ordinary (pageable) memory, as accelerate's hooks copy
    ram_copy: float = 10 * GB  # memory-to-memory copy (page cache -> pinned staging), all threads
    disk_read: float = 2 * GB  # the offload folder's cold sequential read
    gpu_rate: dict[str, float] = field(default_factory=lambda: {"none": 700 * GB, "int8": 150 * GB, "4bit": 250 * GB})
    gpu_layer_s: dict[str, float] = field(default_factory=lambda: {"none": 3e-4, "int8": 1.5e-3, "4bit": 6e-4})
    # ^ fixed cost of one decoder layer at batch 1 on the GPU (kernel launches; bitsandbytes adds its own)
    hooks_rate: float = 5 * GB  # accelerate's hooks: one synchronous allocation and pageable copy per weight
    gpu_flops: float = 50e12
    cpu_rate: dict[str, float] = field(default_factory=lambda: {"none": 10 * GB, "int8": 2 * GB, "4bit": 1 * GB})
    cpu_layer_s: float = 2e-4
    cpu_flops: float = 100e9
    ram_available: int = 0  # bytes the page cache may use for disk layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ASSUMED = Speeds(source="assumed: PCIe 4.0 x16 (25 GB/s pinned), a GPU reading 16-bit weights at 700 GB/s, NVMe "
                        "at 2 GB/s; measured speeds replace these on a CUDA machine")


@dataclass(frozen=True)
class Estimate:
    decode_tokens_per_s: float
    time_to_first_token_s: float  # for `prompt_tokens`
    prompt_tokens: int
    link_bytes_per_token: int  # host->GPU (0 without a GPU)
    disk_bytes_per_token: int  # read from the offload folder (0 when the page cache holds them)
    link: str  # "PCIe (pinned, offload engine)", "PCIe (pageable, accelerate hooks)", "" ...
    link_gbps: float
    bottleneck: str
    source: str

    def describe(self) -> str:
        text = f"≈ {self.decode_tokens_per_s:.1f} tokens/s"
        if self.link_bytes_per_token:
            text += f" · {format_bytes(self.link_bytes_per_token)} per token over {self.link} at {self.link_gbps:.0f} GB/s"
        if self.disk_bytes_per_token:
            text += f" · {format_bytes(self.disk_bytes_per_token)} per token from disk"
        text += f" · first token ≈ {self.time_to_first_token_s:.2f} s for {self.prompt_tokens} prompt tokens"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def estimate(plan: Plan, speeds: Speeds, engine: bool, prompt_tokens: int = 512, parameters: int | None = None,
             ) -> Estimate:
    """Predict decode speed (one chat) and time to first token for `plan` on a machine with `speeds`."""
    kind = _kind(plan.quantization)
    # A token reads (and, offloaded, moves) only its routed experts: top_k of a MoE layer's experts, no
    # cache hits assumed. Other weights are read whole.
    skipped = {d: int(b * (1 - plan.routed_fraction)) for d, b in plan.expert_bytes.items()}
    used = {d: b - skipped.get(d, 0) for d, b in plan.bytes_per_device.items()}
    on_gpu = {d: b for d, b in used.items() if isinstance(d, int)}
    gpu_bytes, cpu_bytes, disk_bytes = sum(on_gpu.values()), used.get("cpu", 0), used.get("disk", 0)
    layers = plan.layers_per_device
    n_gpu = sum(len(v) for d, v in layers.items() if isinstance(d, int))
    n_cpu, n_disk = len(layers.get("cpu", ())), len(layers.get("disk", ()))
    total_bytes = gpu_bytes + cpu_bytes + disk_bytes  # per token (MoE: active parameters)
    parameters = parameters or int(total_bytes / {"none": 2, "int8": 1, "4bit": 0.5}[kind])
    # the page cache keeps them after the first token (all of them: routed experts change from token to token)
    disk_cached = plan.bytes_per_device.get("disk", 0) <= 0.5 * speeds.ram_available
    disk_rate = speeds.ram_copy if disk_cached else speeds.disk_read
    link, link_rate, link_bytes, cold_disk = "", 0.0, 0, 0 if disk_cached else disk_bytes
    if on_gpu:
        layer_s = speeds.gpu_layer_s
        resident = gpu_bytes / speeds.gpu_rate[kind] + n_gpu * layer_s[kind]
        offloaded = cpu_bytes + disk_bytes
        if not offloaded:
            per_token, bottleneck = resident, "GPU"
        elif engine:
            # compressed transfer keeps offloaded layers quantized; otherwise they are 16-bit like the plan prices them
            moved = kind if plan.compressed else "none"
            compute = offloaded / speeds.gpu_rate[moved] + (n_cpu + n_disk) * layer_s[moved]
            # Disk layers are staged (page cache or disk -> pinned) before their copy: the two add up
            # (measured: the staging competes with the copy for memory bandwidth).
            copy = offloaded / speeds.h2d_pinned + disk_bytes / disk_rate
            per_token = resident + max(copy, compute)
            bottleneck = "GPU" if compute >= copy else ("PCIe" if not disk_bytes else
                                                        ("disk" if not disk_cached else "PCIe + page cache"))
            link, link_rate, link_bytes = "PCIe (pinned, offload engine)", speeds.h2d_pinned, offloaded
        else:
            compute = offloaded / speeds.gpu_rate["none"] + (n_cpu + n_disk) * layer_s["none"]
            # accelerate reads disk weights through safetensors on every forward, then moves them: the
            # disk bytes go through the same per-weight path twice
            copy = offloaded / speeds.hooks_rate + disk_bytes / min(disk_rate, speeds.hooks_rate)
            per_token, bottleneck = resident + copy + compute, "PCIe"
            link, link_rate, link_bytes = "PCIe (pageable, accelerate hooks)", speeds.hooks_rate, offloaded
        flops = speeds.gpu_flops
    else:
        compute = cpu_bytes / speeds.cpu_rate[kind] + disk_bytes / speeds.cpu_rate["none"] + (n_cpu + n_disk) * \
            speeds.cpu_layer_s
        staging = disk_bytes / disk_rate
        per_token = compute + staging
        bottleneck = "disk" if staging > compute else "CPU"
        flops = speeds.cpu_flops
    prompt_compute = 2 * parameters * prompt_tokens / flops
    return Estimate(
        decode_tokens_per_s=1 / per_token if per_token > 0 else 0.0,
        time_to_first_token_s=per_token + prompt_compute,
        prompt_tokens=prompt_tokens,
        link_bytes_per_token=int(link_bytes),
        disk_bytes_per_token=int(cold_disk),
        link=link,
        link_gbps=link_rate / GB,
        bottleneck=bottleneck,
        source=speeds.source,
    )


# Measurement ---------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_memory_cache: dict[str, Speeds] = {}


def machine_speeds(offload_dir: str | Path, cuda: bool | None = None) -> Speeds:
    """This machine's speeds: measured once (a few seconds) and cached in the app's offload root
    (`speeds.json`), per machine, GPU and filesystem of the offload folder."""
    import torch

    from .budgets import nearest_existing
    from .presets import offload_root

    cuda = torch.cuda.is_available() if cuda is None else cuda
    folder = nearest_existing(Path(offload_dir))
    key = f"v{SPEEDS_VERSION}|{platform.node()}|{torch.cuda.get_device_name(0) if cuda else 'cpu'}|fs{os.stat(folder).st_dev}"
    with _cache_lock:
        if key in _memory_cache:
            return _memory_cache[key]
        path = offload_root(None) / "speeds.json"
        try:
            stored = json.loads(path.read_text())
            speeds = Speeds(**stored[key])
        except (OSError, ValueError, KeyError, TypeError):
            speeds = measure(folder, cuda)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    stored = json.loads(path.read_text())
                except (OSError, ValueError):
                    stored = {}
                stored[key] = speeds.to_dict()
                path.write_text(json.dumps(stored, indent=1))
            except OSError as exc:
                logger.warning("could not cache link speeds in %s: %s", path, exc)
        import psutil

        speeds = replace(speeds, ram_available=int(psutil.virtual_memory().available))
        _memory_cache[key] = speeds
        return speeds


def what_if_speeds(ram_available: int) -> Speeds:
    """Speeds for a plan on a GPU this machine does not have."""
    return replace(ASSUMED, ram_available=ram_available)


def measure(offload_dir: Path, cuda: bool) -> Speeds:
    import torch

    started = time.perf_counter()
    cpu_rate, cpu_flops = _cpu_rates()
    values: dict[str, Any] = dict(cpu_rate=cpu_rate, cpu_flops=cpu_flops, ram_copy=_ram_copy(),
                                  disk_read=_disk_read(offload_dir))
    name = "CPU only"
    if cuda:
        name = torch.cuda.get_device_name(0)
        values.update(_gpu_rates())
    source = f"measured on {platform.node()} ({name}) in {time.perf_counter() - started:.1f} s"
    logger.info("link and compute speeds %s: %s", source, values)
    return Speeds(source=source, **values)


def best_time(fn, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls of `fn`."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _cpu_rates() -> tuple[dict[str, float], float]:
    import torch

    d = 2048
    weight = torch.randn(4 * d, d)
    x = torch.randn(1, d)
    rates = {"none": weight.numel() * 4 / best_time(lambda: [x @ weight.T for _ in range(8)]) * 8}
    try:
        import bitsandbytes as bnb

        for kind, layer in (("int8", bnb.nn.Linear8bitLt(d, 4 * d, bias=False, has_fp16_weights=False)),
                            ("4bit", bnb.nn.Linear4bit(d, 4 * d, bias=False, quant_type="nf4",
                                                       compute_dtype=torch.float32))):
            layer.weight.data = weight.clone()
            layer = layer.to("cpu")
            nbytes = weight.numel() * (1 if kind == "int8" else 0.5)
            with torch.no_grad():
                layer(x)
                rates[kind] = nbytes / best_time(lambda: [layer(x) for _ in range(4)]) * 4
    except Exception as exc:  # noqa: BLE001 - bitsandbytes' CPU kernels are optional here
        logger.debug("CPU int8/4-bit rates not measured: %s", exc)
        rates.setdefault("int8", rates["none"] / 8)
        rates.setdefault("4bit", rates["none"] / 16)
    a = torch.randn(256, d)
    flops = 2 * 256 * d * 4 * d / best_time(lambda: a @ weight.T)
    return rates, flops


def _ram_copy() -> float:
    import torch

    src = torch.empty(64 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    src.fill_(1)
    return src.numel() / best_time(lambda: dst.copy_(src))


def _disk_read(folder: Path) -> float:
    """Cold sequential read of a 128 MiB file in the offload folder's filesystem (dropped from the page
    cache first)."""
    path = folder / f".offload-chat-read-speed-{os.getpid()}"
    size = 128 * 2**20
    try:
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            while os.read(fd, 8 * 2**20):
                pass
            return size / (time.perf_counter() - started)
        finally:
            os.close(fd)
    except OSError as exc:
        logger.warning("disk read speed not measured in %s (%s); assuming %s GB/s", folder, exc, ASSUMED.disk_read / GB)
        return ASSUMED.disk_read
    finally:
        path.unlink(missing_ok=True)


def _gpu_rates() -> dict[str, Any]:
    import torch

    dev = torch.device("cuda", 0)
    n = 256 * 2**20
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    target = torch.empty(n, dtype=torch.uint8, device=dev)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return best_time(lambda: (fn(), torch.cuda.synchronize()))

    h2d_pinned = n / timed(lambda: target.copy_(pinned, non_blocking=True))
    h2d_pageable = n / timed(lambda: target.copy_(pageable))
    rates, d = {}, 4096
    weight = torch.randn(4 * d, d, device=dev, dtype=torch.float16)
    x = torch.randn(1, d, device=dev, dtype=torch.float16)
    with torch.no_grad():
        rates["none"] = weight.numel() * 2 * 16 / timed(lambda: [x @ weight.T for _ in range(16)])
        try:
            import bitsandbytes as bnb

            for kind, layer, nbytes in (
                    ("int8", bnb.nn.Linear8bitLt(d, 4 * d, bias=False, has_fp16_weights=False), weight.numel()),
                    ("4bit", bnb.nn.Linear4bit(d, 4 * d, bias=False, quant_type="nf4", compute_dtype=torch.float16),
                     weight.numel() // 2)):
                layer.weight.data = weight.detach().float().cpu() if kind == "int8" else weight.detach().cpu()
                layer = layer.to(dev)
                rates[kind] = nbytes * 16 / timed(lambda: [layer(x) for _ in range(16)])
        except Exception as exc:  # noqa: BLE001
            logger.warning("GPU int8/4-bit rates not measured (%s); assumed", exc)
            rates.setdefault("int8", ASSUMED.gpu_rate["int8"])
            rates.setdefault("4bit", ASSUMED.gpu_rate["4bit"])
        layer_s = {kind: _gpu_layer_overhead(dev, kind) for kind in QUANT_KINDS}
        hooks = _hooks_rate(dev)
        a = torch.randn(512, d, device=dev, dtype=torch.float16)
        flops = 2 * 512 * d * 4 * d / timed(lambda: a @ weight.T)
    return dict(h2d_pinned=h2d_pinned, h2d_pageable=h2d_pageable, gpu_rate=rates, gpu_layer_s=layer_s,
                gpu_flops=flops, hooks_rate=hooks)


def _gpu_layer_overhead(dev, kind: str = "none") -> float:
    """The fixed cost of one decoder layer at batch 1 (launches, and bitsandbytes' quantize/dequantize
    steps): a decode step of a tiny Llama with 10 layers minus one with 2, over the 8 layers between
    (the embedding, the final norm and the output layer cost the same in both)."""
    return (_tiny_step(dev, kind, 10) - _tiny_step(dev, kind, 2)) / 8


def _tiny_step(dev, kind: str, layers: int) -> float:
    """Seconds of one decode step of a tiny Llama with `layers` layers, quantized as `kind`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    if kind != "none":
        import bitsandbytes as bnb

        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear) or child.out_features == config.vocab_size:
                    continue
                if kind == "int8":
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                              has_fp16_weights=False, threshold=6.0)
                    new.weight = bnb.nn.Int8Params(child.weight.data.float(), requires_grad=False, has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=torch.float16, quant_type="nf4")
                    new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(parent, child_name, new)
    model = model.to(dev)
    ids = torch.ones(1, 16, dtype=torch.long, device=dev)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        step = torch.ones(1, 1, dtype=torch.long, device=dev)

        def one() -> None:
            model(step, past_key_values=cache, use_cache=True)
            cache.crop(16)
            torch.cuda.synchronize()

        one()
        return best_time(one, repeat=7)


def _hooks_rate(dev) -> float:
    """Bytes/s of accelerate's per-forward weight moves: `set_module_tensor_to_device` from host memory for
    every weight of a block, then back to meta, as its offload hooks do."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    block = torch.nn.Sequential(*[torch.nn.Linear(2560, 10240, bias=False, dtype=torch.float16) for _ in range(4)])
    weights = {name: p.detach().clone() for name, p in block.named_parameters()}
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    block.to("meta")

    def move() -> None:
        for name, value in weights.items():
            set_module_tensor_to_device(block, name, dev, value=value)
        torch.cuda.synchronize()
        for name in weights:
            set_module_tensor_to_device(block, name, "meta")

    move()
    return nbytes / best_time(move)
