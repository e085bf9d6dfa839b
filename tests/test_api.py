"""The OpenAI-compatible API on the app's own port, through the official `openai` client and curl,
and its error cases through FastAPI's test client."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app_server import running_app

KEY = "test-key-4f9c"
USER = [{"role": "user", "content": "And God said"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, endless_model: Path):
    log = tmp_path_factory.mktemp("api") / "app.log"
    with running_app("--model", str(endless_model), "--api-key", KEY, "--mcp", log=log) as address:
        yield address


@pytest.fixture(scope="module")
def model_id(endless_model: Path) -> str:
    return endless_model.name


def openai_client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=120)


def test_models_lists_the_loaded_model(url: str, model_id: str) -> None:
    models = openai_client(url).models.list()
    assert [m.id for m in models] == [model_id]


def test_chat_completion_streamed_and_not_give_the_same_greedy_text(url: str, model_id: str) -> None:
    client = openai_client(url)
    whole = client.chat.completions.create(model=model_id, messages=USER, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"  # this model never ends on its own
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    chunks = list(client.chat.completions.create(model=model_id, messages=USER, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24  # the usage chunk comes last
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_max_completion_tokens_system_and_assistant_turns(url: str, model_id: str) -> None:
    client = openai_client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    answer = client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=7, temperature=0)
    assert answer.usage.completion_tokens == 7
    shorter = client.chat.completions.create(model=model_id, messages=messages[1:2], max_tokens=7, temperature=0)
    assert answer.usage.prompt_tokens > shorter.usage.prompt_tokens  # the system and earlier turns were sent


def test_stop_strings_end_the_reply_before_them(url: str, model_id: str) -> None:
    client = openai_client(url)
    full = client.chat.completions.create(model=model_id, messages=USER, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop.strip()) >= 2, f"no usable stop string in {text!r}"
    for stream in (False, True):
        answer = client.chat.completions.create(model=model_id, messages=USER, max_tokens=40, temperature=0, stop=[stop],
                                                stream=stream)
        if stream:
            chunks = list(answer)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert got == text[:text.index(stop)] and reason == "stop"


def test_a_seed_makes_sampling_repeat(url: str, model_id: str) -> None:
    client = openai_client(url)

    def sample(seed: int) -> str:
        return client.chat.completions.create(model=model_id, messages=USER, max_tokens=16, temperature=1.0,
                                              top_p=1.0, seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1  # a random model: different seeds differ


def test_completions_continue_a_raw_prompt(url: str, model_id: str) -> None:
    client = openai_client(url)
    answer = client.completions.create(model=model_id, prompt="In the beginning", max_tokens=12, temperature=0)
    assert answer.object == "text_completion" and answer.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="In the beginning", max_tokens=12, temperature=0, stream=True))
    assert streamed == answer.choices[0].text
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "In the beginning"}],
                                          max_tokens=12, temperature=0)
    assert chat.usage.prompt_tokens > answer.usage.prompt_tokens  # no chat template around a raw prompt


def test_each_error_has_its_status_and_names_the_field(url: str, model_id: str) -> None:
    import openai

    client = openai_client(url)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai_client(url, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist here") as info:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match=r"temperature=9 is out of range; accepted") as info:
        client.chat.completions.create(model=model_id, messages=USER, temperature=9)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="max_tokens=0 is out of range") as info:
        client.chat.completions.create(model=model_id, messages=USER, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported by this server"):
        client.chat.completions.create(model=model_id, messages=USER, n=2)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role='tool' is not supported"):
        client.chat.completions.create(model=model_id, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError, match="the last message must be the user's"):
        client.chat.completions.create(model=model_id, messages=[{"role": "assistant", "content": "x"}])
    # the model still answers
    assert client.chat.completions.create(model=model_id, messages=USER, max_tokens=2).usage.completion_tokens == 2


def test_eight_concurrent_streams_each_get_their_own_reply(url: str, model_id: str) -> None:
    client = openai_client(url)
    prompts = [f"{word} and the earth" for word in ("Hello", "In", "The", "Memory", "darkness", "God", "fine", "sun")]

    def ask(prompt: str, stream: bool) -> str:
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            return client.chat.completions.create(model=model_id, messages=messages, max_tokens=32,
                                                  temperature=0).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=32, temperature=0, stream=True) if c.choices)

    alone = {p: ask(p, False) for p in prompts}
    assert len(set(alone.values())) == len(prompts)
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = dict(zip(prompts, pool.map(lambda p: ask(p, True), prompts)))
    assert together == alone


def test_a_stream_whose_client_goes_away_is_cancelled(url: str, model_id: str) -> None:
    import httpx
    from gradio_client import Client

    watcher = Client(url, verbose=False)
    body = {"model": model_id, "messages": USER, "max_tokens": 3000, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert watcher.predict(api_name="/status")["running"] == 1
    deadline = time.monotonic() + 60  # the connection is closed: the reply must stop
    while watcher.predict(api_name="/status")["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert watcher.predict(api_name="/status")["running"] == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_streams_server_sent_events(url: str, model_id: str) -> None:
    out = subprocess.run(
        ["curl", "-sN", url + "v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
         "-H", "Content-Type: application/json",
         "-d", f'{{"model": "{model_id}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 5, '
               '"stream": true}'],
        capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line for line in out.splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]


def test_mcp_serves_the_chat_plan_and_status_tools(url: str) -> None:
    """--mcp: Gradio's MCP server lists the app's functions as tools; reloading and signing in are not tools."""
    import httpx

    tools = {tool["name"]: tool for tool in httpx.get(url + "gradio_api/mcp/schema", timeout=30).json()}
    assert {"api_chat", "preview_api", "status_api"} <= set(tools), sorted(tools)
    assert not {"apply_settings", "sign_in"} & set(tools)
    assert "streaming the growing reply" in tools["api_chat"]["description"]
    assert "message" in tools["api_chat"]["inputSchema"]["properties"]


# Error cases that need a manager in a given state: FastAPI's test client, no server.

@pytest.fixture
def api(tmp_path: Path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.api import ApiAccess, openai_routes
    from pipeline.budgets import GiB, Hardware
    from pipeline.session import ModelManager

    manager = ModelManager(Hardware((), 16 * GiB, 12 * GiB, 50 * GiB))

    def make(access: ApiAccess = ApiAccess()) -> TestClient:
        return TestClient(FastAPI(routes=openai_routes(manager, access)))

    yield manager, make
    if manager.current is not None:
        manager.current.unload()


def test_no_model_and_a_loading_model_answer_503(api, tmp_path: Path) -> None:
    from pipeline.session import Settings

    manager, make = api
    client = make()
    chat = {"model": "demo", "messages": USER, "max_tokens": 4}
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_model"
    assert client.get("/v1/models").json()["data"] == []
    manager.load(Settings(model="demo", cpu_gib=1, offload_dir=str(tmp_path)))
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    holding = threading.Event()
    release = threading.Event()

    def hold_the_swap() -> None:  # what a reload holds while it loads
        with manager._swap:
            holding.set()
            release.wait(30)

    threading.Thread(target=hold_the_swap).start()
    holding.wait(10)
    try:
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 503 and "being loaded" in response.json()["error"]["message"]
    finally:
        release.set()
    assert client.post("/v1/chat/completions", json=chat).status_code == 200


def test_bad_bodies_get_openai_errors(api, tmp_path: Path) -> None:
    from pipeline.session import Settings

    manager, make = api
    manager.load(Settings(model="demo", cpu_gib=1, offload_dir=str(tmp_path)))
    client = make()
    cases = [
        (b"{not json", "not valid JSON", None),
        (b"[1, 2]", "must be a JSON object", None),
        ({"messages": USER}, "model is required", "model"),
        ({"model": "demo"}, "messages must be a non-empty list", "messages"),
        ({"model": "demo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "is not a text part",
         "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, r"content=5 is invalid", "messages[0].content"),
        ({"model": "demo", "messages": USER, "top_p": 0}, "top_p=0 is out of range", "top_p"),
        ({"model": "demo", "messages": USER, "seed": "abc"}, "seed='abc' is not an integer", "seed"),
        ({"model": "demo", "messages": USER, "stop": [""]}, r"stop=\[''\] is invalid", "stop"),
        ({"model": "demo", "messages": USER, "stream": "yes"}, "stream='yes' must be true or false", "stream"),
        ({"model": "demo", "messages": USER, "tools": [{"type": "function"}]}, "tools=.* is not supported", "tools"),
        ({"model": "demo", "messages": USER, "logprobs": True}, "logprobs=True is not supported", "logprobs"),
    ]
    import re

    for body, message, param in cases:
        response = client.post("/v1/chat/completions", **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert re.search(message, error["message"]), (message, error)
        assert error["param"] == param and error["type"] == "invalid_request_error"
    response = client.post("/v1/completions", json={"model": "demo", "prompt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    long_prompt = client.post("/v1/completions", json={"model": "demo", "prompt": "word " * 2000, "max_tokens": 8})
    assert long_prompt.status_code == 400 and "the context of 512 holds at most" in long_prompt.json()["error"]["message"]
    assert client.post("/v1/completions", json={"model": "demo", "prompt": "And", "max_tokens": 3}).status_code == 200


def test_a_key_is_required_when_set_and_the_api_is_refused_when_disabled(api) -> None:
    from pipeline.api import ApiAccess

    _, make = api
    keyed = make(ApiAccess(key="k1"))
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    refused = make(ApiAccess(refusal="this app is shared, so its API needs a key"))
    response = refused.get("/v1/models", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403 and "needs a key" in response.json()["error"]["message"]


def test_fields_left_out_take_the_presets_sampling(api, tmp_path: Path) -> None:
    """As vLLM and transformers serve use the model's generation config: the loaded preset's sampling
    (the default model's is greedy), not OpenAI's temperature 1, unless the request says otherwise."""
    from pipeline.presets import resolve_model
    from pipeline.session import Settings

    manager, make = api
    manager.load(Settings(model="demo", cpu_gib=1, offload_dir=str(tmp_path)))
    seen = []

    def spy(messages, params, **kwargs):
        seen.append(params)
        yield "ok"

    manager.stream = spy
    client = make()
    assert client.post("/v1/chat/completions", json={"model": "demo", "messages": USER}).status_code == 200
    preset = resolve_model("demo").generation
    assert (seen[-1].temperature, seen[-1].top_p, seen[-1].repetition_penalty) == (
        preset.temperature, preset.top_p, preset.repetition_penalty)
    client.post("/v1/chat/completions", json={"model": "demo", "messages": USER, "temperature": 0, "top_p": 0.5})
    assert (seen[-1].temperature, seen[-1].top_p) == (0, 0.5)
