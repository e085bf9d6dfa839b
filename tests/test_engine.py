"""The offload engine's scheduling, on CPU: SyncOps does the copies at once, a recording ops checks order.

On a GPU the same code drives CUDA streams and events (tests/test_gpu.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import all_layers_on, greedy
from pipeline.budgets import Budgets, GiB
from pipeline.engine import OffloadEngine, SyncOps, attach_engine
from pipeline.loading import load_model, unload
from pipeline.planning import layer_list, plan_device_map
from pipeline.presets import resolve_model



@pytest.fixture(scope="module")
def expected(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    loaded = load_model(resolve_model(str(tiny_llama)),
                        Budgets((), GiB, False, tmp_path_factory.mktemp("off")), engine="accelerate")
    tokens = greedy(loaded)
    unload(loaded)
    return tokens


class RecordingOps(SyncOps):
    """SyncOps that logs every operation, with slots and events named, and counts allocations."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.log: list[tuple] = []
        self.allocations = 0
        self.names: dict[int, str] = {}

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        return super().host_buffer(nbytes)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        return super().device_buffer(nbytes)

    def event(self) -> object:
        event = object()
        self.names[id(event)] = f"e{len(self.names)}"
        return event

    def copy(self, dst, src, after, done) -> None:
        super().copy(dst, src, after, done)
        self.log.append(("copy", dst.data_ptr(), self.names.get(id(after)), self.names[id(done)]))

    def wait(self, event) -> None:
        self.log.append(("wait", self.names[id(event)]))

    def record(self, event) -> None:
        self.log.append(("record", self.names[id(event)]))


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_disk_layers_through_the_engine_match(slots: int, tiny_llama: Path, tmp_path: Path, expected) -> None:
    preset = resolve_model(str(tiny_llama))
    loaded = load_model(preset, Budgets((), 0, True, tmp_path / "off"), engine="accelerate")
    assert set(loaded.plan.layers_per_device) == {"disk"}
    engine = attach_engine(loaded.model, layer_list(loaded.model)[0], loaded.plan.device_map, torch.device("cpu"),
                           slots=slots)
    loaded.engine = engine
    assert greedy(loaded) == expected
    assert greedy(loaded) == expected  # and again: the cycle wraps across replies
    if slots >= 4:  # all 4 layers fit in slots: loaded once, never copied again
        assert engine.resident and engine.stats.copies == 4
    else:
        assert engine.stats.disk_reads == engine.stats.copies > 4 * 12
    unload(loaded)
    assert not any(t.name == "offload-disk-reader" and t.is_alive() for t in threading.enumerate())


def test_load_model_with_the_engine_and_unload(tiny_llama: Path, tmp_path: Path, expected) -> None:
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), 300_000, True, tmp_path / "off"), engine="engine")
    assert loaded.engine is not None and "disk" in loaded.plan.layers_per_device
    assert greedy(loaded) == expected
    unload(loaded)
    assert loaded.engine is None


def test_cpu_tier_layers_become_flat_host_buffers(tiny_llama: Path, tmp_path: Path, expected) -> None:
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path / "off"),
                        engine="accelerate")
    prefix = layer_list(loaded.model)[0]
    as_if_offloaded = {**loaded.plan.device_map, f"{prefix}.0": "resident"}  # layers 1-3 as if offloaded to cpu
    engine = attach_engine(loaded.model, prefix, as_if_offloaded, torch.device("cpu"), slots=2, tiers=("cpu", "disk"))
    assert [layer.index for layer in engine.layers] == [1, 2, 3]
    assert all(layer.host is not None and layer.host.numel() == layer.nbytes for layer in engine.layers)
    assert greedy(loaded) == expected
    engine.close()
    unload(loaded)


