"""Remote engines: the app and the CLI chat through real OpenAI-compatible servers this project did
not write (`transformers serve` on CPU, offline) and through another Offload Chat; each failure
gets a clear message and the previous backend keeps answering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app_server import REPO, free_port, running_app, running_server
from test_browser import ARGS, CHROMIUM, _browser_available

KEY = "remote-test-key"


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    """`transformers serve` (transformers' own OpenAI-compatible server) with the demo model, on CPU."""
    port = free_port()
    log = tmp_path_factory.mktemp("tserve") / "serve.log"
    executable = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    url = f"http://localhost:{port}/v1"
    with running_server([str(executable), "serve", str(demo_dir), "--port", str(port), "--device", "cpu"],
                        url + "/models", log, env=env, cwd=tmp_path_factory.getbasetemp()):
        yield url, str(demo_dir)


@pytest.fixture
def manager(tmp_path: Path):
    from pipeline.budgets import GiB, Hardware
    from pipeline.session import ModelManager, Settings

    manager = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))
    manager.load(Settings(model="demo", cpu_gib=1, offload_dir=str(tmp_path)))
    yield manager
    if manager.current is not None:
        manager.current.unload()


def greedy(max_new_tokens: int, **changes):
    from pipeline.params import GenerationParams

    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0, **changes)


def test_a_chat_streams_through_transformers_serve_with_its_stats(transformers_serve, manager) -> None:
    from pipeline.chat import ReplyStats

    url, model = transformers_serve
    messages = [{"role": "user", "content": "In the beginning"}]
    local = "".join(manager.stream(messages, greedy(12)))
    manager.connect_remote(url, model)
    assert manager.current is None and manager.describe()["remote"] == url  # the local model was unloaded
    stats = ReplyStats()
    pieces = list(manager.stream(messages, greedy(12), stats=stats))
    assert len(pieces) > 3 and stats.new_tokens == 12 and stats.finish_reason == "length"
    assert stats.prompt_tokens > 0 and stats.time_to_first_token is not None and stats.tokens_per_second > 0
    # The same model, greedy, through another implementation: the same words.
    assert "".join(pieces).split()[:4] == local.split()[:4], ("".join(pieces), local)


def test_stop_strings_and_max_tokens_through_the_endpoint(transformers_serve, manager) -> None:
    from pipeline.chat import ReplyStats

    url, model = transformers_serve
    manager.connect_remote(url, model)
    messages = [{"role": "user", "content": "And God said"}]
    full = "".join(manager.stream(messages, greedy(30)))
    stop = full.split()[3]
    stats = ReplyStats()
    stopped = "".join(manager.stream(messages, greedy(30, stop=(stop,)), stats=stats))
    assert stop not in stopped and full.startswith(stopped.rstrip()) and stats.finish_reason == "stop"
    stats = ReplyStats()
    assert "".join(manager.stream(messages, greedy(3), stats=stats)) and stats.new_tokens == 3


def test_endpoint_failures_are_clear_and_the_previous_backend_keeps_answering(transformers_serve, manager) -> None:
    from pipeline.errors import PipelineError
    from pipeline.remote import connect

    url, model = transformers_serve
    nothing = f"http://127.0.0.1:{free_port()}/v1"
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(PipelineError, match="did not answer in time"):
            connect(silent_url, "m", timeout=1.0)
        assert time.monotonic() - started < 10
    cases = [
        ((nothing, "m"), "cannot reach the remote endpoint .* is it running"),
        ((url, "no-such-model"), f"does not serve 'no-such-model'; it serves: {model}"),
        (("ftp://host/v1", "m"), "is not an http\\(s\\) URL"),
        ((url, ""), "the remote model name is empty"),
    ]
    for args, message in cases:
        with pytest.raises(PipelineError, match=message):
            manager.connect_remote(*args)
        assert manager.current is not None and manager.remote is None
        assert "".join(manager.stream([{"role": "user", "content": "And"}], greedy(3)))  # the local model answers
    manager.connect_remote(url, model)
    from pipeline.session import Settings

    with pytest.raises(PipelineError):  # a failed local load keeps the remote engine
        manager.load(Settings(model=str(REPO / "models" / "no-such"), cpu_gib=1))
    assert manager.remote is not None and manager.status.startswith("Connected to")
    assert "".join(manager.stream([{"role": "user", "content": "And"}], greedy(3)))


