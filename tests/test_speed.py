"""The speed model: predictions move the way the bytes and links say (checked against measured decode
speeds on the GPU machine in bench/RESULTS.md, `bench/predict.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from pipeline.budgets import Budgets, GiB
from pipeline.planning import plan_device_map
from pipeline.quantization import QuantSettings
from pipeline.speed import ASSUMED, GB, estimate

CONFIG = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16)
TOTAL = 2 * (32000 * 1024 * 2 + 16 * (4 * 1024 * 1024 + 3 * 1024 * 2816))  # fp16 bytes, roughly


def plan(tmp_path: Path, gpu: float, cpu: float = 8 * GiB, quant: str = "none", compressed: bool = False,
         disk: bool = False):
    return plan_device_map(CONFIG, Budgets(gpu=(int(gpu),), cpu=int(cpu), disk=disk, offload_dir=tmp_path),
                           QuantSettings(mode=quant), torch.float16, offload_slots=2,
                           compressed_offload=compressed)


def test_offloading_more_is_slower_and_the_engine_beats_the_hooks(tmp_path: Path) -> None:
    speeds = ASSUMED
    resident = estimate(plan(tmp_path, 4 * GiB), speeds, engine=True)
    half = estimate(plan(tmp_path, TOTAL * 0.6), speeds, engine=True)
    little = estimate(plan(tmp_path, TOTAL * 0.3), speeds, engine=True)
    assert resident.link_bytes_per_token == 0 and half.link_bytes_per_token < little.link_bytes_per_token
    assert resident.decode_tokens_per_s > half.decode_tokens_per_s > little.decode_tokens_per_s
    hooks = estimate(plan(tmp_path, TOTAL * 0.3), speeds, engine=False)
    assert hooks.decode_tokens_per_s < little.decode_tokens_per_s and "pageable" in hooks.link
    # PCIe-bound: doubling the link speed nearly doubles the offloaded plan's speed
    from dataclasses import replace

    fast = estimate(plan(tmp_path, TOTAL * 0.3), replace(speeds, h2d_pinned=2 * speeds.h2d_pinned), engine=True)
    assert 1.6 < fast.decode_tokens_per_s / little.decode_tokens_per_s <= 2.0


def test_compressed_transfer_moves_fewer_bytes_and_is_faster(tmp_path: Path) -> None:
    fp16 = estimate(plan(tmp_path, TOTAL * 0.3), ASSUMED, engine=True)
    nf4 = estimate(plan(tmp_path, TOTAL * 0.3, quant="nf4", compressed=True), ASSUMED, engine=True)
    assert nf4.link_bytes_per_token < fp16.link_bytes_per_token / 2
    assert nf4.decode_tokens_per_s > fp16.decode_tokens_per_s


def test_cold_disk_layers_are_read_at_the_disk_speed(tmp_path: Path) -> None:
    from dataclasses import replace

    split = plan(tmp_path, TOTAL * 0.3, cpu=TOTAL / 3, disk=True)
    assert split.bytes_per_device.get("disk", 0) > 0
    warm = estimate(split, replace(ASSUMED, ram_available=64 * GiB), engine=True)
    cold = estimate(split, replace(ASSUMED, ram_available=0, disk_read=0.2 * GB), engine=True)
    assert warm.disk_bytes_per_token == 0 and cold.disk_bytes_per_token == split.bytes_per_device["disk"]
    assert cold.decode_tokens_per_s < warm.decode_tokens_per_s and cold.bottleneck == "disk"
    assert "from disk" in cold.describe()


def test_prompt_length_adds_compute_to_the_first_token(tmp_path: Path) -> None:
    p = plan(tmp_path, 4 * GiB)
    short, long = estimate(p, ASSUMED, engine=True, prompt_tokens=16), estimate(p, ASSUMED, engine=True,
                                                                                  prompt_tokens=4096)
    assert long.time_to_first_token_s > short.time_to_first_token_s > 1 / short.decode_tokens_per_s * 0.99
    with pytest.raises(KeyError):
        estimate(p, type(ASSUMED)(source="x", gpu_rate={}), engine=True)