def test_copies_wait_for_the_slot_and_layers_wait_for_their_copy(tiny_llama: Path, tmp_path: Path,
                                                                  expected) -> None:
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path / "off"),
                        engine="accelerate")
    prefix, as_offloaded = all_layers_on(loaded, "cpu")
    ops = RecordingOps()
    engine = attach_engine(loaded.model, prefix, as_offloaded, torch.device("cpu"), slots=2, ops=ops, tiers=("cpu",))
    allocations = ops.allocations
    slot = {s.buffer.data_ptr(): i for i, s in enumerate(engine.slots)}
    ready = {ops.names[id(s.ready)]: i for i, s in enumerate(engine.slots)}
    free = {ops.names[id(s.free)]: i for i, s in enumerate(engine.slots)}
    ops.log.clear()
    assert greedy(loaded, n=3) == expected[:3]
    assert ops.allocations == allocations  # nothing allocated per token
    last_free_record: dict[int, int] = {}
    for step, entry in enumerate(ops.log):
        if entry[0] == "copy":
            target = slot[entry[1]]
            assert free[entry[2]] == target and ready[entry[3]] == target  # waits on this slot's reader
            assert target in last_free_record  # ...which has already been recorded on the compute side
        elif entry[0] == "record":
            last_free_record[free[entry[1]]] = step
    waits = [ready[e[1]] for e in ops.log if e[0] == "wait"]
    assert waits[:4] == [0, 1, 0, 1]  # layers alternate between the two slots
    engine.close()
    unload(loaded)


def test_an_interrupted_forward_resyncs(tiny_llama: Path, tmp_path: Path, expected) -> None:
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), 0, True, tmp_path / "off"), engine="engine")
    engine: OffloadEngine = loaded.engine
    layer2 = layer_list(loaded.model)[1][2]
    handle = layer2.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        greedy(loaded, n=2)
    handle.remove()
    assert greedy(loaded) == expected
    assert engine.stats.resyncs == 1
    unload(loaded)


def test_planner_reserves_the_engine_slots_on_the_gpu() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    layer, embed = 147_968, 256_000  # see tests/test_planning.py
    budgets = Budgets((layer + embed + 2 * layer,), GiB, True, Path("/nonexistent"))
    assert plan_device_map(config, budgets).layers_per_device[0] == (0, 1)
    two = plan_device_map(config, budgets, offload_slots=2)
    assert two.layers_per_device[0] == (0,) and two.offload_slots == 2  # one layer's room went to the 2nd slot


def test_disk_layers_are_read_from_the_safetensors_map_not_accelerates_loader(
        tiny_llama: Path, tmp_path: Path, expected, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils.offload import OffloadedWeightsLoader

    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), 0, True, tmp_path / "off"), engine="engine")
    calls: list[str] = []
    original = OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__",
                        lambda self, key: calls.append(key) or original(self, key))
    assert greedy(loaded) == expected
    assert not [k for k in calls if ".layers." in k]  # layer weights came through SafetensorsFile views
    assert loaded.engine.stats.disk_reads > 0
    unload(loaded)


def test_with_several_gpus_offloaded_layers_take_their_inputs_to_the_engine_device(tiny_llama: Path, tmp_path: Path,
                                                                                   expected) -> None:
    """Hidden states and position embeddings may come from another GPU; the KV cache stays per layer."""
    loaded = load_model(resolve_model(str(tiny_llama)), Budgets((), GiB, False, tmp_path / "off"),
                        engine="accelerate")
    prefix, as_offloaded = all_layers_on(loaded, "cpu")
    engine = attach_engine(loaded.model, prefix, as_offloaded, torch.device("cpu"), slots=2, tiers=("cpu",), align=True)
    loaded.engine = engine
    assert greedy(loaded) == expected  # real inputs go through the alignment hook

    class Probe:
        def __init__(self) -> None:
            self.sent_to: list[torch.device] = []

        def to(self, device, non_blocking: bool = False):
            self.sent_to.append(torch.device(device))
            return self

    skip = loaded.model._skip_keys_device_placement  # the model's name for its KV cache argument
    key = skip if isinstance(skip, str) else sorted(skip)[0]
    hidden, cos, cache = Probe(), Probe(), Probe()
    args, kwargs = engine._align(engine.layers[0].module, (hidden,), {"position_embeddings": (cos,), key: cache})
    assert hidden.sent_to == cos.sent_to == [torch.device("cpu")]
    assert cache.sent_to == [] and kwargs[key] is cache
    unload(loaded)
