"""An OpenAI-compatible HTTP API over the serving layer: `GET /v1/models`, `POST /v1/chat/completions`
and `POST /v1/completions`, streamed as server-sent events or not.

Every request is one request to the loaded model's serving worker, batched with the app's chats.
The routes are plain FastAPI routes: the app serves them on its own port (Gradio's FastAPI app takes
them through `launch(app_kwargs={"routes": ...})`), and `python -m pipeline serve` serves them alone.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes:
400 names the bad field and what is accepted, 401 a missing or wrong key, 404 an unknown model, 503
while no model is loaded or a model loads. Bodies are parsed here, not by pydantic models, so that a
malformed request gets OpenAI's error shape rather than FastAPI's 422.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.routing import BaseRoute

from .chat import ReplyStats
from .errors import ConfigError, GenerationError, PipelineError
from .params import GenerationParams
from .session import ModelManager

logger = logging.getLogger(__name__)

MAX_STOPS = 16
# OpenAI's names for GenerationParams' fields, so that an error names the field the client sent.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}
# Fields of OpenAI's API this server does not implement: refused with a message when set to anything
# but their "off" value, never silently ignored.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
               "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
               "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
               "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"])}
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass(frozen=True)
class ApiAccess:
    """Who may call the API: anyone (`key` None, a local app), holders of `key`, or nobody
    (`refusal` set: a shared app or one with a login, started without a key)."""

    key: str | None = None
    refusal: str | None = None

    def check(self, request: Request) -> None:
        if self.refusal:
            raise ApiError(403, self.refusal, "permission_error", code="api_disabled")
        if self.key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")


@dataclass(frozen=True)
class Completion:
    """One parsed request: what to generate and how to answer."""

    model: str
    params: GenerationParams
    stream: bool
    include_usage: bool
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # completions


def openai_routes(manager: ModelManager, access: ApiAccess) -> list[BaseRoute]:
    """The API's routes, for `FastAPI(routes=...)` (or Gradio's `launch(app_kwargs={"routes": ...})`)."""
    router = APIRouter(prefix="/v1")
    started = int(time.time())

    def guarded(handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Any:
            try:
                access.check(request)
                return await handler(request)
            except ApiError as exc:
                if exc.status >= 500 or exc.status in (401, 403):
                    logger.warning("API %s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
                return exc.response()

        endpoint.__name__ = handler.__name__
        return endpoint

    async def models(request: Request) -> JSONResponse:
        served = manager.served()
        card = {"id": served.id, "object": "model", "created": started, "owned_by": "offload-chat"} if served else None
        if served and served.context_length:
            card["context_length"] = served.context_length
        return JSONResponse({"object": "list", "data": [card] if card else []})

    def generation(chat: bool) -> Callable:
        async def handler(request: Request) -> Any:
            return await _answer(manager, _parse(await _json_body(request), manager, chat=chat), chat=chat)

        handler.__name__ = "chat_completions" if chat else "completions"
        return handler

    router.add_api_route("/models", guarded(models), methods=["GET"])
    router.add_api_route("/chat/completions", guarded(generation(chat=True)), methods=["POST"])
    router.add_api_route("/completions", guarded(generation(chat=False)), methods=["POST"])
    return list(router.routes)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _parse(body: dict, manager: ModelManager, chat: bool) -> Completion:
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server; accepted: "
                                f"{' or '.join(repr(a) for a in allowed if a is not None) or 'leave it out'}",
                           param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model is required: the id of the loaded model (GET /v1/models lists it)", param="model")
    if manager.loading:
        raise ApiError(503, "a model is being loaded; try again in a moment", "server_error", code="model_loading")
    served = manager.served()
    if served is None:
        raise ApiError(503, f"no model is loaded ({manager.status})", "server_error", code="no_model")
    if model not in served.names:
        raise ApiError(404, f"the model {model!r} does not exist here; this server has {served.id!r}",
                       param="model", code="model_not_found")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:  # the preset's default: an offloaded model is slow, an unbounded default would not be
        max_tokens = served.default_max_tokens
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop={stop!r} is invalid; accepted: a non-empty string or a list of at most {MAX_STOPS}",
                       param="stop")
    # Fields a request leaves out take the loaded preset's sampling (as vLLM and transformers serve take
    # the model's generation config); OpenAI's own defaults (temperature 1, top_p 1) for a remote engine.
    base = served.defaults or GenerationParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)

    def given(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    try:
        params = GenerationParams(
            max_new_tokens=max_tokens,
            temperature=given("temperature", base.temperature),
            top_p=given("top_p", base.top_p),
            top_k=given("top_k", base.top_k),
            repetition_penalty=given("repetition_penalty", base.repetition_penalty),
            seed=body.get("seed"),
            stop=tuple(stop),
        )
    except ConfigError as exc:
        internal = str(exc).split("=", 1)[0]
        param = field if internal == "max_new_tokens" else PARAM_NAMES.get(internal)
        message = str(exc).replace(internal + "=", (param or internal) + "=", 1)
        raise ApiError(400, message, param=param) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream={stream!r} must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={options!r} must be an object", param="stream_options")
    include_usage = bool(options.get("include_usage", False))
    if chat:
        return Completion(model, params, stream, include_usage, messages=_messages(body.get("messages")))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"prompt={_short(prompt)} is invalid; accepted: a non-empty string", param="prompt")
    return Completion(model, params, stream, include_usage, prompt=prompt)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role={role!r} is not supported; accepted: 'system', 'developer', "
                                "'user', 'assistant'", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content[{j}] is not a text part; accepted: "
                                        "{'type': 'text', 'text': ...} (this server takes text only)",
                                   param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content={_short(content)} is invalid; accepted: a string or a list of "
                                "text parts", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_END = object()


async def _answer(manager: ModelManager, request: Completion, chat: bool) -> Any:
    """Start the request, wait for its first piece (so that errors before any token get their status),
    then answer whole or as server-sent events."""
    cancel = threading.Event()
    stats = ReplyStats()
    if chat:
        pieces = manager.stream(request.messages, request.params, cancel=cancel, stats=stats)
    else:
        pieces = manager.stream_completion(request.prompt, request.params, cancel=cancel, stats=stats)
    created, ident = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    try:
        first = await anyio.to_thread.run_sync(next, pieces, _END)
    except PipelineError as exc:
        cancel.set()
        raise _api_error(exc) from None
    if not request.stream:
        try:
            text = "" if first is _END else first + "".join(await anyio.to_thread.run_sync(list, pieces))
        except PipelineError as exc:
            raise _api_error(exc) from None
        finally:
            cancel.set()
        usage = _usage(stats)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": FINISH.get(stats.finish_reason, "stop"), "logprobs": None}
            return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": request.model,
                                 "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "finish_reason": FINISH.get(stats.finish_reason, "stop"), "logprobs": None}
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": request.model,
                             "choices": [choice], "usage": usage})
    return StreamingResponse(_events(pieces, first, cancel, stats, request, ident, created, chat),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(pieces: Iterator[str], first: Any, cancel: threading.Event, stats: ReplyStats,
                  request: Completion, ident: str, created: int, chat: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            body = {} if delta is None else {"content": delta}
            if role:
                body = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        data = {"id": ident, "object": kind, "created": created, "model": request.model, "choices": [choice]}
        if request.include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk(None, role=True)
        piece = first
        while piece is not _END:
            yield chunk(piece)
            piece = await anyio.to_thread.run_sync(next, pieces, _END)
        yield chunk(None, FINISH.get(stats.finish_reason, "stop"))
        if request.include_usage:
            data = {"id": ident, "object": kind, "created": created, "model": request.model, "choices": [],
                    "usage": _usage(stats)}
            yield f"data: {json.dumps(data)}\n\n"
    except PipelineError as exc:  # after the first token: the stream carries the error, as OpenAI's does
        yield f"data: {json.dumps(_api_error(exc).body())}\n\n"
    finally:
        cancel.set()  # a client that went away (or an error) ends the request within one decode step
    yield "data: [DONE]\n\n"


def _usage(stats: ReplyStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


def _api_error(exc: PipelineError) -> ApiError:
    message = str(exc)
    if isinstance(exc, ConfigError):
        return ApiError(400, message, param="messages" if "message" in message else None)
    if isinstance(exc, GenerationError) and "remote endpoint" in message:
        return ApiError(502, message, "server_error", code="upstream_error")
    if isinstance(exc, GenerationError) and ("busy" in message or "no model" in message or "reloaded" in message
                                             or "unloaded" in message):
        return ApiError(503, message, "server_error")
    logger.warning("API request failed: %s", message)
    return ApiError(500, message, "server_error")
