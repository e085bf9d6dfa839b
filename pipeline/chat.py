"""Chat: prompts built with the chat template, and one generator that yields reply text as tokens arrive.

The tokens come from the model's serving worker (`pipeline.serving`), which batches every chat;
the text layer (`pipeline.textstream`) never yields half a character or the start of a stop string.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, GenerationError
from .loading import LoadedModel
from .params import GenerationParams
from .textstream import TextStream

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}
ROLES = ("system", "user", "assistant")
MAX_MESSAGE_CHARS = 200_000  # a longer message cannot fit any context we serve; refuse before tokenizing

# For base models without a chat template (Bloom): plain dialogue lines the model can continue.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nUser:", "\nAssistant:")


@dataclass
class ReplyStats:
    """Filled in while a reply streams; final once the generator is exhausted."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    dropped_turns: int = 0  # oldest user/assistant turns left out to fit the context
    time_to_first_token: float | None = None  # seconds from the call to the first new token
    seconds: float = 0.0  # whole reply, prompt processing included
    finish_reason: str = ""  # "eos", "length", "stop", "cancelled"
    forwards: int = 0  # model forwards that produced the reply (fewer than tokens with speculation)
    experts: str = ""  # MoE with offloaded layers: the expert cache's hit rate (or CPU-computed experts) meanwhile

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        ttft = f"{self.time_to_first_token:.2f} s" if self.time_to_first_token is not None else "–"
        text = (
            f"{self.new_tokens} tokens · {self.tokens_per_second:.1f} tokens/s · first token {ttft}"
            f" · prompt {self.prompt_tokens} tokens"
        )
        if self.forwards and self.new_tokens:
            text += f" · {self.new_tokens / self.forwards:.1f} tokens/step"
        if self.experts:
            text += f" · {self.experts}"
        if self.dropped_turns:
            text += f" · {self.dropped_turns} oldest turn(s) dropped to fit the context"
        return text


@dataclass
class Reply:
    text: str
    stats: ReplyStats = field(default_factory=ReplyStats)


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    dropped_turns: int
    stop: tuple[str, ...]  # stop strings the template implies (fallback template only)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def strip_control(text: str) -> str:
    """Drop C0 control characters (NUL, ESC, ...) except tab and newlines: terminals paste them, models never need them."""
    return _CONTROL.sub("", text)


def _check_text(text: str, name: str) -> None:
    """Refuse text no context holds, or that is not valid Unicode (a lone UTF-16 surrogate)."""
    if len(text) > MAX_MESSAGE_CHARS:
        raise ConfigError(f"{name} is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{name} has an invalid character at position {exc.start} (a lone UTF-16 surrogate); "
                          "send UTF-8 text") from None


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Check roles and contents; the last message must be the user's."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role', 'content'} mappings")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}]={m!r}: expected {{'role': one of {list(ROLES)}, 'content': str}}")
        _check_text(m["content"], f"messages[{i}]")
        clean.append({"role": m["role"], "content": strip_control(m["content"])})
    if clean[-1]["role"] != "user":
        raise ConfigError(f"the last message must be the user's, got role {clean[-1]['role']!r}")
    if not clean[-1]["content"].strip():
        raise ConfigError("the message is empty: type something to send")
    return clean


def build_prompt(tokenizer: Any, messages: Sequence[Message], context_length: int, max_new_tokens: int) -> Prompt:
    """Tokenize the conversation with the chat template, dropping the oldest turns to leave room for the reply."""
    messages = validate_messages(messages)
    budget = context_length - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context of {context_length} tokens; "
            f"accepted: 1..{context_length - 1}"
        )
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    stops = FALLBACK_STOPS if template else ()
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    # An exchange starts at a user message; keeping turns[start:] for a later start gives a shorter
    # prompt, so the earliest start that fits is found by bisection: O(log n) renders of the history,
    # not one per dropped turn (800 turn pairs cost 123 s that way).
    starts = sorted({0, *(i for i, m in enumerate(turns) if m["role"] == "user")})

    def render(start: int) -> list[int]:
        text = render_chat_template(tokenizer, system + turns[start:], template)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = render(0)
    if len(ids) <= budget:
        return Prompt(ids, 0, stops)
    last = render(starts[-1])
    if len(last) > budget:
        raise ConfigError(
            f"the message is too long: the prompt is {len(last)} tokens, but the context of {context_length} "
            f"tokens minus max_new_tokens={max_new_tokens} leaves {budget}; shorten the message or lower "
            "max_new_tokens"
        )
    lo, hi, best = 1, len(starts) - 1, last  # invariant: best is the prompt kept from starts[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = render(starts[mid])
        if len(candidate) <= budget:
            hi, best = mid, candidate
        else:
            lo = mid + 1
    dropped = sum(1 for m in turns[: starts[hi]] if m["role"] == "user")
    return Prompt(best, dropped, stops)


