"""Chat streaming: stream == non-streamed reply, cancellation, thread errors, templates, truncation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.budgets import GiB, Budgets
from pipeline.chat import FALLBACK_TEMPLATE, ReplyStats, build_prompt, chat, stream_chat
from pipeline.errors import ConfigError, GenerationError
from pipeline.loading import load_model, unload
from pipeline.params import GenerationParams
from pipeline.presets import resolve_model

GREEDY = GenerationParams(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    budgets = Budgets(gpu=(), cpu=GiB, disk=False, offload_dir=tmp_path_factory.mktemp("off"))
    model = load_model(resolve_model(str(tiny_llama)), budgets)
    yield model
    unload(model)


@pytest.fixture(scope="module")
def demo(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    budgets = Budgets(gpu=(), cpu=GiB, disk=False, offload_dir=tmp_path_factory.mktemp("off"))
    model = load_model(resolve_model("demo"), budgets)
    yield model
    unload(model)


def reference_reply(loaded, messages, params: GenerationParams) -> str:
    """model.generate + decode, without the streamer: what the stream must add up to."""
    prompt = build_prompt(loaded.tokenizer, messages, loaded.context_length, params.max_new_tokens)
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                                    pad_token_id=loaded.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["loaded", "demo"])
def test_joined_stream_equals_non_streamed_reply(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    stats = ReplyStats()
    pieces = list(stream_chat(model, HELLO, GREEDY, stats=stats))
    expected = reference_reply(model, HELLO, GREEDY)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # really streamed, not one final chunk
    assert chat(model, HELLO, GREEDY).text == expected
    assert stats.prompt_tokens == len(build_prompt(model.tokenizer, HELLO, model.context_length, 24).input_ids)
    assert 0 < stats.new_tokens <= 24
    assert stats.time_to_first_token is not None and 0 < stats.time_to_first_token <= stats.seconds
    assert stats.tokens_per_second > 0 and stats.finish_reason in {"eos", "length"}


def test_demo_model_writes_its_training_text(demo) -> None:
    reply = chat(demo, [{"role": "user", "content": "And God said, Let there be light"}],
                 GenerationParams(temperature=0, max_new_tokens=40)).text
    words = {w.strip(".,;:").lower() for w in reply.split()}
    assert len(words & {"and", "the", "of", "unto", "lord", "god", "he", "said", "shall", "thou", "his"}) >= 3, reply


def test_seed_makes_sampling_reproducible(loaded) -> None:
    params = GenerationParams(temperature=1.0, top_p=0.9, top_k=40, max_new_tokens=16, seed=1234)
    first, second = chat(loaded, HELLO, params).text, chat(loaded, HELLO, params).text
    assert first == second


def test_cancellation_stops_generation_within_a_token(loaded) -> None:
    cancel = threading.Event()
    stats = ReplyStats()
    params = GenerationParams(temperature=0, max_new_tokens=200)
    for _ in stream_chat(loaded, HELLO, params, cancel=cancel, stats=stats):
        cancel.set()
    assert stats.finish_reason == "cancelled"
    assert stats.new_tokens < 20  # stopped near the first piece, far from 200
    wait_until(lambda: loaded.server.running == 0)  # the request has left the batch: the model is free


def test_replies_run_on_the_one_serving_worker(loaded) -> None:
    """Only the model's worker runs it, on one long-lived thread (a thread per reply would leak:
    CUDA keeps per-thread state a thread's exit does not free)."""
    ran_on: list[threading.Thread] = []
    hook = loaded.model.register_forward_pre_hook(lambda module, args: ran_on.append(threading.current_thread()))
    try:
        params = GenerationParams(temperature=0, max_new_tokens=3, repetition_penalty=1.0)
        for _ in range(6):
            chat(loaded, HELLO, params)
    finally:
        hook.remove()
    assert len(ran_on) >= 6 and len(set(ran_on)) == 1  # every forward of every reply on the same thread
    assert threading.current_thread() not in ran_on


def test_closing_the_generator_stops_the_thread(loaded) -> None:
    stats = ReplyStats()
    stream = stream_chat(loaded, HELLO, GenerationParams(temperature=0, max_new_tokens=200), stats=stats)
    next(stream)
    stream.close()
    assert stats.new_tokens < 20
    wait_until(lambda: loaded.server.running == 0)  # cancelled at the worker's next step


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_exception_in_the_worker_reaches_the_caller_and_the_model_still_answers(loaded) -> None:
    def explode(module, args):
        raise RuntimeError("kernel exploded")

    expected = chat(loaded, HELLO, GREEDY).text
    hook = loaded.model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(GenerationError, match="RuntimeError: kernel exploded"):
            list(stream_chat(loaded, HELLO, GREEDY))
    finally:
        hook.remove()
    assert chat(loaded, HELLO, GREEDY).text == expected


def test_stop_strings_cut_the_reply(loaded) -> None:
    full = chat(loaded, HELLO, GREEDY).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    reply = chat(loaded, HELLO, GREEDY.replace(stop=(stop,)))
    assert reply.text == full[: full.index(stop)]
    assert reply.stats.finish_reason == "stop"


