"""Planner tests on meta-device models: no weights, byte-exact budgets.

Sizes of TINY (Llama, hidden 64, 4 layers, vocab 1000, tied embeddings), float32:
  embed_tokens (tied with lm_head) 1000*64*4 = 256,000 B
  each decoder layer: attention 64*64*4*2 (q, o) + 64*32*4*2 (k, v) = 49,152
                      MLP 3 * 64*128*4 = 98,304; two norms 2*64*4 = 512   -> 147,968 B
  final norm 256 B; rotary inv_freq buffers 64 B (2 * 8 floats)
  total 256,000 + 4*147,968 + 256 + 64 = 848,192 B
accelerate keeps one largest layer (147,968 B) free on the compute device and on the CPU.
"""

from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, GPT2Config, LlamaConfig

from pipeline.budgets import Budgets, GiB
from pipeline.errors import DoesNotFitError
from pipeline.planning import empty_model, format_ranges, no_split_classes, plan_device_map
from pipeline.quantization import QuantSettings

LAYER = 147_968
EMBED = 256_000
TOTAL = 848_192
OFF = Path("/nonexistent-offload")


def tiny(tie: bool = True, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tie,
    )


def budgets(gpu: tuple[int, ...] = (), cpu: int = 0, disk: bool = True, cap: int | None = None) -> Budgets:
    return Budgets(gpu=gpu, cpu=cpu, disk=disk, offload_dir=OFF, disk_cap=cap)


def test_sizes_in_the_docstring_are_right() -> None:
    plan = plan_device_map(tiny(), budgets(cpu=10 * TOTAL))
    assert plan.total_bytes == TOTAL
    assert plan.bytes_per_device == {"cpu": TOTAL}
    assert plan.layers_per_device == {"cpu": (0, 1, 2, 3)}


def test_cpu_budget_is_byte_exact() -> None:
    # Room for the reserve + embeddings + exactly two layers: layers 2, 3 go to disk.
    fits_two = LAYER + EMBED + 2 * LAYER
    plan = plan_device_map(tiny(), budgets(cpu=fits_two))
    assert plan.layers_per_device == {"cpu": (0, 1), "disk": (2, 3)}
    assert plan.bytes_per_device["cpu"] == EMBED + 2 * LAYER
    # One byte less and layer 1 no longer fits.
    plan = plan_device_map(tiny(), budgets(cpu=fits_two - 1))
    assert plan.layers_per_device == {"cpu": (0,), "disk": (1, 2, 3)}
    assert plan.device_map["model.embed_tokens"] == "cpu"


def test_gpu_cpu_disk_split_and_summary() -> None:
    # GPU holds reserve + embeddings + 1 layer; CPU reserve + 2 layers; the rest on disk.
    plan = plan_device_map(tiny(), budgets(gpu=(LAYER + EMBED + LAYER,), cpu=LAYER + 2 * LAYER))
    assert plan.layers_per_device == {0: (0,), "cpu": (1, 2), "disk": (3,)}
    assert plan.device_map["model.embed_tokens"] == 0 and plan.device_map["lm_head"] == 0
    assert plan.summary.startswith("GPU0: embeddings + lm_head + layer 0 (")
    assert " · CPU: layers 1–2 (289.0 KiB) · disk: layer 3 + norm + rotary_emb" in plan.summary
    assert plan.compute_device == "cuda:0" and plan.offloaded
    shares = plan.share()
    assert set(shares) == {"GPU", "CPU", "disk"} and abs(sum(shares.values()) - 1) < 1e-9


def test_tied_weights_stay_together_under_every_budget() -> None:
    for cpu in range(0, TOTAL + 2 * LAYER, 9_973):
        plan = plan_device_map(tiny(), budgets(gpu=(), cpu=cpu))
        assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"], cpu
    for gpu in range(0, TOTAL + 2 * LAYER, 19_997):
        plan = plan_device_map(tiny(), budgets(gpu=(gpu,), cpu=LAYER + 2 * LAYER), QuantSettings("int8"))
        assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"], gpu


def test_sizes_follow_the_load_dtype_not_the_config_dtype() -> None:
    config = tiny()
    config.dtype = torch.bfloat16  # a 16-bit checkpoint loaded in float32 takes float32 bytes
    assert plan_device_map(config, budgets(cpu=10 * TOTAL), dtype=torch.float32).total_bytes == TOTAL
    assert plan_device_map(config, budgets(cpu=10 * TOTAL), dtype=torch.bfloat16).total_bytes == TOTAL // 2


