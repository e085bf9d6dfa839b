"""Several users at once, through gradio_client against a running app."""

from __future__ import annotations

import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app import SETTING_NAMES
from app_server import running_app

PROMPTS = [f"{word} and the earth" for word in
           ("Hello", "In the beginning", "The quick brown fox", "Memory budgets", "darkness", "God", "fine", "sun")]


def chat_args(message: str, max_new_tokens: int) -> list:
    return [message, "", max_new_tokens, 0, 0.9, 50, 1.0, -1]  # greedy


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, endless_model: Path):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app("--model", str(endless_model), log=log) as address:
        yield address


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_eight_simultaneous_sessions_get_their_own_replies(url: str) -> None:
    reference = {p: client(url).predict(*chat_args(p, 48), api_name="/chat") for p in PROMPTS}
    assert len(set(reference.values())) == len(PROMPTS)  # distinct replies, so mixing would show

    def session(prompt: str) -> tuple[str, list[str]]:
        job = client(url).submit(*chat_args(prompt, 48), api_name="/chat")
        updates = list(job)
        return job.result(), updates

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(PROMPTS, pool.map(session, PROMPTS)))
    for prompt, (final, updates) in results.items():
        assert final == reference[prompt], f"the reply to {prompt!r} differs from the same prompt asked alone"
        assert all(final.startswith(u) for u in updates if u), "a partial reply is not a prefix of the final one"


def test_stop_in_one_session_does_not_stop_another(url: str) -> None:
    a, b = client(url), client(url)
    expected = a.predict(*chat_args(PROMPTS[1], 600), api_name="/chat")
    long_a = a.submit(*chat_args(PROMPTS[0], 3000), api_name="/chat")
    long_b = b.submit(*chat_args(PROMPTS[1], 600), api_name="/chat")
    deadline = time.monotonic() + 60
    while not long_a.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    long_a.cancel()
    assert long_b.result(timeout=120) == expected  # b ran to its end, unaffected
    from gradio_client.utils import Status

    assert long_a.status().code == Status.CANCELLED
    partial = long_a.outputs()[-1] if long_a.outputs() else ""
    assert len(partial) < len(expected) * 3  # a stopped early: 3000 tokens would be ~5x longer than b's 600


def test_reload_mid_stream_ends_that_stream_cleanly(url: str, endless_model: Path) -> None:
    from gradio_client.exceptions import AppError

    streaming, admin = client(url), client(url)
    job = streaming.submit(*chat_args(PROMPTS[2], 3000), api_name="/chat")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "the stream never started"
    settings = dict(zip(SETTING_NAMES, ["demo", str(endless_model), "none", 6.0, "lm_head", "nf4", "auto", True, True, "",
                                0.01]))
    # A deadlock guard, not a speed check: the reload closes the stream's worker instead of waiting for it.
    status, picture = admin.submit(*settings.values(), api_name="/load_model").result(timeout=300)
    assert "disk" in picture  # the new plan (10 MiB of RAM) is what got loaded
    with pytest.raises(AppError, match="stopped because the model is being reloaded"):
        job.result(timeout=60)
    assert len(job.outputs()) >= 1  # the user saw the partial reply before the message
    assert admin.predict(*chat_args("Hello", 8), api_name="/chat")  # and the next message is answered


def _global_state() -> dict:
    """What building a model patches process-wide while it runs (and must restore)."""
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    return {"register_parameter": nn.Module.register_parameter, "register_buffer": nn.Module.register_buffer,
            "tie_weights": PreTrainedModel.tie_weights, "linspace": torch.linspace,
            "default_dtype": torch.get_default_dtype()}