def test_oldest_turns_are_dropped_to_fit(loaded) -> None:
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"question {i} about the earth"},
                    {"role": "assistant", "content": f"answer {i} about the heaven"}]
    messages = [{"role": "system", "content": "Be brief."}] + history + HELLO
    prompt = build_prompt(loaded.tokenizer, messages, context_length=256, max_new_tokens=64)
    assert len(prompt.input_ids) <= 256 - 64
    assert prompt.dropped_turns > 0
    text = loaded.tokenizer.decode(prompt.input_ids)
    assert "Be brief." in text and "How are you today?" in text and "question 0 " not in text
    assert "question 29" in text  # the newest turns are kept


def test_message_longer_than_the_context(loaded) -> None:
    with pytest.raises(ConfigError, match="the message is too long: the prompt is .* tokens"):
        list(stream_chat(loaded, [{"role": "user", "content": "earth " * 400}], GREEDY))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "   "}], "the message is empty"),
        ([{"role": "bot", "content": "hi"}], "expected {'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "must be the user's"),
        ([{"role": "user", "content": "x" * 200_001}], "the limit is 200,000"),
    ],
)
def test_bad_messages(loaded, messages, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        list(stream_chat(loaded, messages, GREEDY))
    assert message in str(info.value)


def test_fallback_template_for_base_models(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    prompt = build_prompt(tok, messages, 256, 16)
    assert tok.decode(prompt.input_ids) == "Be kind.\n\nUser: Hello\nAssistant:"
    assert "\nUser:" in prompt.stop
    assert "Assistant:" in FALLBACK_TEMPLATE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature=-0.1 is out of range"),
        ({"temperature": float("nan")}, "temperature=nan is not a number"),
        ({"top_p": 0}, "top_p=0 is out of range; accepted: 0.0 < value <= 1.0"),
        ({"top_p": 1.5}, "top_p=1.5 is out of range"),
        ({"top_k": -1}, "top_k=-1 is out of range"),
        ({"top_k": 2.5}, "top_k=2.5 is not an integer"),
        ({"repetition_penalty": 0}, "repetition_penalty=0 is out of range"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
        ({"max_new_tokens": "many"}, "max_new_tokens='many' is not an integer"),
        ({"seed": -3}, "seed=-3 is out of range"),
        ({"stop": [""]}, "stop=[''] is invalid"),
    ],
)
def test_invalid_sampling_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        GenerationParams(**kwargs)
    assert message in str(info.value)


def test_max_new_tokens_larger_than_context(loaded) -> None:
    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        list(stream_chat(loaded, HELLO, GREEDY.replace(max_new_tokens=loaded.context_length)))


def _linear_trim(tokenizer, messages, context_length, max_new_tokens) -> tuple[list[int], int]:
    """The obvious algorithm (one render per dropped exchange): what bisection must agree with."""
    budget = context_length - max_new_tokens
    system, turns, dropped = messages[:1], messages[1:], 0
    while True:
        text = tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return list(ids), dropped
        nxt = next(i for i in range(1, len(turns)) if turns[i]["role"] == "user")
        dropped += sum(1 for m in turns[:nxt] if m["role"] == "user")
        turns = turns[nxt:]


@pytest.mark.parametrize("context", [96, 160, 256, 400])
def test_trimming_by_bisection_keeps_what_dropping_one_by_one_keeps(loaded, context: int) -> None:
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(25):
        history += [{"role": "user", "content": f"question {i} " + "about the earth " * (i % 4)},
                    {"role": "assistant", "content": f"answer {i}" + " and the heaven" * (i % 3)}]
    history.append({"role": "user", "content": "Hello! How are you today?"})
    prompt = build_prompt(loaded.tokenizer, history, context_length=context, max_new_tokens=32)
    assert (prompt.input_ids, prompt.dropped_turns) == _linear_trim(loaded.tokenizer, history, context, 32)


def test_a_long_history_costs_logarithmically_many_renders(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    history = []
    for i in range(800):
        history += [{"role": "user", "content": f"question {i} about the earth"},
                    {"role": "assistant", "content": f"answer {i} about the heaven"}]
    history.append({"role": "user", "content": "Hello!"})
    renders = []
    original = loaded.tokenizer.apply_chat_template
    monkeypatch.setattr(loaded.tokenizer, "apply_chat_template", lambda *a, **k: renders.append(1) or original(*a, **k))
    prompt = build_prompt(loaded.tokenizer, history, context_length=256, max_new_tokens=64)
    assert prompt.dropped_turns > 700
    assert len(renders) <= 2 + 11  # all, the last exchange, then bisection over 801 starts (was one per drop)


def test_a_chat_template_that_never_ends_is_stopped(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    monkeypatch.setattr(loaded.tokenizer, "chat_template", endless)
    with pytest.raises(ConfigError, match="chat template did not finish rendering within 2 s"):
        build_prompt(loaded.tokenizer, HELLO, context_length=256, max_new_tokens=16)
    monkeypatch.undo()
    assert chat(loaded, HELLO, GREEDY).text  # the model answers with its real template afterwards
