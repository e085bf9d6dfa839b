"""Remote engines: any OpenAI-compatible endpoint (vLLM, SGLang, Ray Serve LLM, llama.cpp's server,
`transformers serve`, another Offload Chat) as the model behind the same chat, with the same stats.

The project does not grow a distributed engine of its own: a model that outgrows one machine runs on
an engine built for that, and this module speaks to it with the official `openai` client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from .chat import Message, ReplyStats, validate_messages
from .errors import ConfigError, GenerationError, ModelSourceError
from .params import GenerationParams
from .textstream import StopFilter

CONNECT_TIMEOUT = 10.0  # seconds for the model list when connecting
REPLY_TIMEOUT = 120.0  # seconds without a byte from the endpoint before a reply fails
OPENAI_STOPS = 4  # OpenAI's API takes at most 4 stop strings


@dataclass
class RemoteModel:
    """A model served by an OpenAI-compatible endpoint."""

    url: str  # the API's base URL, ending in /v1
    model: str
    api_key: str | None = None
    available: tuple[str, ...] = ()  # what the endpoint listed when connecting
    client: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.model

    def describe(self) -> str:
        return f"{self.model} on {self.url}"

    def stream(self, messages: Sequence[Message], params: GenerationParams, *, cancel: threading.Event | None = None,
               stats: ReplyStats | None = None) -> Iterator[str]:
        """Stream a chat reply from the endpoint; stats as for a local model (tokens from the endpoint's usage)."""
        clean = validate_messages(messages)
        yield from self._stream(lambda **kw: self.client.chat.completions.create(messages=clean, **kw),
                                params, cancel, stats, chat=True)

    def stream_completion(self, prompt: str, params: GenerationParams, *, cancel: threading.Event | None = None,
                          stats: ReplyStats | None = None) -> Iterator[str]:
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("the prompt is empty; give some text to continue")
        yield from self._stream(lambda **kw: self.client.completions.create(prompt=prompt, **kw),
                                params, cancel, stats, chat=False)

    def _stream(self, create: Any, params: GenerationParams, cancel: threading.Event | None,
                stats: ReplyStats | None, chat: bool) -> Iterator[str]:
        import openai

        stats = stats if stats is not None else ReplyStats()
        started = time.perf_counter()
        # Only OpenAI's own sampling fields: top_k and repetition_penalty are extensions that some
        # servers reject (transformers serve answers 422), so they are not sent.
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                  "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                                  "stream_options": {"include_usage": True}}
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)[:OPENAI_STOPS]
        try:
            response = create(**kwargs)
        except openai.OpenAIError as exc:
            raise GenerationError(self._explain(exc)) from None
        counted = 0
        usage = None
        stats.finish_reason = "cancelled"
        text = StopFilter(params.stop)  # OpenAI's rule (the reply ends before a stop string), whatever the server does
        try:
            for chunk in response:
                if cancel is not None and cancel.is_set():
                    break
                if getattr(chunk, "usage", None):
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    raw = (choice.delta.content if chat else choice.text) or ""
                    counted += bool(raw)
                    stats.new_tokens = counted
                    piece = text.push(raw)
                    if piece:
                        stats.time_to_first_token = stats.time_to_first_token or time.perf_counter() - started
                        yield piece
                    if choice.finish_reason:
                        stats.finish_reason = {"stop": "stop", "length": "length"}.get(choice.finish_reason,
                                                                                       choice.finish_reason)
                if text.stopped:
                    stats.finish_reason = "stop"
                    break
            piece = text.finish()
            if piece:
                stats.time_to_first_token = stats.time_to_first_token or time.perf_counter() - started
                yield piece
        except openai.OpenAIError as exc:
            raise GenerationError(self._explain(exc)) from None
        finally:
            response.close()  # closing the connection is how an OpenAI-compatible server learns to stop
            stats.seconds = time.perf_counter() - started
            if usage is not None:
                stats.prompt_tokens, stats.new_tokens = usage.prompt_tokens or 0, usage.completion_tokens or counted
            if stats.finish_reason == "stop" and not text.stopped and not params.stop:
                stats.finish_reason = "eos"  # OpenAI's "stop" is the end of the text when no stop string was given

    def _explain(self, exc: Exception) -> str:
        return explain(exc, self.url, self.model)


def explain(exc: Exception, url: str, model: str | None = None) -> str:
    """An `openai` exception as one line a person can act on."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"the remote endpoint {url} did not answer in time (timeout); is it overloaded or stuck?"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"cannot reach the remote endpoint {url} ({type(cause).__name__}: {cause}); is it running?"
    if isinstance(exc, openai.AuthenticationError):
        return f"the remote endpoint {url} refused the API key (401); give the right key"
    if isinstance(exc, openai.PermissionDeniedError):
        return f"the remote endpoint {url} refused access (403): {_message(exc)}"
    if isinstance(exc, openai.NotFoundError):
        return f"the remote endpoint {url} has no model {model!r} (404): {_message(exc)}"
    if isinstance(exc, openai.APIStatusError):
        return f"the remote endpoint {url} answered {exc.status_code}: {_message(exc)}"
    return f"the remote endpoint {url} failed: {type(exc).__name__}: {exc}"


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:300]
        return str(error)[:300]
    return str(exc)[:300]


def base_url(url: str) -> str:
    """'http://host:8000', 'http://host:8000/', 'http://host:8000/v1' -> 'http://host:8000/v1'."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the remote endpoint URL is empty; give one like http://127.0.0.1:8000/v1")
    url = url.strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"remote endpoint {url!r} is not an http(s) URL; give one like http://127.0.0.1:8000/v1")
    return url if parsed.path.endswith("/v1") else url + "/v1"


def list_models(url: str, api_key: str | None = None, timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """The model ids an endpoint lists (raises ModelSourceError with a clear line when it cannot)."""
    import openai

    url = base_url(url)
    client = openai.OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=0)
    try:
        return [m.id for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise ModelSourceError(explain(exc, url)) from None


def connect(url: str, model: str, api_key: str | None = None, timeout: float = CONNECT_TIMEOUT) -> RemoteModel:
    """Check that the endpoint answers, accepts the key and serves `model`; then return it."""
    import openai

    url = base_url(url)
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("the remote model name is empty; give one the endpoint lists (GET /v1/models)")
    available = tuple(list_models(url, api_key, timeout))
    model = model.strip()
    if available and model not in available:
        raise ModelSourceError(f"the remote endpoint {url} does not serve {model!r}; it serves: {', '.join(available)}")
    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0,
                           timeout=openai.Timeout(REPLY_TIMEOUT, connect=timeout))
    return RemoteModel(url, model, api_key, available, client)
