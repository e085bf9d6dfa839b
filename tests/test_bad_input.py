"""The bad-input catalogue: what strangers type into a shared app, the CLI and the API.

Every case must give a clear message naming the problem; the app keeps serving and the model
loaded before still answers; no partial offload files are left and nothing is written outside
the offload folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import SETTING_NAMES
from app_server import REPO, running_app

# /load_model inputs on a machine without GPUs (see tests/test_app.py).
BASE = dict(zip(SETTING_NAMES, ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, "", 1.0]))
CHAT = dict(system="", max_new_tokens=16, temperature=0, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=-1)


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    """Checkpoints broken in every way the catalogue needs, made from the tiny Llama."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(tiny_llama, target)
        return target

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 4096)
    no_tokenizer = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    pickle_only = copy("pickle-only")
    (pickle_only / "model.safetensors").unlink()
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint")
    remote = copy("remote-code")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my-secret-arch", auto_map={"AutoConfig": "configuration_secret.SecretConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    configs = {}
    for name, change in {"absurd-layers": {"num_hidden_layers": 20000}, "zero-heads": {"num_attention_heads": 0},
                         "huge-hidden": {"hidden_size": 2**40}, "null-size": {"intermediate_size": None}}.items():
        configs[name] = copy(name)
        config = json.loads((configs[name] / "config.json").read_text())
        config.update(change)
        (configs[name] / "config.json").write_text(json.dumps(config))
    bad_tokenizer = copy("bad-tokenizer")  # an exception type the tokenizer loader did not catch
    (bad_tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": 5}}))
    configs["bad-tokenizer"] = bad_tokenizer
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("hello")
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    return {"truncated": truncated, "garbage": garbage, "no-tokenizer": no_tokenizer, "pickle-only": pickle_only,
            "remote-code": remote, "not-a-model": not_a_model, "unwritable": blocker / "offload", **configs}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    from gradio_client import Client

    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(log=log) as url:
        yield Client(url, verbose=False)


def repo_state() -> str:
    """Tracked and untracked-but-not-ignored files of the repo: must not change (offload/ is ignored)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True).stdout


def offload_leftovers() -> list[str]:
    """Offload folders under the offload root (speeds.json there is the measured link speeds' cache)."""
    root = REPO / "offload"
    return sorted(p.name for p in root.glob("*") if p.name != "speeds.json") if root.exists() else []


def still_answers(client) -> None:
    job = client.submit("And God said", *CHAT.values(), api_name="/chat")
    assert len(job.result().split()) >= 3, "the loaded model stopped answering"


LOAD_CASES = [
    # The slider itself refuses out-of-range values (Gradio's message names value and range); the
    # pipeline's own checks behind it are tested in test_budgets.py and through the CLI below.
    ("negative CPU budget", {"cpu": -1.0}, r"Value -1.0 is less than minimum value 0"),
    ("CPU budget larger than the machine", {"cpu": 100_000.0}, r"Value 100000.0 is greater than maximum value"),
    ("unknown preset", {"custom": "no-such-preset"}, "is not a preset"),
    ("missing path", {"custom": "/no/such/model/folder"}, "does not exist"),
    ("folder that is not a model", {"custom": "@not-a-model"}, "no config.json"),
    ("truncated safetensors", {"custom": "@truncated"}, "loading .* failed"),
    ("corrupt safetensors", {"custom": "@garbage"}, "loading .* failed"),
    ("missing tokenizer", {"custom": "@no-tokenizer"}, "cannot load its tokenizer"),
    ("tokenizer file of the wrong shape", {"custom": "@bad-tokenizer"}, "Loading failed: .*tokenizer|is still loaded"),
    ("hub ID with path traversal", {"custom": "owner/../../etc/shadow"}, "does not exist"),
    ("hub ID with a leading dot", {"custom": "./../.."}, "not a Hugging Face checkpoint|is not a directory|no config"),
    ("remote code without consent", {"custom": "@remote-code"}, "needs custom code"),
    ("pickle-only checkpoint", {"custom": "@pickle-only"}, "only pickle checkpoints"),
    ("unwritable offload folder", {"custom": "@truncated", "cpu": 0.0001, "offload_dir": "@unwritable"},
     "is not writable"),
    ("budgets that cannot fit", {"cpu": 0.001, "disk": False}, "does not fit"),
    ("negative 8-bit threshold", {"threshold": -1.0}, "int8_threshold=-1.0"),
    ("unknown 4-bit compute dtype", {"quant": "4-bit", "compute": "float8"}, "compute_dtype='float8'|float8"),
    # Configs that made planning build 20,000 layers (199 s, 1.5 GB), divide by zero or meet a null size.
    ("config with 20,000 layers", {"custom": "@absurd-layers"}, r"num_hidden_layers=20000; accepted: an integer from 1"),
    ("config with zero heads", {"custom": "@zero-heads"}, r"config.json is malformed \(ZeroDivisionError"),
    ("config with a 2^40 hidden size", {"custom": "@huge-hidden"}, r"hidden_size=1099511627776; accepted"),
    ("config with a null size", {"custom": "@null-size"}, r"config.json is malformed .*intermediate_size"),
    # A regex that backtracks for minutes inside transformers' module filter (it ran 104-209 s):
    # refused before anything is matched against module names.
    ("pathological pattern in the skip list", {"quant": "8-bit", "skip": r"lm_head,model\.laye(.|.)*@"},
     r"skip_modules entry .* is not a module name; accepted: plain dotted module names"),
]


@pytest.mark.parametrize(("case", "changes", "message"), LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_bad_model_settings_in_the_app(client, broken, case, changes, message) -> None:
    from gradio_client.exceptions import AppError

    before = repo_state()
    values = {**BASE, **{k: (str(broken[v[1:]]) if isinstance(v, str) and v.startswith("@") else v)
                         for k, v in changes.items()}}
    with pytest.raises((AppError, ValueError), match=message):
        client.predict(*[values[n] for n in SETTING_NAMES], api_name="/load_model")
    still_answers(client)
    assert repo_state() == before
    assert len(offload_leftovers()) <= 1  # at most the loaded model's own folder


CHAT_CASES = [
    ("empty message", "", {}, "The message is empty"),
    ("only spaces", "   \n\t ", {}, "The message is empty"),
    ("only control characters", "\x00\x1b\x07", {}, "the message is empty"),
    ("message longer than the context", "earth " * 3000, {}, "the message is too long"),
    ("1 MB message", "x" * 1_000_000, {}, "the limit is 200,000"),
    ("negative temperature", "hi", {"temperature": -1}, "temperature=-1"),
    ("top_p of zero", "hi", {"top_p": 0}, "top_p=0"),
    ("max_new_tokens of zero", "hi", {"max_new_tokens": 0}, "max_new_tokens=0"),
    ("fractional top_k", "hi", {"top_k": 2.5}, "top_k=2.5 is not an integer"),
    ("negative seed", "hi", {"seed": -5}, "seed=-5"),
    ("huge repetition penalty", "hi", {"repetition_penalty": 1e9}, "repetition_penalty=1000000000"),
    ("vanishing temperature", "hi", {"temperature": 1e-300}, r"temperature=1e-300 is out of range; accepted: 0 \(greedy\)"),
    ("vanishing repetition penalty", "hi", {"repetition_penalty": 1e-300}, "repetition_penalty=1e-300 is out of range"),
]


def test_the_largest_seed_is_accepted(client) -> None:
    reply = client.submit("And God said", *{**CHAT, "temperature": 0.8, "seed": 2**63 - 1}.values(),
                          api_name="/chat").result()
    assert len(reply.split()) >= 3


@pytest.mark.parametrize(("case", "message", "changes", "error"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_input_in_the_app(client, case, message, changes, error) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=error):
        client.submit(message, *{**CHAT, **changes}.values(), api_name="/chat").result()
    still_answers(client)


def test_control_characters_around_text_are_dropped_and_answered(client) -> None:
    reply = client.submit("\x1b[31mAnd God said\x00", *CHAT.values(), api_name="/chat").result()
    assert len(reply.split()) >= 3


def test_disk_filling_up_during_offload(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write fails half-way (simulated ENOSPC): a clear error and no partial files."""
    from transformers import AutoModelForCausalLM

    from pipeline.budgets import Budgets
    from pipeline.errors import LoadError
    from pipeline.loading import load_model
    from pipeline.presets import resolve_model

    def fill_disk(*args, offload_folder=None, **kwargs):
        (Path(offload_folder) / "model.layers.0.weight.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fill_disk)
    budgets = Budgets(gpu=(), cpu=1000, disk=True, offload_dir=tmp_path / "offload")
    with pytest.raises(LoadError, match=r"the disk is full at .* \(partial files were removed\)"):
        load_model(resolve_model(str(tiny_llama)), budgets)
    assert not (tmp_path / "offload").exists()  # nor the root this load created


@pytest.mark.parametrize("error", ["cpu", "gpu"])
def test_out_of_memory_during_load_keeps_the_previous_model(tiny_llama: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.budgets import GiB, Hardware
    from pipeline.errors import LoadError
    from pipeline.params import GenerationParams
    from pipeline.session import ModelManager, Settings

    manager = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))
    settings = Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(tmp_path / "off"))
    manager.load(settings)
    real = AutoModelForCausalLM.from_pretrained
    calls = {"n": 0}

    def oom_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            if error == "gpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", oom_once)
    with pytest.raises(LoadError, match=f"out of {error.upper()} memory while loading"):
        manager.load(settings)
    assert "is loaded again" in manager.status
    assert "".join(manager.stream([{"role": "user", "content": "hi"}], GenerationParams(temperature=0,
                                                                                       max_new_tokens=4)))
    manager.current.unload()


def cli(*args: str) -> subprocess.CompletedProcess:
    if "--model" not in args:
        args = ("--model", "demo", *args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpu-memory", "lots", "--plan-only"], "cpu_memory='lots' is not a number"),
        (["--model", "owner/../../etc", "--plan-only"], "does not exist"),
        (["--model", "@pickle-only", "--prompt", "hi"], "only pickle checkpoints"),
        (["--model", "@remote-code", "--plan-only"], "needs custom code"),
        (["--cpu-memory", "-2", "--plan-only"], "cpu_memory='-2' is negative"),
        (["--cpu-memory", "1e9", "--plan-only"], "is more than this machine has"),
        (["--top-p", "2", "--prompt", "hi"], "top_p='2' is out of range"),
    ],
)
def test_bad_input_on_the_command_line(broken, args: list[str], message: str) -> None:
    args = [str(broken[a[1:]]) if a.startswith("@") else a for a in args]
    result = cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_one_megabyte_line_in_the_interactive_cli() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "--model", "demo", "--max-new-tokens", "8"], input="x" * 1_000_000 + "\n",
                            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0  # the chat goes on after the error, and ends at end of input
    assert "error: messages[0] is 1,000,000 characters; the limit is 200,000" in result.stderr


def test_shared_app_limits_local_paths_to_its_roots(tiny_llama: Path) -> None:
    from pipeline.errors import ModelSourceError
    from pipeline.presets import resolve_model

    roots = [REPO / "models"]
    assert resolve_model("demo", allowed_roots=roots).name == "demo"  # presets stay allowed
    assert resolve_model(str(REPO / "models" / "demo"), allowed_roots=roots).local_path == REPO / "models" / "demo"
    assert resolve_model("owner/name", allowed_roots=roots).source == "owner/name"  # hub IDs too
    with pytest.raises(ModelSourceError, match="outside the folders this shared app may load from"):
        resolve_model(str(tiny_llama), allowed_roots=roots)
    with pytest.raises(ModelSourceError, match="outside the folders"):
        resolve_model(str(REPO / "models" / ".." / ".."), allowed_roots=roots)


def test_uncached_hub_model_fails_at_once_in_one_line_offline_and_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from huggingface_hub import constants
    from transformers import AutoConfig

    from pipeline.errors import ModelSourceError
    from pipeline.planning import load_model_config
    from pipeline.presets import resolve_model

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained would retry the hub for 20-25 s")

    monkeypatch.setattr(AutoConfig, "from_pretrained", never)
    preset = resolve_model("some-owner/not-cached-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache and offline mode is on"):
        load_model_config(preset)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probed = []

    def unreachable(address, timeout=None):
        probed.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ModelSourceError, match=r"cannot be reached from this machine"):
        load_model_config(preset)
    assert probed == [(("huggingface.co", 443), 2.0)]


def test_uncached_hub_model_on_the_command_line_is_one_error_line() -> None:
    result = cli("--model", "some-owner/not-cached-model", "--plan-only")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model 'some-owner/not-cached-model' is not in the local Hugging Face cache and offline mode is on "
        "(HF_HUB_OFFLINE=1); download it first, or give a local folder"]


@pytest.mark.parametrize("skip", ["", "no_such_module"])
def test_quantized_load_with_an_empty_or_foreign_skip_list_still_answers(client, skip: str) -> None:
    """The skip list replaces transformers' default, which keeps the output layer unquantized: an int8
    output layer (tied to the embeddings) failed every reply. The planner keeps it unquantized."""
    status, _ = client.predict(*{**BASE, "quant": "8-bit", "skip": skip}.values(), api_name="/load_model")
    assert "quantization **int8**" in status
    still_answers(client)
    client.predict(*BASE.values(), api_name="/load_model")  # back to the catalogue's model


def test_api_input_that_is_not_text_gets_a_clear_error() -> None:
    """A raw HTTP client can send what gradio_client cannot encode: a lone surrogate, or an object."""
    import gradio as gr

    import app
    from pipeline.chat import validate_messages
    from pipeline.errors import ConfigError
    from pipeline.session import ModelManager

    with pytest.raises(ConfigError, match=r"messages\[0\] has an invalid character at position 3 \(a lone UTF-16"):
        validate_messages([{"role": "user", "content": "hi \ud800 there"}])
    with pytest.raises(gr.Error) as info:
        list(app.ChatApp({}, ModelManager()).api_chat({"text": "hi"}))
    assert info.value.message == "message and system must be text"
