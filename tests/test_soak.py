"""Reload soak: 50 load/unload cycles with changing budgets and quantization.

RSS must come back to within 5 % above its baseline (ending below it, which the allocator's noise
sometimes does by a few %, is memory given back), every offload folder must be gone, and no thread
may be left behind. The cycles run in a fresh process, like the app's: inside the test runner the
heap is shared with everything the earlier tests left, and its fragmentation alone moved RSS by
about 5 % (while a fresh process stays within about 1-3 %). Marked slow; about 40 s, so CI runs it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

CYCLES = 50
HELLO = [{"role": "user", "content": "And God said"}]
REPO = Path(__file__).resolve().parent.parent


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def memory_breakdown() -> dict:
    """Anonymous vs file-backed RSS, and how many safetensors mappings the process holds."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem", "Threads"):
                number = int(value.split()[0])
                fields[name] = number if name == "Threads" else round(number / 1024, 1)
    with open("/proc/self/maps") as f:
        fields["safetensors_mappings"] = sum(".safetensors" in line for line in f)
    return fields


def soak(tiny_llama: Path, offload: Path, gpu: bool = False, only: int | None = None) -> dict:
    """The cycles themselves (run in a child process by the test). With `gpu`, the budgets give
    GPU 0 a few MiB, so the demo model spreads over GPU, CPU and disk through the offload engine."""
    import torch

    from pipeline.budgets import GiB, Hardware, detect_hardware
    from pipeline.params import GenerationParams
    from pipeline.quantization import QuantSettings
    from pipeline.session import ModelManager, Settings

    g = (0.008,) if gpu else ()  # 8 MiB of GPU: embeddings and a layer of the demo model in bf16
    variants = [
        Settings(model="demo", gpu_gib=g, cpu_gib=1, disk=False, offload_dir=str(offload)),
        Settings(model="demo", gpu_gib=g, cpu_gib=0.012, disk=True, offload_dir=str(offload)),  # cpu + disk
        Settings(model=str(tiny_llama), gpu_gib=g, cpu_gib=1, offload_dir=str(offload), quant=QuantSettings("int8")),
        Settings(model=str(tiny_llama), gpu_gib=g, cpu_gib=1, offload_dir=str(offload), quant=QuantSettings("nf4")),
        Settings(model="demo", gpu_gib=g, cpu_gib=0.0001, disk=True, offload_dir=str(offload)),  # all on disk
    ]
    if only is not None:
        variants = [variants[only]]
    manager = ModelManager(detect_hardware(offload) if gpu else Hardware((), 23 * GiB, 20 * GiB, 50 * GiB))

    def gpu_allocated() -> int:
        return torch.cuda.memory_allocated() if gpu else 0

    params = GenerationParams(temperature=0, max_new_tokens=4)
    for settings in variants * 2:  # warm-up, twice: imports, kernels, allocator arenas settle
        manager.load(settings)
        "".join(manager.stream(HELLO, params))
    manager.current.unload()
    manager.current = None
    threads = {t.ident for t in threading.enumerate()}
    baseline, gpu_baseline, memory_before = rss(), gpu_allocated(), memory_breakdown()
    peak = 0
    started = time.perf_counter()
    disk_plans = 0
    series: list[float] = []  # RSS (MiB) every 10 cycles, model loaded: growth per cycle shows as a slope
    for cycle in range(CYCLES):
        loaded = manager.load(variants[cycle % len(variants)])
        assert "".join(manager.stream(HELLO, params))
        peak = max(peak, rss())
        disk_plans += "disk" in loaded.plan.layers_per_device
        if cycle % 10 == 9:
            series.append(round(rss() / 2**20, 1))
        if cycle == CYCLES - 1:
            memory_loaded = memory_breakdown()
    manager.current.unload()
    manager.current = None
    elapsed = time.perf_counter() - started
    time.sleep(0.2)
    after, gpu_after = rss(), gpu_allocated()
    return {
        "gpu_allocated_baseline_mib": round(gpu_baseline / 2**20, 1),
        "gpu_allocated_final_mib": round(gpu_after / 2**20, 1),
        "cycles": CYCLES, "seconds": round(elapsed, 1), "baseline_rss_mib": round(baseline / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1), "final_rss_mib": round(after / 2**20, 1),
        "change_percent": round((after - baseline) / baseline * 100, 2), "disk_plans": disk_plans,
        "rss_every_10_cycles_mib": series, "memory_before": memory_before, "memory_last_loaded": memory_loaded,
        "memory_after": memory_breakdown(),
        "leaked_threads": [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()],
        "offload_left": sorted(p.name for p in offload.iterdir()) if offload.exists() else [],
    }


def run_child(tiny_llama: Path, offload: Path, *flags: str) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, __file__, str(tiny_llama), str(offload), *flags],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print("soak:", json.dumps(figures))
    return figures


def assert_rss_returned(figures: dict) -> None:
    """At most 5 % above the baseline at the end (below it is memory given back, not a leak), and no
    slope of more than 5 % across cycles 10..50 while loaded (a leak per cycle shows there)."""
    assert figures["change_percent"] <= 5.0, figures
    series = figures["rss_every_10_cycles_mib"]
    assert series[-1] - series[0] <= 0.05 * figures["baseline_rss_mib"], figures


@pytest.mark.gpu
@pytest.mark.slow
def test_fifty_reloads_on_the_gpu_return_to_baseline(demo_dir: Path, tiny_llama: Path, tmp_path: Path) -> None:
    figures = run_child(tiny_llama, tmp_path / "offload", "--gpu")
    assert_rss_returned(figures)
    base = figures["gpu_allocated_baseline_mib"]
    assert abs(figures["gpu_allocated_final_mib"] - base) <= max(0.05 * base, 1.0), figures
    assert figures["leaked_threads"] == [] and figures["offload_left"] == [], figures


@pytest.mark.slow
def test_fifty_reloads_return_to_baseline(demo_dir: Path, tiny_llama: Path, tmp_path: Path) -> None:
    figures = run_child(tiny_llama, tmp_path / "offload")
    assert_rss_returned(figures)
    assert figures["disk_plans"] == 2 * CYCLES // 5  # the disk variants really used the disk
    assert figures["leaked_threads"] == [], figures
    assert figures["offload_left"] == [], figures


if __name__ == "__main__":
    only = next((int(a.split("=")[1]) for a in sys.argv[3:] if a.startswith("--only=")), None)
    print(json.dumps(soak(Path(sys.argv[1]), Path(sys.argv[2]), gpu="--gpu" in sys.argv[3:], only=only)))