def test_parallel_planning_leaves_the_process_healthy(tiny_llama: Path, tmp_path: Path) -> None:
    """Many previews at once (the app's /plan, sliders, page loads) while a model loads: afterwards
    nothing is left patched, and a load puts real weights in memory and answers like before."""
    import torch

    from conftest import greedy
    from pipeline.budgets import GiB, GPUInfo, Hardware
    from pipeline.session import ModelManager, Settings

    before = _global_state()
    manager = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))
    # A simulated GPU: its plans build the model in float16, the CPU's in float32, so overlapping
    # builds also fight over torch's default dtype.
    gpu_manager = ModelManager(Hardware((GPUInfo(0, "T4", 16 * GiB, 15 * GiB),), 16 * GiB, 12 * GiB, 50 * GiB))
    cpu_plans = [Settings(model=name, cpu_gib=gib, offload_dir=str(tmp_path / "off"))
                 for name in ("demo", str(tiny_llama)) for gib in (0.001, 0.01, 1.0)]
    gpu_plans = [replace(s, gpu_gib=(0.001,)) for s in cpu_plans]
    reference = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))
    reference.load(Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(tmp_path / "ref")))
    expected = greedy(reference.current)
    reference.current.unload()

    def plan(i: int) -> str:
        if i % 2:
            return manager.plan(cpu_plans[i % len(cpu_plans)]).summary
        return gpu_manager.plan(gpu_plans[i % len(gpu_plans)]).summary

    def load() -> list[int]:
        manager.load(Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(tmp_path / "off")))
        return greedy(manager.current)

    with ThreadPoolExecutor(max_workers=8) as pool:
        plans = [pool.submit(plan, i) for i in range(48)]
        loading = pool.submit(load)
        more = [pool.submit(plan, i) for i in range(48, 64)]
        assert all(p.result(timeout=300) for p in plans + more)
        assert loading.result(timeout=300) == expected
    assert _global_state() == before, "building models in parallel left process-wide state patched"
    manager.load(Settings(model=str(tiny_llama), cpu_gib=1, offload_dir=str(tmp_path / "off")))
    assert not any(p.is_meta for p in manager.current.model.parameters())
    assert greedy(manager.current) == expected
    assert torch.get_default_dtype() == torch.float32
    manager.current.unload()


def test_parallel_plan_calls_through_the_api_leave_the_app_answering(url: str) -> None:
    """The probe that broke the process: ten /plan calls from two clients at once, then chat."""
    reference = client(url).predict(*chat_args(PROMPTS[3], 16), api_name="/chat")
    clients = [client(url), client(url)]

    def plan(i: int) -> str:
        return clients[i % 2].predict("demo", [0.001, 0.01, 0.5][i % 3], True, "none", "", api_name="/plan")["summary"]

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert all(pool.map(plan, range(10)))
    assert client(url).predict(*chat_args(PROMPTS[3], 16), api_name="/chat") == reference


def test_one_client_cannot_fill_the_queue(url: str) -> None:
    from gradio_client.exceptions import AppError

    greedy_client = client(url)
    running = [greedy_client.submit(*chat_args(PROMPTS[i], 3000), api_name="/chat") for i in range(2)]
    deadline = time.monotonic() + 60
    while not all(job.outputs() for job in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(AppError, match="this page already has 2 replies running; wait for one to finish"):
        greedy_client.predict(*chat_args(PROMPTS[2], 8), api_name="/chat")
    assert client(url).predict(*chat_args(PROMPTS[3], 8), api_name="/chat")  # others are still served
    for job in running:
        job.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # cancelled replies free their slots
        try:
            assert greedy_client.predict(*chat_args(PROMPTS[2], 8), api_name="/chat")
            break
        except AppError:
            time.sleep(0.2)
    else:
        pytest.fail("the cancelled replies never freed their slots")


def test_a_reply_whose_client_went_away_is_cancelled(url: str, tmp_path: Path) -> None:
    """A client that disconnects mid-reply (a killed script, a dropped connection) does not leave its
    reply running to max_new_tokens: Gradio drops the event, and the reply's stream is cancelled."""
    import subprocess
    import sys

    script = tmp_path / "abandon.py"
    script.write_text(
        "import os, sys, time\n"
        "from gradio_client import Client\n"
        f"job = Client({url!r}, verbose=False).submit(*{chat_args(PROMPTS[4], 3000)!r}, api_name='/chat')\n"
        "deadline = time.monotonic() + 60\n"
        "while not job.outputs() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print('streaming' if job.outputs() else 'never started', flush=True)\n"
        "sys.stdin.readline()\n"
        "os._exit(0)\n")
    watcher = client(url)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert watcher.predict(api_name="/status")["running"] == 1  # the client is connected: its reply runs
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0  # gone without a word, mid-reply
    finally:
        proc.kill()
    deadline = time.monotonic() + 60
    while watcher.predict(api_name="/status")["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert watcher.predict(api_name="/status")["running"] == 0, "the abandoned reply is still being generated"


def test_uploads_are_refused(url: str) -> None:
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + b"x" * 50 * 1024 + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code in (400, 413)
