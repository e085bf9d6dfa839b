"""Chat streaming: one generator that yields reply text as tokens arrive.

`generate` runs on a worker thread feeding a `TextIteratorStreamer`; `stream_chat` hides the
thread: it waits for the reply's job in `finally`, re-raises its exception in the caller, stops it within one token
on cancellation, and never yields half a character or the start of a stop string.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, GenerationError
from .loading import LoadedModel
from .params import GenerationParams

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}
ROLES = ("system", "user", "assistant")
MAX_MESSAGE_CHARS = 200_000  # a longer message cannot fit any context we serve; refuse before tokenizing
_POLL_SECONDS = 0.05
# Replies are generated on a few long-lived worker threads, not on a new thread each: CUDA libraries
# keep per-thread state (cuBLAS handles and workspaces) that a thread's exit does not give back.
# Measured on an H100: +4.4 MiB of RSS per reply thread, none with reused threads.
_WORKERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="generate")

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

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        ttft = f"{self.time_to_first_token:.2f} s" if self.time_to_first_token is not None else "–"
        text = (
            f"{self.new_tokens} tokens · {self.tokens_per_second:.1f} tokens/s · first token {ttft}"
            f" · prompt {self.prompt_tokens} tokens"
        )
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


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Check roles and contents; the last message must be the user's."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role', 'content'} mappings")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}]={m!r}: expected {{'role': one of {list(ROLES)}, 'content': str}}")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise ConfigError(
                f"messages[{i}] is {len(m['content']):,} characters; the limit is {MAX_MESSAGE_CHARS:,}"
            )
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
    dropped = 0
    while True:
        text = tokenizer.apply_chat_template(
            system + turns, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return Prompt(list(ids), dropped, stops)
        # Drop the oldest exchange: everything up to the next user message.
        next_user = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
        if next_user is None:
            raise ConfigError(
                f"the message is too long: the prompt is {len(ids)} tokens, but the context of {context_length} "
                f"tokens minus max_new_tokens={max_new_tokens} leaves {budget}; shorten the message or lower "
                "max_new_tokens"
            )
        dropped += len([m for m in turns[:next_user] if m["role"] == "user"])
        turns = turns[next_user:]


def _counting_streamer(tokenizer: Any) -> Any:
    """A TextIteratorStreamer that emits every token's text (not word by word), counts new tokens
    and stamps the first one. Text ending in U+FFFD (a multi-byte character split across tokens)
    waits for the next token. Defined here so transformers is imported only when chatting."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.new_tokens = 0
            self.first_token_at: float | None = None

        def put(self, value: torch.Tensor) -> None:
            if value.dim() > 1:
                value = value[0]  # [batch=1, seq] -> [seq]
            if self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.new_tokens += int(value.numel())
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            printable = text[self.print_len :]
            if text.endswith("\n"):  # start a fresh cache: decoding stays O(line), not O(reply)
                self.token_cache, self.print_len = [], 0
            else:
                self.print_len = len(text)
            if printable:
                self.on_finalized_text(printable)

    return CountingStreamer()


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to keep back: a half-decoded character or a possible stop-string start."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    if text[len(text) - keep - 1 : len(text) - keep] == "\ufffd":
        keep += 1
    return keep


def stream_chat(
    loaded: LoadedModel,
    messages: Sequence[Message],
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece as the model generates it.

    Setting `cancel` (or closing the generator) stops generation within one token. An exception
    in the generation thread is raised here as GenerationError. `stats` is filled in as it goes.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    params = params or loaded.preset.generation
    stats = stats if stats is not None else ReplyStats()
    if not loaded.loaded:
        raise GenerationError("no model is loaded")
    started = time.perf_counter()
    prompt = build_prompt(loaded.tokenizer, messages, loaded.context_length, params.max_new_tokens)
    stats.prompt_tokens, stats.dropped_turns = len(prompt.input_ids), prompt.dropped_turns
    stops = tuple(dict.fromkeys(params.stop + prompt.stop))
    stop_now = threading.Event()
    cancel = cancel or threading.Event()

    class Interrupt(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            halt = stop_now.is_set() or cancel.is_set()
            return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

    streamer = _counting_streamer(loaded.tokenizer)
    device = loaded.plan.compute_device
    input_ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)  # [1, prompt]
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        repetition_penalty=params.repetition_penalty,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([Interrupt()]),
        pad_token_id=pad,
    )
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:  # the checkpoint's sampling defaults would otherwise trigger warnings with do_sample=False
        kwargs.update(temperature=None, top_p=None, top_k=None)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # The thread, not the consumer, holds the lock: replies queue up one at a time, and
            # unload() waits only for a generation that a cancel ends within one token.
            with loaded.lock, torch.inference_mode():
                if loaded.model is None:
                    raise GenerationError("the model was unloaded before this reply started")
                if params.seed is not None:
                    from transformers import set_seed

                    set_seed(params.seed)
                loaded.model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            failure.append(exc)
            streamer.end()

    job = _WORKERS.submit(run)
    text, sent = "", 0
    finished = False
    try:
        while not finished:
            try:
                chunk = streamer.text_queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                finished = job.done() and streamer.text_queue.empty()
                continue
            if chunk is streamer.stop_signal:
                finished, chunk = True, ""
            text += chunk
            hit = min((i for s in stops if (i := text.find(s, max(0, sent - len(s)))) >= 0), default=-1)
            if hit >= 0:
                text = text[:hit]
                stop_now.set()
                stats.finish_reason = "stop"
                finished = True
            end = len(text) if finished else len(text) - _holdback(text, stops)
            if end > sent:
                stats.time_to_first_token = stats.time_to_first_token or time.perf_counter() - started
                piece, sent = text[sent:end], end
                yield piece
    finally:
        stop_now.set()
        try:
            job.result(timeout=600)  # run() hands its own exceptions over in `failure`
        except concurrent.futures.TimeoutError:
            logger.error("generation thread did not stop within 600 s")
        stats.new_tokens = streamer.new_tokens
        stats.seconds = time.perf_counter() - started
        if streamer.first_token_at is not None and stats.time_to_first_token is None:
            stats.time_to_first_token = streamer.first_token_at - started
        if not stats.finish_reason:
            stats.finish_reason = _finish_reason(cancel, stats, params)
    if failure:
        exc = failure[0]
        if isinstance(exc, GenerationError):
            raise exc
        if isinstance(exc, torch.OutOfMemoryError):
            raise GenerationError("out of GPU memory during generation; lower the GPU budget or max_new_tokens") from exc
        raise GenerationError(f"generation failed: {type(exc).__name__}: {exc}") from exc


def _finish_reason(cancel: threading.Event, stats: ReplyStats, params: GenerationParams) -> str:
    if cancel.is_set():
        return "cancelled"
    if stats.new_tokens >= params.max_new_tokens:
        return "length"
    return "eos"


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
