from pathlib import Path

import pytest

from pipeline.errors import ConfigError, ModelSourceError
from pipeline.presets import PRESET_DIR, Preset, list_presets, load_app_config, load_preset_file, resolve_model

REQUIRED = {
    "bigscience/bloom-3b",
    "bigscience/bloom-560m",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "microsoft/Phi-3.5-mini-instruct",
    "models/demo",
}


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_validates(path: Path) -> None:
    preset = load_preset_file(path)
    assert preset.name == path.stem
    assert preset.trust_remote_code is False  # no shipped preset runs remote code
    assert preset.allow_pickle is False
    assert preset.generation.max_new_tokens >= 1


def test_required_presets_shipped_and_demo_is_default() -> None:
    sources = {p.source for p in list_presets().values()}
    assert REQUIRED <= sources
    assert list_presets()["bloom-3b"].quantization == "int8"
    assert load_app_config()["default_model"] == "smollm2-135m-instruct"
    assert resolve_model("demo").local_path == PRESET_DIR.parent.parent / "models" / "demo"


def _write(tmp_path: Path, text: str, name: str = "p") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("- a\n- b\n", "not a mapping"),
        ("display_name: x\n", "missing required key 'source'"),
        ("source: a/b\ncolour: red\n", "unknown key(s) ['colour']"),
        ("source: a/b\ndtype: float8\n", "dtype='float8'"),
        ("source: a/b\nquantization: int3\n", "quantization='int3'"),
        ("source: a/b\ntrust_remote_code: 'yes'\n", "trust_remote_code='yes'"),
        ("source: a/b\ncontext_length: -5\n", "context_length=-5"),
        ("source: a/b\ngeneration: {temprature: 1}\n", "unknown generation setting(s) ['temprature']"),
        ("source: a/b\ngeneration: {temperature: -1}\n", "temperature=-1"),
        ("source: a/b\nint8_skip_modules: lm_head\n", "int8_skip_modules='lm_head'"),
        ("source: [a\n", "invalid YAML"),
    ],
)
def test_bad_preset_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_preset_file(_write(tmp_path, text))
    assert message in str(info.value)


def test_resolve_preset_path_and_hub_id(tiny_llama: Path) -> None:
    assert resolve_model("bloom-3b").source == "bigscience/bloom-3b"
    assert resolve_model("bigscience/bloom-3b").name == "bloom-3b"  # a preset's source finds the preset
    local = resolve_model(str(tiny_llama))
    assert local.local_path == tiny_llama and local.trust_remote_code is False
    hub = resolve_model("someone/some-model")
    assert hub.source == "someone/some-model" and hub.local_path is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("no-such-preset", "is not a preset"),
        ("../../no-such-dir/weights", "does not exist"),
        ("owner/../../etc", "does not exist"),
        ("/definitely/not/here", "does not exist"),
        ("a\x00b", "control characters"),
    ],
)
def test_bad_model_specs(spec: str, message: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        resolve_model(spec)
    assert message in str(info.value)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="is not a directory"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_preset_defaults() -> None:
    preset = Preset(name="x", source="a/b")
    assert preset.int8_skip_modules == ("lm_head",)
    assert preset.trust_remote_code is False
    assert preset.display_name == "x"


def test_one_offload_folder_rule_for_the_app_and_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import app
    from pipeline.cli import build_parser
    from pipeline.session import ModelManager
    from pipeline.presets import REPO_ROOT, offload_root

    monkeypatch.chdir(tmp_path)  # started from elsewhere: relative folders still mean the repository's
    assert offload_root("scratch/off") == REPO_ROOT / "scratch" / "off"
    assert offload_root(None, {"offload_dir": "offload"}) == REPO_ROOT / "offload"
    assert offload_root("  ", {"offload_dir": "elsewhere"}) == REPO_ROOT / "elsewhere"
    assert offload_root(str(tmp_path / "abs")) == tmp_path / "abs"
    values = ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, "scratch/off", 1.0]
    chat = app.ChatApp({"offload_dir": "offload"}, ModelManager())
    assert chat.make_settings(*values).offload_dir == str(REPO_ROOT / "scratch" / "off")
    args = build_parser({}).parse_args(["--offload-dir", "scratch/off"])
    assert offload_root(args.offload_dir, {}) == REPO_ROOT / "scratch" / "off"


def test_library_versions_outside_the_tested_ranges_are_named() -> None:
    from pipeline.versions import TESTED, outside_tested

    assert outside_tested() == []  # what this suite runs with is inside the declared ranges
    messages = outside_tested({"accelerate": "1.16.0", "bitsandbytes": "0.49.0"})
    assert len(messages) == 2
    assert messages[0].startswith("accelerate 1.16.0 is outside the tested range >=1.15.0,<1.16")
    assert "bitsandbytes 0.49.0" in messages[1] and "compressed transfer may fail" in messages[1]
    requirements = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
    for package, (low, high) in TESTED.items():
        assert f"{package}>={low},<{high}" in requirements  # one source of truth, kept in step
