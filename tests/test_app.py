"""The app end to end through gradio_client: streamed chat, reload with a new plan, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import SETTING_NAMES
from app_server import running_app

# /load_model inputs on a machine without GPUs: preset, custom model, quantization, 8-bit threshold,
# skip modules, 4-bit type, compute dtype, double quant, disk, offload folder, CPU GiB.
BASE = ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, "", 4.0]
HELLO = dict(system="", max_new_tokens=24, temperature=0, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=-1)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    from gradio_client import Client

    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(log=log) as url:
        yield Client(url, verbose=False)


def settings(**changes) -> list:
    values = dict(zip(SETTING_NAMES, BASE))
    values.update(changes)
    return [values[n] for n in SETTING_NAMES]


def ask(client, message: str, **kwargs) -> list[str]:
    job = client.submit(message, *{**HELLO, **kwargs}.values(), api_name="/chat")
    updates = [u for u in job]
    return updates + [job.result()]


def test_chat_streams_text_from_the_demo_model(client) -> None:
    updates = ask(client, "And God said")
    final = updates[-1]
    assert len(final.split()) >= 5, final
    growing = [u for u in updates if u]
    assert len(growing) >= 3 and all(b.startswith(a) for a, b in zip(growing, growing[1:])), "not streamed"


def test_budget_change_reloads_and_reports_the_new_plan(client) -> None:
    status, picture = client.predict(*settings(cpu=0.012), api_name="/load_model")
    assert "disk" in picture and "CPU" in picture  # 12 MiB of RAM: embeddings + a layer stay, the rest goes to disk
    assert "Placement: CPU" in status and "disk" in status
    assert len(ask(client, "And God said")[-1].split()) >= 3
    status, picture = client.predict(*settings(), api_name="/load_model")
    assert "Placement: CPU 100 %" in status and 'data-device="disk"' not in picture


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"custom": "no-such-owner/no-such-model"}, "is not in the local Hugging Face cache"),
        ({"custom": "/no/such/folder"}, "does not exist"),
        ({"cpu": 0.001, "disk": False}, "does not fit"),
        ({"threshold": -5}, "int8_threshold=-5.0"),
    ],
)
def test_bad_settings_give_a_clear_error_and_the_model_keeps_answering(client, changes, message) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*settings(**changes), api_name="/load_model")
    assert len(ask(client, "And God said")[-1].split()) >= 3


def test_plan_endpoint_shows_a_split_without_loading(client) -> None:
    plan = client.predict("demo", 0.004, True, "none", "", api_name="/plan")
    assert plan["layers_per_device"].get("disk"), plan["summary"]


@pytest.mark.parametrize(
    ("message", "kwargs", "error"),
    [
        ("   ", {}, "The message is empty"),
        ("earth " * 2000, {}, "the message is too long"),
        ("hi", {"temperature": -1}, "temperature=-1"),
    ],
)
def test_bad_chat_input_is_a_clear_error(client, message, kwargs, error) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=error):
        ask(client, message, **kwargs)
