"""The shared ModelManager: reloads cancel streams cleanly; failed loads keep or restore a model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.budgets import GiB, GPUInfo, Hardware
from pipeline.chat import ReplyStats
from pipeline.errors import ConfigError, DoesNotFitError, GenerationError, LoadError, ModelSourceError
from pipeline.params import GenerationParams
from pipeline.session import ModelManager, Settings

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
MACHINE = Hardware(gpus=(), ram_total=16 * GiB, ram_available=12 * GiB, disk_free=50 * GiB)


@pytest.fixture()
def manager(tiny_llama: Path, tmp_path: Path) -> ModelManager:
    m = ModelManager(MACHINE)
    m.load(Settings(model=str(tiny_llama), cpu_gib=1, disk=True, offload_dir=str(tmp_path / "off")))
    yield m
    if m.current is not None:
        m.current.unload()


def test_load_and_describe(manager: ModelManager) -> None:
    info = manager.describe()
    assert info["loaded"] and info["placement"] == "CPU 100 %" and info["quantization"] == "none"
    assert "process RSS" in info["in_use"]
    assert "".join(manager.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=8)))


def test_reload_mid_stream_ends_that_stream_with_a_message(manager: ModelManager, tiny_llama: Path,
                                                           tmp_path: Path) -> None:
    stream = manager.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=200))
    next(stream)
    started = threading.Event()
    result: dict = {}

    def reload() -> None:
        started.set()
        result["loaded"] = manager.load(Settings(model=str(tiny_llama), cpu_gib=0.0002, disk=True,
                                                 offload_dir=str(tmp_path / "off2")))

    worker = threading.Thread(target=reload)
    worker.start()
    started.wait()
    with pytest.raises(GenerationError, match="being reloaded"):
        for _ in stream:
            pass
    worker.join(timeout=60)
    assert not worker.is_alive(), "reload deadlocked"
    assert "disk" in result["loaded"].plan.layers_per_device
    assert "".join(manager.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=4)))


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"model": "no-such-preset"}, ModelSourceError, "is not a preset"),
        ({"cpu_gib": -1}, ConfigError, "cpu_memory=-1 is negative"),
        ({"cpu_gib": 0.0001, "disk": False}, DoesNotFitError, "does not fit"),
    ],
)
def test_bad_settings_keep_the_current_model(manager: ModelManager, tiny_llama: Path, tmp_path: Path,
                                             settings: dict, error: type, message: str) -> None:
    before = manager.current
    base = {"model": str(tiny_llama), "cpu_gib": 1.0, "disk": True, "offload_dir": str(tmp_path / "off")}
    with pytest.raises(error, match=message):
        manager.load(Settings(**{**base, **settings}))
    assert manager.current is before and before.loaded  # refused before anything was unloaded
    assert "".join(manager.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=4)))


def test_failed_load_restores_the_previous_model(manager: ModelManager, tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # plans fine (config.json), fails while loading
    with pytest.raises(LoadError, match="loading .* failed"):
        manager.load(Settings(model=str(broken), cpu_gib=1, offload_dir=str(tmp_path / "off")))
    assert manager.current is not None and manager.current.loaded
    assert "is loaded again" in manager.status
    assert "".join(manager.stream(HELLO, GenerationParams(temperature=0, max_new_tokens=4)))


def test_no_model_loaded_is_said_plainly(tmp_path: Path) -> None:
    m = ModelManager(MACHINE)
    assert m.describe() == {"loaded": False, "status": "No model loaded."}
    with pytest.raises(GenerationError, match="no model is loaded"):
        list(m.stream(HELLO, GenerationParams()))


def test_concurrent_streams_do_not_mix(manager: ModelManager) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=16)
    expected = "".join(manager.stream(HELLO, params))
    other = [{"role": "user", "content": "The quick brown fox"}]
    expected_other = "".join(manager.stream(other, params))
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = "".join(manager.stream(HELLO if i % 2 == 0 else other, params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: expected, 1: expected_other, 2: expected, 3: expected_other}


def test_stop_in_one_stream_does_not_stop_another(manager: ModelManager) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=30)
    full = ReplyStats()
    "".join(manager.stream(HELLO, params, stats=full))
    cancel = threading.Event()
    cancelled = ReplyStats()
    for _ in manager.stream(HELLO, params, cancel=cancel, stats=cancelled):
        cancel.set()
    untouched = ReplyStats()
    "".join(manager.stream(HELLO, params, stats=untouched))
    assert cancelled.finish_reason == "cancelled"
    assert untouched.new_tokens == full.new_tokens and untouched.finish_reason != "cancelled"


def test_plan_preview_on_gpu_machine_without_loading() -> None:
    gpu_machine = Hardware(gpus=(GPUInfo(0, "T4", 16 * GiB, 15 * GiB),), ram_total=12 * GiB,
                           ram_available=11 * GiB, disk_free=50 * GiB)
    m = ModelManager(gpu_machine)
    plan = m.plan(Settings(model="demo", gpu_gib=(0.005,), cpu_gib=0.002, disk=True))
    assert 0 in plan.bytes_per_device and plan.compute_device == "cuda:0"
    assert m.current is None