def test_untied_head_is_planned_on_its_own() -> None:
    plan = plan_device_map(tiny(tie=False), budgets(cpu=10 * TOTAL))
    assert plan.total_bytes == TOTAL + EMBED
    assert plan.device_map["lm_head"] == "cpu"


def test_does_not_fit_without_disk_names_the_sizes() -> None:
    with pytest.raises(DoesNotFitError, match=r"needs 828\.3 KiB .* disk, which is off"):
        plan_device_map(tiny(), budgets(cpu=EMBED, disk=False), model_name="tiny")


def test_does_not_fit_over_the_disk_cap() -> None:
    with pytest.raises(DoesNotFitError, match="disk cap"):
        plan_device_map(tiny(), budgets(cpu=0, cap=100_000))
    plan = plan_device_map(tiny(), budgets(cpu=0, cap=TOTAL))
    assert plan.bytes_per_device == {"disk": TOTAL}


def test_int8_prices_gpu_linears_at_one_byte_and_offloaded_modules_at_full_size() -> None:
    # Quantized layer: 6 Linear weights at 1 byte (36,864 B) + norms 512 B = 37,376 B.
    quant_layer = 37_376
    plan = plan_device_map(tiny(), budgets(gpu=(10 * TOTAL,), cpu=0), QuantSettings("int8"))
    # lm_head is skipped (kept 32-bit) and tied to the embeddings: 256,000 B on the GPU.
    assert plan.bytes_per_device == {0: EMBED + 4 * quant_layer + 256 + 64}
    # One byte short of the whole quantized model (405,824 B): offloading starts, and then the GPU keeps a
    # full-size layer free (accelerate brings offloaded layers over unquantized), which leaves room for the
    # embeddings only. Pricing the reserve at the quantized size would have put layers 0-2 on the GPU.
    plan = plan_device_map(tiny(), budgets(gpu=(405_823,), cpu=LAYER + 4 * LAYER + 320), QuantSettings("int8"))
    assert plan.layers_per_device == {"cpu": (0, 1, 2, 3)}
    assert plan.bytes_per_device == {0: EMBED, "cpu": 4 * LAYER + 256 + 64}
    assert any("stay unquantized" in n for n in plan.notes)


def test_nf4_is_half_a_byte_per_weight() -> None:
    plan = plan_device_map(tiny(), budgets(gpu=(10 * TOTAL,)), QuantSettings("nf4"))
    assert plan.bytes_per_device == {0: EMBED + 4 * (36_864 // 2 + 512) + 256 + 64}


def test_cpu_only_quantization_cannot_use_disk() -> None:
    plan = plan_device_map(tiny(), budgets(cpu=TOTAL), QuantSettings("int8"))
    assert set(plan.device_map.values()) == {"cpu"} and not plan.offloaded
    with pytest.raises(DoesNotFitError, match="without a GPU, quantized weights cannot be offloaded to disk"):
        plan_device_map(tiny(), budgets(cpu=EMBED), QuantSettings("int8"))


def test_seven_billion_parameter_plan_allocates_and_reads_nothing() -> None:
    """Planning is pure: a config object in, a plan out; the model is built on the meta device only
    (speed is measured by benchmarks, not asserted here)."""
    import psutil

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    before = psutil.Process().memory_info().rss
    plan = plan_device_map(config, budgets(gpu=(8 * GiB,), cpu=3 * GiB), dtype=torch.float16)
    assert psutil.Process().memory_info().rss - before < 512 * 1024**2  # 13.5 GB of weights were never allocated
    assert 12.4 * GiB < plan.total_bytes < 12.7 * GiB  # 6.74e9 params * 2 B
    assert set(plan.layers_per_device) == {0, "cpu", "disk"}
    assert sum(len(v) for v in plan.layers_per_device.values()) == 32


def test_gpt2_and_bloom_layer_lists_are_found() -> None:
    gpt2 = plan_device_map(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=500), budgets(cpu=GiB))
    assert gpt2.layers_per_device == {"cpu": (0, 1, 2)}
    bloom = plan_device_map(BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=500), budgets(cpu=GiB))
    assert bloom.layers_per_device == {"cpu": (0, 1, 2)} and "BloomBlock" in bloom.no_split_modules


def test_missing_no_split_modules_falls_back_to_the_layer_class() -> None:
    model = empty_model(tiny())
    model._no_split_modules = set()
    classes, note = no_split_classes(model, None)
    assert classes == ("LlamaDecoderLayer",)
    assert "declares no _no_split_modules" in note
    assert no_split_classes(model, ("Custom",)) == (("Custom",), None)


