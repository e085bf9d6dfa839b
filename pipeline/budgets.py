"""Memory budgets (GPU per device, CPU RAM, disk) and hardware detection.

Sizes come in as GiB from people (sliders, CLI flags) and are parsed once, here, into bytes.
Budgets use accelerate's vocabulary: integer GPU indices, then "cpu", then "disk".
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from .errors import ConfigError

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

# Headroom left out of proposed defaults: the CUDA context, activations, the OS and the app itself.
GPU_HEADROOM_BYTES = 1 * GiB
GPU_DEFAULT_FRACTION = 0.90
CPU_DEFAULT_FRACTION = 0.70
DISK_DEFAULT_FRACTION = 0.80


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes


@dataclass(frozen=True)
class Hardware:
    """What this machine has, read once; budgets are validated against it."""

    gpus: tuple[GPUInfo, ...]
    ram_total: int
    ram_available: int
    disk_free: int  # at the offload folder (or its nearest existing parent)

    def describe(self) -> str:
        gpus = ", ".join(f"GPU{g.index} {g.name} {g.free / GiB:.1f}/{g.total / GiB:.1f} GiB free" for g in self.gpus)
        return (
            f"{gpus or 'no CUDA GPU'} · RAM {self.ram_available / GiB:.1f}/{self.ram_total / GiB:.1f} GiB available"
            f" · disk {self.disk_free / GiB:.1f} GiB free"
        )


def detect_hardware(offload_dir: str | Path = ".") -> Hardware:
    """Probe GPUs (CUDA), RAM and the free disk space where offload files would go."""
    gpus: list[GPUInfo] = []
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                gpus.append(GPUInfo(index, torch.cuda.get_device_name(index), int(total), int(free)))
    except Exception:  # a broken driver must not stop a CPU-only run
        logger.warning("CUDA probe failed; continuing without GPUs", exc_info=True)
    memory = psutil.virtual_memory()
    return Hardware(tuple(gpus), int(memory.total), int(memory.available), free_disk(Path(offload_dir)))


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest existing parent."""
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


WHAT_IF_NAME = "a GPU this machine does not have"
WHAT_IF_MAX_GIB = 4096.0


def what_if_hardware(hardware: Hardware, gpu_gib: Sequence[Any]) -> Hardware:
    """This machine with the given GPUs instead of its own: for plans of hardware you don't have
    (`--plan-only --gpu-memory 24` on a laptop). Each GPU's size is its budget."""
    gpus = []
    for i, value in enumerate(gpu_gib):
        size = parse_gib(f"gpu_memory[{i}]", value, WHAT_IF_MAX_GIB, " for a GPU this machine does not have")
        gpus.append(GPUInfo(i, WHAT_IF_NAME, size, size))
    return replace(hardware, gpus=tuple(gpus))


def beyond_hardware(hardware: Hardware, gpu_gib: Sequence[Any]) -> bool:
    """GPU budgets this machine cannot hold: more GPUs than it has, or more memory than one of them."""
    if len(gpu_gib) > len(hardware.gpus):
        return True
    try:
        return any(float(v) * GiB > g.total for v, g in zip(gpu_gib, hardware.gpus))
    except (TypeError, ValueError):
        return False  # make_budgets names the bad value


def is_what_if(hardware: Hardware) -> bool:
    return any(g.name == WHAT_IF_NAME for g in hardware.gpus)


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    return int(shutil.disk_usage(nearest_existing(path)).free)


@dataclass(frozen=True)
class Budgets:
    """How much of each tier the model may use, in bytes."""

    gpu: tuple[int, ...]  # one entry per visible GPU; 0 means "do not use this GPU"
    cpu: int
    disk: bool
    offload_dir: Path
    disk_cap: int | None = None  # None: no cap beyond the free space

    @property
    def has_gpu(self) -> bool:
        return any(b > 0 for b in self.gpu)

    def max_memory(self) -> dict[int | str, int]:
        """accelerate's `max_memory`: GPUs with a budget, then "cpu"."""
        memory: dict[int | str, int] = {i: b for i, b in enumerate(self.gpu) if b > 0}
        memory["cpu"] = self.cpu
        return memory

    def describe(self) -> str:
        parts = [f"GPU{i} {b / GiB:.2f} GiB" for i, b in enumerate(self.gpu) if b > 0]
        parts.append(f"CPU {self.cpu / GiB:.2f} GiB")
        if self.disk:
            cap = "no cap" if self.disk_cap is None else f"cap {self.disk_cap / GiB:.2f} GiB"
            parts.append(f"disk on ({cap}, {self.offload_dir})")
        else:
            parts.append("disk off")
        return " · ".join(parts)