TEMPLATE_SECONDS = 2.0  # one chat-template rendering; a template that loops without end is stopped


def render_chat_template(tokenizer: Any, messages: Sequence[Message], template: str | None) -> str:
    """`apply_chat_template` with a time limit: a model's template is code (Jinja), and one with nested
    100k-iteration loops never finished. Jinja compiles templates to Python functions named
    "<template>"; a trace function on this thread alone checks the clock on their lines."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def local(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        return local if event == "call" and frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except _TemplateTimeout:
        raise ConfigError(
            f"the model's chat template did not finish rendering within {TEMPLATE_SECONDS:g} s (it may loop without "
            "end); fix the template (chat_template in the preset) or use another model"
        ) from None
    finally:
        sys.settrace(previous)


class _TemplateTimeout(Exception):
    pass


def stream_chat(
    loaded: LoadedModel,
    messages: Sequence[Message],
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece as the model's serving worker produces it.

    The reply is one request to the model's `Server`, batched with every other chat. Setting
    `cancel` (or closing the generator) ends it within one decode step. A failure of the request
    is raised here as GenerationError. `stats` is filled in as it goes.
    """
    params = params or loaded.preset.generation
    if not loaded.loaded:
        raise GenerationError("no model is loaded")
    started = time.perf_counter()
    prompt = build_prompt(loaded.tokenizer, messages, loaded.context_length, params.max_new_tokens)
    yield from _stream(loaded, prompt, params, cancel, stats, started)


def stream_completion(
    loaded: LoadedModel,
    text: str,
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Like `stream_chat` for a raw prompt (no chat template): the text that continues `text`."""
    params = params or loaded.preset.generation
    if not loaded.loaded:
        raise GenerationError("no model is loaded")
    started = time.perf_counter()
    if not isinstance(text, str) or not text:
        raise ConfigError("the prompt is empty; give some text to continue")
    _check_text(text, "the prompt")
    ids = list(loaded.tokenizer(strip_control(text)).input_ids)
    room = loaded.context_length - params.max_new_tokens
    if len(ids) > room:
        raise ConfigError(f"the prompt is {len(ids)} tokens; with max tokens {params.max_new_tokens} the context of "
                          f"{loaded.context_length} holds at most {max(room, 0)}")
    yield from _stream(loaded, Prompt(ids, 0, ()), params, cancel, stats, started)


def _stream(loaded: LoadedModel, prompt: Prompt, params: GenerationParams, cancel: threading.Event | None,
            stats: ReplyStats | None, started: float) -> Iterator[str]:
    from .serving import server_for

    stats = stats if stats is not None else ReplyStats()
    stats.prompt_tokens, stats.dropped_turns = len(prompt.input_ids), prompt.dropped_turns
    text = TextStream(loaded.tokenizer, tuple(dict.fromkeys(params.stop + prompt.stop)))
    moe = getattr(loaded, "moe", None)
    experts_before = moe.snapshot() if moe is not None else None
    handle = server_for(loaded).submit(prompt.input_ids, params, cancel)
    try:
        for token in handle:
            stats.new_tokens += 1
            piece = text.push([token])
            if text.stopped:
                handle.stop()  # the worker ends the request at its next step
            if piece:
                stats.time_to_first_token = stats.time_to_first_token or time.perf_counter() - started
                yield piece
            if text.stopped:
                break
        piece = text.finish()
        if piece:
            stats.time_to_first_token = stats.time_to_first_token or time.perf_counter() - started
            yield piece
    finally:
        handle.close()
        stats.seconds = time.perf_counter() - started
        finished = handle.finished
        if text.stopped:
            stats.finish_reason = "stop"
        elif finished is not None:
            stats.finish_reason = finished.reason
            stats.new_tokens = finished.new_tokens
        else:
            stats.finish_reason = "cancelled"
        if finished is not None:
            stats.forwards = finished.forwards
        if moe is not None and experts_before is not None:
            stats.experts = moe.since(experts_before)


def chat(
    loaded: LoadedModel,
    messages: Sequence[Message],
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
) -> Reply:
    """The non-streaming path: the joined stream and its stats."""
    stats = ReplyStats()
    text = "".join(stream_chat(loaded, messages, params, cancel=cancel, stats=stats))
    return Reply(text, stats)
