"""Loading on CPU: splits over cpu+disk, bitsandbytes 8/4-bit, unload, and bad checkpoints."""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from conftest import greedy, save_checkpoint, tiny_llama_config
from pipeline.budgets import GiB, Budgets, Hardware
from pipeline.errors import LoadError, ModelSourceError
from pipeline.loading import load_model, unload
from pipeline.presets import resolve_model
from pipeline.quantization import QuantSettings

def cpu_budgets(tmp_path: Path, cpu: int, disk: bool = True) -> Budgets:
    return Budgets(gpu=(), cpu=cpu, disk=disk, offload_dir=tmp_path / "offload")


@pytest.mark.parametrize("model", ["tiny_llama", "demo_dir"])
def test_cpu_disk_split_matches_all_cpu(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    preset = resolve_model(str(request.getfixturevalue(model)))
    whole = load_model(preset, cpu_budgets(tmp_path, 8 * GiB, disk=False))
    assert set(whole.plan.device_map.values()) == {"cpu"}
    expected = greedy(whole)
    part = whole.plan.total_bytes * 3 // 4  # minus the one-layer reserve: some layers stay, the rest to disk
    unload(whole)
    split = load_model(preset, cpu_budgets(tmp_path, part))
    assert "disk" in split.plan.layers_per_device and "cpu" in split.plan.layers_per_device
    assert split.offload_dir is not None and split.offload_dir.is_dir()
    assert greedy(split) == expected
    folder = split.offload_dir
    unload(split)
    assert not folder.exists()  # the per-model offload folder goes with the model


def test_everything_on_disk_still_generates(tiny_llama: Path, tmp_path: Path) -> None:
    preset = resolve_model(str(tiny_llama))
    whole = load_model(preset, cpu_budgets(tmp_path, GiB, disk=False))
    expected = greedy(whole)
    unload(whole)
    disk = load_model(preset, cpu_budgets(tmp_path, 1000))  # ~nothing in RAM: every layer on disk
    assert set(disk.plan.layers_per_device) == {"disk"}
    assert greedy(disk) == expected
    unload(disk)


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_bitsandbytes_on_cpu_quantizes_and_generates(mode: str, tiny_llama: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    loaded = load_model(resolve_model(str(tiny_llama)), cpu_budgets(tmp_path, GiB, disk=False), QuantSettings(mode))
    linear = loaded.model.model.layers[0].mlp.down_proj
    expected = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(linear, expected)
    assert not isinstance(loaded.model.lm_head, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))  # skipped: lm_head
    tokens = greedy(loaded, 6)
    assert len(tokens) == 6 and all(0 <= t < len(loaded.tokenizer) for t in tokens)
    unload(loaded)


def test_bf16_load_on_cpu(tiny_llama: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    preset = replace(resolve_model(str(tiny_llama)), dtype="bfloat16")
    loaded = load_model(preset, cpu_budgets(tmp_path, GiB, disk=False))
    assert loaded.model.dtype == torch.bfloat16
    assert len(greedy(loaded, 4)) == 4
    unload(loaded)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_unload_returns_cpu_memory(tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # ~200 MB of float32 weights, so that a leak is far above allocator noise.
    config = tiny_llama_config(len(tok), layers=6, hidden=1024)
    path = save_checkpoint(config, tmp_path / "big", tok)
    preset = resolve_model(str(path))
    budgets = cpu_budgets(tmp_path, 4 * GiB, disk=False)
    unload(load_model(preset, budgets))  # warm-up: imports, allocator arenas, kernels
    baseline = _rss()
    loaded = load_model(preset, budgets)
    greedy(loaded, 2)
    size = loaded.plan.total_bytes
    assert size > 150 * 1024**2
    assert _rss() - baseline > 0.5 * size  # the weights really were in RAM
    unload(loaded)
    assert loaded.model is None
    assert _rss() - baseline < 0.1 * size, "RSS did not return near the baseline after unload"


def test_pickle_only_checkpoint_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickle"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelSourceError, match=r"only pickle checkpoints .* \(--allow-pickle\)"):
        load_model(resolve_model(str(folder)), cpu_budgets(tmp_path, GiB))


def test_folder_without_weights(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="no weight files"):
        load_model(resolve_model(str(folder)), cpu_budgets(tmp_path, GiB))


def test_missing_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notok"
    shutil.copytree(tiny_llama, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelSourceError, match="cannot load its tokenizer"):
        load_model(resolve_model(str(folder)), cpu_budgets(tmp_path, GiB))


def test_truncated_safetensors_is_a_load_error_and_cleans_up(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    budgets = cpu_budgets(tmp_path, 1000)
    with pytest.raises(LoadError, match="loading .* failed"):
        load_model(resolve_model(str(folder)), budgets)
    assert list((tmp_path / "offload").glob("*")) == []  # no partial offload folder left behind


def test_unwritable_offload_folder(tiny_llama: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    budgets = Budgets(gpu=(), cpu=1000, disk=True, offload_dir=blocker / "sub")
    with pytest.raises(LoadError, match="is not writable"):
        load_model(resolve_model(str(tiny_llama)), budgets)


def test_progress_is_reported_in_order(tiny_llama: Path, tmp_path: Path) -> None:
    seen: list[tuple[float, str]] = []
    loaded = load_model(resolve_model(str(tiny_llama)), cpu_budgets(tmp_path, GiB),
                        progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any(m == "Loading weights" for _, m in seen)  # per-tensor progress, not just start/end
    unload(loaded)


HOLDER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from conftest import greedy
from pipeline.budgets import Budgets
from pipeline.loading import load_model, unload
from pipeline.presets import resolve_model
loaded = load_model(resolve_model({model!r}), Budgets(gpu=(), cpu={cpu}, disk=True, offload_dir=Path({root!r})),
                    allow_pickle=True)
print(loaded.offload_dir, flush=True)
sys.stdin.readline()  # the other process loads and unloads the same model meanwhile
print(greedy(loaded), flush=True)
unload(loaded)
print(loaded.offload_dir is None, flush=True)
"""


def test_two_processes_loading_the_same_model_keep_their_own_offload_folders(tokenizer_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import AutoTokenizer

    # A pickle checkpoint: transformers writes its disk layers into the offload folder (safetensors
    # would only be indexed where they are, leaving the folder empty).
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_llama = save_checkpoint(tiny_llama_config(len(tok)), tmp_path / "pickled", tok)
    from safetensors.torch import load_file

    torch.save(load_file(tiny_llama / "model.safetensors"), tiny_llama / "pytorch_model.bin")
    (tiny_llama / "model.safetensors").unlink()
    repo = Path(__file__).resolve().parent.parent
    preset = resolve_model(str(tiny_llama))
    root = tmp_path / "shared-root"
    whole = load_model(preset, cpu_budgets(tmp_path, GiB, disk=False), allow_pickle=True)
    expected, part = greedy(whole), whole.plan.total_bytes * 3 // 4
    unload(whole)
    script = HOLDER.format(repo=str(repo), tests=str(repo / "tests"), model=str(tiny_llama), cpu=part, root=str(root))
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(other.stdout.readline().strip())
        assert theirs.is_dir() and any(theirs.iterdir())
        mine = load_model(preset, Budgets(gpu=(), cpu=part, disk=True, offload_dir=root), allow_pickle=True)
        assert any(mine.offload_dir.iterdir())  # same model, same settings, files of its own
        assert mine.offload_dir != theirs and mine.offload_dir.parent == theirs.parent
        assert greedy(mine) == expected
        unload(mine)
        assert theirs.is_dir() and any(theirs.iterdir()), "unloading here deleted the other process's files"
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == str(expected)  # the other process still reads its layers
        assert other.stdout.readline().strip() == "True"
    finally:
        other.kill() if other.poll() is None else None
        other.wait(timeout=60)
    assert not theirs.exists()


def test_a_user_folder_is_never_emptied_and_created_parents_go(tiny_llama: Path, tmp_path: Path) -> None:
    preset = resolve_model(str(tiny_llama))
    total = load_model(preset, cpu_budgets(tmp_path, GiB, disk=False))
    part = total.plan.total_bytes * 3 // 4
    unload(total)
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    loaded = load_model(preset, Budgets(gpu=(), cpu=part, disk=True, offload_dir=mine))
    assert loaded.offload_dir.parent == mine
    unload(loaded)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    nested = tmp_path / "new" / "deeper" / "offload"
    loaded = load_model(preset, Budgets(gpu=(), cpu=part, disk=True, offload_dir=nested))
    assert loaded.offload_dir.parent == nested
    unload(loaded)
    assert not (tmp_path / "new").exists()  # the parents this load created went with it


def test_a_load_whose_offload_files_do_not_fit_on_the_disk_is_refused_before_unloading(
        tokenizer_dir: Path, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only files a load writes need free space: a pickle checkpoint's disk layers (re-saved in full).
    Safetensors disk layers are read in place and need none."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import pipeline.loading as loading
    from pipeline.errors import DoesNotFitError
    from pipeline.loading import offload_bytes_written, prepare
    from pipeline.session import ModelManager, Settings

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pickled = save_checkpoint(tiny_llama_config(len(tok)), tmp_path / "pickled", tok)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    whole = prepare(resolve_model(str(tiny_llama)), cpu_budgets(tmp_path, GiB, disk=False))
    part = whole.plan.total_bytes // 2
    budgets = Budgets(gpu=(), cpu=part, disk=True, offload_dir=tmp_path / "off")
    pickle_preset = replace(resolve_model(str(pickled)), allow_pickle=True)
    plan = prepare(pickle_preset, budgets)
    on_disk = plan.plan.bytes_per_device["disk"]
    assert on_disk > 0 and offload_bytes_written(plan, pickle_preset) == on_disk
    assert offload_bytes_written(prepare(resolve_model(str(tiny_llama)), budgets), resolve_model(str(tiny_llama))) == 0

    monkeypatch.setattr(loading, "free_disk", lambda path: on_disk // 2)  # a nearly full disk
    with pytest.raises(DoesNotFitError, match=r"writes .* of offload files to .* but only .* is free there"):
        load_model(pickle_preset, budgets)
    assert not (tmp_path / "off").exists()  # refused before anything was created
    in_place = load_model(resolve_model(str(tiny_llama)), budgets)  # safetensors: read in place, no space needed
    assert in_place.plan.bytes_per_device["disk"] > 0 and greedy(in_place)
    unload(in_place)

    manager = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))
    manager.load(Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(tmp_path / "off")))
    before = manager.current
    monkeypatch.setattr("pipeline.session.resolve_model", lambda spec, **kw: replace(resolve_model(spec, **kw), allow_pickle=True))
    with pytest.raises(DoesNotFitError, match="is free there"):
        manager.load(Settings(model=str(pickled), cpu_gib=part / GiB, offload_dir=str(tmp_path / "off")))
    assert manager.current is before and before.loaded  # never unloaded: checked first
    unload(before)
