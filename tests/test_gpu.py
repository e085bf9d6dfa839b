"""GPU checks (opt-in marker `gpu`, skipped without CUDA): the same plans and loads with a GPU tier.

Run on the lent GPU machine: `python -m pytest -m gpu tests/test_gpu.py`. Offloaded layers run
through accelerate's hooks here; the streamed offload engine is a separate piece of work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.budgets import Budgets, GiB
from pipeline.chat import chat
from pipeline.loading import load_model, prepare, unload
from pipeline.params import GenerationParams
from pipeline.presets import resolve_model
from pipeline.quantization import QuantSettings
from conftest import greedy, save_checkpoint, tiny_llama_config
from test_architectures import ARCHITECTURES, checkpoints  # noqa: F401 - fixture reused

pytestmark = pytest.mark.gpu


def gpu_budgets(tmp_path: Path, gpu: int, cpu: int, disk: bool = True) -> Budgets:
    return Budgets(gpu=(gpu,) + (0,) * (torch.cuda.device_count() - 1), cpu=cpu, disk=disk,
                   offload_dir=tmp_path / "offload")


@pytest.mark.parametrize("offload", ["engine", "accelerate"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gpu_cpu_disk_split_matches_gpu_only(arch: str, offload: str, checkpoints, tmp_path: Path) -> None:  # noqa: F811
    preset = resolve_model(str(checkpoints[arch]))
    whole = load_model(preset, gpu_budgets(tmp_path, 4 * GiB, GiB, disk=False))
    assert set(whole.plan.device_map.values()) == {0}
    expected, total = greedy(whole, n=8), whole.plan.total_bytes
    unload(whole)
    # The smallest budgets (in steps of 1/16 of the model) that put layers on the GPU, in RAM and on disk.
    steps = [(g * total // 16, c * total // 16) for g in range(4, 16) for c in range(2, 12)]
    budget = next(b for g, c in steps
                  if {0, "cpu", "disk"} <= set(prepare(preset, b := gpu_budgets(tmp_path, g, c),
                                                       engine=offload).plan.layers_per_device))
    split = load_model(preset, budget, engine=offload)
    assert greedy(split, n=8) == expected, split.plan.summary
    assert greedy(split, n=8) == expected  # a second reply: the engine's cycle wraps around
    if offload == "engine" and (split.plan.layers_per_device.keys() & {"cpu", "disk"}):
        assert split.engine is not None and split.engine.stats.copies > 0
    unload(split)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_gpu_cpu_split_generates(mode: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # 16 layers of hidden 128: a wide enough window of GPU budgets for a GPU + CPU split, even with
    # the engine's two full-size slots reserved next to the quantized layers.
    path = save_checkpoint(tiny_llama_config(len(tok), layers=16, hidden=128), tmp_path / "llama16", tok)
    preset = resolve_model(str(path))
    total = 4_809_024  # bytes in float16
    # The smallest GPU budget (in twentieths of the model) that holds quantized layers while others stay in RAM.
    budget = next(b for f in range(1, 40)
                  if {0, "cpu"} <= set(prepare(preset, b := gpu_budgets(tmp_path, f * total // 20, GiB),
                                               QuantSettings(mode)).plan.layers_per_device))
    loaded = load_model(preset, budget, QuantSettings(mode))
    assert {0, "cpu"} <= set(loaded.plan.layers_per_device), loaded.plan.summary
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    first_gpu_layer = loaded.plan.layers_per_device[0][0]
    assert isinstance(loaded.model.model.layers[first_gpu_layer].mlp.down_proj, kind)
    assert len(greedy(loaded, n=8)) == 8
    unload(loaded)


def test_demo_model_streams_on_gpu_and_unload_frees_gpu_memory(demo_dir: Path, tmp_path: Path) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=24)
    hello = [{"role": "user", "content": "And God said"}]
    # Warm-up cycle: the generation thread's cuBLAS workspace (~32 MiB on an H100) stays allocated.
    warm = load_model(resolve_model("demo"), gpu_budgets(tmp_path, 4 * GiB, GiB, disk=False))
    chat(warm, hello, params)
    unload(warm)
    baseline = torch.cuda.memory_allocated(0)
    whole = load_model(resolve_model("demo"), gpu_budgets(tmp_path, 4 * GiB, GiB, disk=False))
    assert torch.cuda.memory_allocated(0) > baseline + 10 * 1024**2  # 11 MiB of bf16 weights arrived
    expected = chat(whole, hello, params)
    assert expected.text and expected.stats.new_tokens > 0
    unload(whole)
    assert torch.cuda.memory_allocated(0) <= baseline + 1024**2
    split = load_model(resolve_model("demo"), gpu_budgets(tmp_path, 8 * 1024**2, 5 * 1024**2))
    assert set(split.plan.layers_per_device) == {0, "cpu", "disk"}, split.plan.summary
    assert chat(split, hello, params).text == expected.text
    unload(split)
    assert torch.cuda.memory_allocated(0) <= baseline + 1024**2
