"""Reload soak: 50 load/unload cycles with changing budgets and quantization.

RSS must come back to its baseline within 5 %, every offload folder must be gone, and no thread
may be left behind. Marked slow; it takes about a minute on the CI machine, so CI runs it.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.budgets import GiB, Hardware
from pipeline.params import GenerationParams
from pipeline.quantization import QuantSettings
from pipeline.session import ModelManager, Settings

CYCLES = 50
HELLO = [{"role": "user", "content": "And God said"}]


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_fifty_reloads_return_to_baseline(demo_dir: Path, tiny_llama: Path, tmp_path: Path) -> None:
    offload = tmp_path / "offload"
    variants = [
        Settings(model="demo", cpu_gib=1, disk=False, offload_dir=str(offload)),
        Settings(model="demo", cpu_gib=0.012, disk=True, offload_dir=str(offload)),  # cpu + disk
        Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(offload), quant=QuantSettings("int8")),
        Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(offload), quant=QuantSettings("nf4")),
        Settings(model="demo", cpu_gib=0.0001, disk=True, offload_dir=str(offload)),  # all on disk
    ]
    manager = ModelManager(Hardware((), 23 * GiB, 20 * GiB, 50 * GiB))
    params = GenerationParams(temperature=0, max_new_tokens=4)
    for settings in variants * 2:  # warm-up, twice: imports, kernels, allocator arenas settle
        manager.load(settings)
        "".join(manager.stream(HELLO, params))
    manager.current.unload()
    manager.current = None
    threads = {t.ident for t in threading.enumerate()}
    baseline = rss()
    peak = 0
    started = time.perf_counter()
    for cycle in range(CYCLES):
        loaded = manager.load(variants[cycle % len(variants)])
        assert "".join(manager.stream(HELLO, params))
        peak = max(peak, rss())
        if cycle % len(variants) == 1:
            assert "disk" in loaded.plan.layers_per_device
    manager.current.unload()
    manager.current = None
    elapsed = time.perf_counter() - started
    time.sleep(0.2)
    after = rss()
    leaked_threads = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
    figures = {"cycles": CYCLES, "seconds": round(elapsed, 1), "baseline_rss_mib": round(baseline / 2**20, 1),
               "peak_rss_mib": round(peak / 2**20, 1), "final_rss_mib": round(after / 2**20, 1),
               "change_percent": round((after - baseline) / baseline * 100, 2)}
    print("soak:", json.dumps(figures))
    Path(tmp_path / "soak.json").write_text(json.dumps(figures))
    assert abs(after - baseline) <= 0.05 * baseline, figures
    assert not leaked_threads, leaked_threads
    assert not offload.exists() or list(offload.iterdir()) == []
