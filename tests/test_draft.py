"""A draft model, planned with its target: its weights and KV cache come out of the compute device's
budget (byte-exact), a draft with another tokenizer is refused before any weight is read, and a refused
draft leaves the loaded model serving."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import save_checkpoint, tiny_llama_config
from pipeline.budgets import GiB, Budgets
from pipeline.errors import ModelSourceError
from pipeline.presets import Preset

# The draft: a 1-layer Llama, hidden 32, 4 heads of 8 (2 key/value heads), MLP 64, tied embeddings,
# float32, 256 positions, over the test tokenizer's V tokens.
#   weights: embeddings V x 32; q, o 32 x 32; k, v 32 x 16; gate, up 32 x 64; down 64 x 32; norms 2 x 32 + 32
#   buffers: the rotary inverse frequencies and their original, 2 x 8 / 2 = 8 floats
#   KV cache per token: 2 (keys, values) x 1 layer x 2 heads x 8 x 4 bytes = 128 bytes; x 256 tokens = 32 KiB
DRAFT_LAYER_FLOATS = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
DRAFT_CACHE_BYTES = 2 * 1 * 2 * 8 * 4 * 256


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("draft")
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["zebra"])  # one token more ...
    other.eos_token = "<|endoftext|>"  # ... and another end of sequence
    return {
        "target": save_checkpoint(tiny_llama_config(len(tok)), root / "target", tok),
        "draft": save_checkpoint(tiny_llama_config(len(tok), layers=1, hidden=32), root / "draft", tok, seed=1),
        "other": save_checkpoint(tiny_llama_config(len(other), layers=1, hidden=32), root / "other", other, seed=2),
    }


def preset(checkpoints: dict[str, Path], draft: str | None = "draft") -> Preset:
    return Preset(name="target", source=str(checkpoints["target"]), display_name="Target",
                  draft=str(checkpoints[draft]) if draft else None)


def test_the_drafts_weights_and_cache_are_priced_byte_exactly(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.loading import prepare

    vocab = len(AutoTokenizer.from_pretrained(checkpoints["target"]))
    draft = prepare(preset(checkpoints), Budgets((), GiB, True, tmp_path), estimate_speed=False).plan.draft
    assert draft.device == "cpu" and draft.context_length == 256
    assert draft.weight_bytes == 4 * (vocab * 32 + DRAFT_LAYER_FLOATS + 32 + 8)
    assert draft.cache_bytes == DRAFT_CACHE_BYTES
    loaded = AutoModelForCausalLM.from_pretrained(checkpoints["draft"])  # the weights as loaded agree
    assert sum(p.numel() * p.element_size() for p in loaded.parameters()) == draft.weight_bytes - 8 * 4


def test_the_planner_takes_the_draft_out_of_the_cpu_budget(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Without a GPU: the target is planned in the CPU budget less the draft; a budget that holds the
    target alone sends a layer to disk once the draft is attached."""
    from pipeline.loading import prepare

    def plan(cpu: int, draft: str | None):
        return prepare(preset(checkpoints, draft), Budgets((), cpu, True, tmp_path), estimate_speed=False).plan

    alone = plan(GiB, None)
    size = plan(GiB, "draft").draft.total_bytes
    spilled = False
    for extra in range(0, 2 * size, size // 8):
        cpu = alone.total_bytes + extra
        with_draft, reduced = plan(cpu, "draft"), plan(cpu - size, None)
        assert with_draft.device_map == reduced.device_map and with_draft.bytes_per_device == reduced.bytes_per_device
        spilled |= "disk" in with_draft.bytes_per_device and "disk" not in plan(cpu, None).bytes_per_device
    assert spilled, "no budget was found where the draft's bytes moved the target's layers"
    shown = plan(GiB, "draft")
    assert shown.to_dict()["draft"]["cache_bytes"] == DRAFT_CACHE_BYTES
    assert "· draft draft on CPU (" in shown.summary and "KV cache for 256 tokens" in shown.summary


def test_the_planner_takes_the_draft_out_of_the_gpu_budget(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """With a GPU budget (planned only: nothing is loaded) the draft lives on GPU 0, out of its budget."""
    from pipeline.loading import prepare
    from pipeline.preview import plan_html

    def plan(gpu: int, draft: str | None):
        return prepare(preset(checkpoints, draft), Budgets((gpu,), GiB, True, tmp_path), engine="accelerate",
                       estimate_speed=False).plan

    size = plan(GiB, "draft").draft.total_bytes
    gpu = plan(GiB, None).total_bytes  # the target alone fits on the GPU ...
    assert set(plan(gpu + size, None).bytes_per_device) == {0}
    with_draft = plan(gpu, "draft")  # ... and with the draft, part of it goes to the CPU
    assert with_draft.draft.device == 0
    assert with_draft.device_map == plan(gpu - size, None).device_map
    assert with_draft.bytes_per_device[0] <= gpu - size and with_draft.bytes_per_device["cpu"] > 0
    picture = plan_html(with_draft)
    assert 'class="plan-draft" data-device="0"' in picture and "Draft model</b> draft on GPU0" in picture


def test_a_draft_that_does_not_fit_is_refused_naming_its_size(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.errors import DoesNotFitError
    from pipeline.loading import prepare

    with pytest.raises(DoesNotFitError, match=r"the draft model draft needs .* on GPU0, but the GPU0 budget is 1.0 KiB"):
        prepare(preset(checkpoints), Budgets((1024,), GiB, True, tmp_path), estimate_speed=False)


class LoadSpy:
    """AutoModelForCausalLM.from_pretrained, recording what it was asked to load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers import AutoModelForCausalLM

        self.sources: list[str] = []
        original = AutoModelForCausalLM.from_pretrained

        def spy(source, *args, **kwargs):
            self.sources.append(str(source))
            return original(source, *args, **kwargs)

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)


def test_a_draft_with_another_tokenizer_is_refused_before_any_weight_is_loaded(
        checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.loading import load_model

    spy = LoadSpy(monkeypatch)
    with pytest.raises(ModelSourceError) as refused:
        load_model(preset(checkpoints, "other"), Budgets((), GiB, True, tmp_path))
    message = str(refused.value)
    assert spy.sources == [], "weights were loaded before the tokenizers were compared"
    assert "the draft model 'other'" in message and str(checkpoints["other"]) in message
    assert "'Target'" in message and str(checkpoints["target"]) in message
    assert "vocabulary of 320 vs 321 tokens" in message and "'zebra': None vs 320" in message
    assert "eos_token '<|end|>'" in message and "'<|endoftext|>'" in message


def test_a_refused_draft_leaves_the_loaded_model_serving(checkpoints: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.params import GenerationParams
    from pipeline.session import ModelManager, Settings

    manager = ModelManager()
    settings = Settings(model=str(checkpoints["target"]), cpu_gib=1, disk=True, offload_dir=str(tmp_path))
    loaded = manager.load(settings)
    try:
        spy = LoadSpy(monkeypatch)
        with pytest.raises(ModelSourceError, match="does not share the tokenizer"):
            manager.load(dataclasses.replace(settings, draft=str(checkpoints["other"])))
        assert spy.sources == [] and manager.current is loaded and loaded.loaded
        reply = "".join(manager.stream([{"role": "user", "content": "Hello"}],
                                       GenerationParams(temperature=0, max_new_tokens=4)))
        assert reply
        with_draft = manager.load(dataclasses.replace(settings, draft=str(checkpoints["draft"])))
        assert with_draft.draft is not None and with_draft.plan.draft.model == "draft"
        assert spy.sources == [str(checkpoints["target"]), str(checkpoints["draft"])]
        params = GenerationParams(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
        messages = [{"role": "user", "content": "The quick brown fox. The quick brown fox. The quick"}]
        assert "".join(manager.stream(messages, params.replace(speculate="draft"))) == \
            "".join(manager.stream(messages, params.replace(speculate="off")))
    finally:
        if manager.current is not None:
            manager.current.unload()
    assert with_draft.draft is None  # unloading lets the draft go too


def test_preset_draft_key_is_validated() -> None:
    from pipeline.errors import ConfigError

    assert Preset.from_dict("x", {"source": "models/demo", "draft": "demo"}).draft == "demo"
    with pytest.raises(ConfigError, match="preset 'x': draft=3 must be a preset name or a local checkpoint path"):
        Preset.from_dict("x", {"source": "models/demo", "draft": 3})
    attached = Preset.from_dict("x", {"source": "models/demo"}).with_draft("demo")
    assert attached.draft == "demo" and attached.generation.speculate == "draft"  # attached to be used
    assert attached.with_draft("").draft is None and attached.with_draft("").generation.speculate == "lookup"
    with pytest.raises(ConfigError, match="generation.speculate is 'draft' but the preset has no draft model"):
        Preset.from_dict("x", {"source": "models/demo", "generation": {"speculate": "draft"}})
    assert Preset.from_dict("x", {"source": "models/demo", "draft": "demo",
                                  "generation": {"speculate": "draft"}}).generation.speculate == "draft"