def test_an_offload_chat_app_is_the_remote_engine_of_another(tmp_path: Path, endless_model: Path) -> None:
    """App B answers from app A's OpenAI-compatible API; a wrong key gets a clear 401 line."""
    from gradio_client import Client

    from pipeline.errors import PipelineError
    from pipeline.remote import connect

    with running_app("--model", str(endless_model), "--api-key", KEY, log=tmp_path / "a.log") as a_url:
        with pytest.raises(PipelineError, match="refused the API key \\(401\\)"):
            connect(a_url + "v1", endless_model.name, "wrong-key")
        with running_app("--remote", a_url + "v1", "--remote-model", endless_model.name, "--remote-api-key", KEY,
                         log=tmp_path / "b.log") as b_url:
            b, a = Client(b_url, verbose=False), Client(a_url, verbose=False)
            assert b.predict(api_name="/status")["remote"] == a_url + "v1"
            job = b.submit("In the beginning", "", 400, 0, 0.9, 50, 1.0, -1, api_name="/chat")
            deadline = time.monotonic() + 60
            while not job.outputs() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert a.predict(api_name="/status")["running"] == 1  # A generates what B streams
            job.cancel()
            deadline = time.monotonic() + 60  # B's Stop closes the connection: A stops generating
            while a.predict(api_name="/status")["running"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert a.predict(api_name="/status")["running"] == 0
            whole = b.predict("In the beginning", "", 12, 0, 0.9, 50, 1.0, -1, api_name="/chat")
            direct = a.predict("In the beginning", "", 12, 0, 0.9, 50, 1.0, -1, api_name="/chat")
            assert whole == direct  # greedy (B does not send the repetition penalty; 1.0 here)


def test_the_cli_chats_through_a_remote_engine(transformers_serve) -> None:
    url, model = transformers_serve
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "--remote", url, "--remote-model", model, "--prompt",
                          "And God said", "--max-new-tokens", "5", "--temperature", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"remote: {model} on {url}" in out.stdout and "[5 tokens · " in out.stdout and "finished: length" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline", "--remote", url, "--remote-model", "nope", "--prompt", "x"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: the remote endpoint")
    assert out.stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.skipif(not _browser_available() and not os.environ.get("CI"), reason="needs Debian's chromium and playwright")
def test_the_model_panel_connects_to_a_remote_engine_and_the_chat_uses_it(transformers_serve, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, model = transformers_serve
    with running_app(log=tmp_path / "app.log") as app_url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(app_url)
        page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
        for _ in range(5):  # a click during hydration can be lost
            page.locator("#remote").get_by_text("remote engine").first.click()
            try:
                page.wait_for_selector("#remote-url textarea, #remote-url input", timeout=3_000)
                break
            except Exception:  # noqa: BLE001 - playwright's TimeoutError: click again
                continue
        page.locator("#remote-url textarea, #remote-url input").first.fill(f"http://127.0.0.1:{free_port()}/v1")
        page.click("#remote-list")
        page.wait_for_selector("text=cannot reach the remote endpoint", timeout=30_000)  # unreachable: said so
        page.locator("#remote-url textarea, #remote-url input").first.fill(url)
        page.click("#remote-list")
        page.wait_for_function(f"() => document.querySelector('#remote-model input').value == {model!r}",
                               timeout=30_000)
        page.click("#remote-connect")
        page.wait_for_selector("#status >> text=remote engine at", timeout=30_000)
        page.locator("#message textarea").fill("And God said")
        page.click("#send")
        page.wait_for_selector("#chatbot >> text=tokens/s", timeout=60_000)
        assert page.locator('#chatbot [data-testid="bot"]').first.inner_text().strip()
        browser.close()