def parse_gib(name: str, value: Any, maximum: float | None, what: str = "") -> int:
    """GiB from a person (number or numeric string) -> bytes; raises ConfigError naming the value and range."""
    accepted = f"0 to {maximum:.2f} GiB{what}" if maximum is not None else "a number of GiB >= 0"
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={value!r} is not a number; accepted: {accepted}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number; accepted: {accepted}") from None
    if math.isnan(number) or math.isinf(number):
        raise ConfigError(f"{name}={value!r} is not a finite number; accepted: {accepted}")
    if number < 0:
        raise ConfigError(f"{name}={value!r} is negative; accepted: {accepted}")
    if maximum is not None and number > maximum + 1e-9:
        raise ConfigError(f"{name}={value!r} GiB is more than this machine has; accepted: {accepted}")
    return int(number * GiB)


def make_budgets(
    hardware: Hardware,
    gpu_gib: Sequence[Any] = (),
    cpu_gib: Any = None,
    disk: bool = False,
    offload_dir: str | Path = "offload",
    disk_cap_gib: Any = None,
) -> Budgets:
    """Validate budgets given in GiB against the detected hardware.

    `cpu_gib=None` takes the proposed default. GPUs not listed get 0 (unused).
    """
    if isinstance(gpu_gib, (str, bytes)) or not isinstance(gpu_gib, Sequence):
        gpu_gib = [gpu_gib]
    if len(gpu_gib) > len(hardware.gpus):
        have = f"{len(hardware.gpus)} GPU(s)" if hardware.gpus else "no CUDA GPU"
        if any(_looks_positive(v) for v in gpu_gib[len(hardware.gpus):]):
            raise ConfigError(
                f"gpu_memory={list(gpu_gib)!r} lists {len(gpu_gib)} GPU budget(s) but this machine has {have}; "
                f"accepted: at most {len(hardware.gpus)} value(s)"
            )
        gpu_gib = list(gpu_gib)[: len(hardware.gpus)]
    gpu = [
        parse_gib(f"gpu_memory[{g.index}]", value, g.total / GiB, f" (GPU{g.index} {g.name})")
        for g, value in zip(hardware.gpus, gpu_gib)
    ]
    gpu += [0] * (len(hardware.gpus) - len(gpu))
    if cpu_gib is None:
        cpu = int(hardware.ram_available * CPU_DEFAULT_FRACTION)
    else:
        cpu = parse_gib("cpu_memory", cpu_gib, hardware.ram_total / GiB, " (RAM)")
    if not isinstance(disk, bool):
        raise ConfigError(f"disk={disk!r} must be true or false")
    if not isinstance(offload_dir, (str, Path)) or "\x00" in str(offload_dir) or len(str(offload_dir)) > 4096:
        raise ConfigError(f"offload folder {str(offload_dir)[:80]!r} is not a usable path (a NUL character, or longer "
                          "than 4096 characters); accepted: a folder path")
    offload = Path(offload_dir).expanduser()
    cap = None
    if disk and disk_cap_gib is not None:
        cap = parse_gib("disk_cap", disk_cap_gib, hardware.disk_free / GiB, f" (free at {offload})")
    if not any(gpu) and cpu == 0 and not disk:
        raise ConfigError(
            "all budgets are zero (GPU 0, CPU 0, disk off): give the model some GPU or CPU memory, or turn disk on"
        )
    return Budgets(tuple(gpu), cpu, disk, offload, cap)


def _looks_positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return True


def default_budgets(
    hardware: Hardware,
    offload_dir: str | Path = "offload",
    disk: bool = True,
    gpu_fraction: float = GPU_DEFAULT_FRACTION,
    cpu_fraction: float = CPU_DEFAULT_FRACTION,
    disk_cap_gib: float | None = None,
) -> Budgets:
    """Proposed defaults with headroom: a share of each GPU's free memory (keeping 1 GiB for the CUDA
    context and activations), a share of available RAM, and disk on with 80 % of the free space."""
    for name, value in (("gpu_memory_fraction", gpu_fraction), ("cpu_memory_fraction", cpu_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{name}={value!r}; accepted: a number from 0 to 1")
    gpu = tuple(max(0, min(int(g.free * gpu_fraction), g.free - GPU_HEADROOM_BYTES)) for g in hardware.gpus)
    cpu = int(hardware.ram_available * cpu_fraction)
    cap = None
    if disk:
        free_cap = int(hardware.disk_free * DISK_DEFAULT_FRACTION)
        cap = free_cap if disk_cap_gib is None else parse_gib("disk_cap_gib", disk_cap_gib, hardware.disk_free / GiB)
    return Budgets(gpu, cpu, disk, Path(offload_dir).expanduser(), cap)


def app_default_budgets(hardware: Hardware, app_config: dict, offload_dir: str | Path) -> Budgets:
    """default_budgets with the settings of configs/app.yaml."""
    return default_budgets(
        hardware,
        offload_dir,
        disk=bool(app_config.get("disk", True)),
        gpu_fraction=app_config.get("gpu_memory_fraction", GPU_DEFAULT_FRACTION),
        cpu_fraction=app_config.get("cpu_memory_fraction", CPU_DEFAULT_FRACTION),
        disk_cap_gib=app_config.get("disk_cap_gib"),
    )