def test_plan_json_round_trip() -> None:
    import json

    plan = plan_device_map(tiny(), budgets(cpu=LAYER + EMBED + 2 * LAYER), model_name="tiny")
    data = json.loads(plan.to_json())
    assert data["bytes_per_device"] == {"cpu": EMBED + 2 * LAYER, "disk": 2 * LAYER + 256 + 64}
    assert data["device_map"]["model.layers.3"] == "disk"
    assert data["layers_per_device"] == {"cpu": [0, 1], "disk": [2, 3]}


def test_empty_model_is_on_meta_and_tied() -> None:
    model = empty_model(tiny())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_format_ranges() -> None:
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"
    assert format_ranges([]) == ""


def test_two_gpus_fill_in_order_then_cpu_then_disk() -> None:
    # GPU0: reserve + embeddings + 1 layer; GPU1 (no reserve: not the main device) 1 layer; CPU: reserve + 1.
    plan = plan_device_map(tiny(), budgets(gpu=(LAYER + EMBED + LAYER, LAYER), cpu=LAYER + LAYER))
    assert plan.layers_per_device == {0: (0,), 1: (1,), "cpu": (2,), "disk": (3,)}
    assert plan.summary.startswith("GPU0: embeddings + lm_head + layer 0 (") and " · GPU1: layer 1 (" in plan.summary
    assert plan.compute_device == "cuda:0" and plan.share()["GPU"] > 0.5
    assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"] == 0


def test_an_unused_gpu_is_skipped() -> None:
    plan = plan_device_map(tiny(), budgets(gpu=(0, 10 * TOTAL), cpu=0))
    assert set(plan.bytes_per_device) == {1} and plan.compute_device == "cuda:1"


def test_with_two_gpus_the_engine_slots_go_on_the_gpu_that_runs_offloaded_layers() -> None:
    # Layers 0-1 fit GPU0 (with accelerate's one-layer room), GPU1 holds 3 layers' worth.
    two = budgets(gpu=(LAYER + EMBED + 2 * LAYER, 3 * LAYER), cpu=10 * TOTAL)
    hooks = plan_device_map(tiny(layers=8), two, offload_slots=1)
    engine = plan_device_map(tiny(layers=8), two, offload_slots=2)
    assert hooks.layers_per_device[0] == engine.layers_per_device[0] == (0, 1)  # GPU0 gives up nothing
    assert hooks.layers_per_device[1] == (2, 3, 4)
    assert engine.layers_per_device[1] == (2,)  # both slots taken from GPU1's budget
    assert engine.offload_device == "cuda:1" and engine.multi_gpu
    assert engine.layers_per_device["cpu"] == (3, 4, 5, 6, 7)
    one = plan_device_map(tiny(layers=8), budgets(gpu=(LAYER + EMBED + 2 * LAYER,), cpu=10 * TOTAL), offload_slots=2)
    assert one.offload_device == "cuda:0" and not one.multi_gpu


def test_buffers_are_priced_at_their_real_size_and_kept_when_split(tmp_path: Path) -> None:
    """gpt_bigcode's causal mask (bool, positions^2 bytes) was priced at an eighth and left out of split plans."""
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=256, n_layer=4, n_head=4, n_positions=2048, vocab_size=1000, bos_token_id=0,
                              eos_token_id=0)
    mask = 2048 * 2048  # one byte per element
    whole = plan_device_map(config, Budgets(gpu=(), cpu=10**8, disk=True, offload_dir=tmp_path), QuantSettings(),
                            torch.float32)
    weights = sum(p.numel() for p in empty_model(config, False, torch.float32).parameters()) * 4
    assert whole.total_bytes == weights + mask
    split = plan_device_map(config, Budgets(gpu=(), cpu=7 * 10**6, disk=True, offload_dir=tmp_path), QuantSettings(),
                            torch.float32)
    assert split.device_map["transformer.bias"] == "cpu"  # in memory (built at init, never read from disk)
    assert split.total_bytes == whole.total_bytes and split.bytes_per_device["cpu"] <= 7 * 10**6


def test_plan_json_has_whole_byte_counts(tmp_path: Path) -> None:
    import json

    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    plan = plan_device_map(config, Budgets(gpu=(), cpu=10**8, disk=True, offload_dir=tmp_path),
                           QuantSettings(mode="nf4"), torch.float32)
    data = json.loads(plan.to_json())
    assert all(type(v) is int for v in data["bytes_per_device"].values())
    assert all(type(b["bytes"]) is int for b in data["blocks"])
