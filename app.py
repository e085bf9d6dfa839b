"""Gradio app: pick a model, set memory budgets, see where every layer will land, and chat.

Thin by design: the UI and its wiring. Planning, loading and streaming live in `pipeline/`.
Run: python app.py [--model demo] [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS]
"""

from __future__ import annotations

import argparse
import contextlib
import html
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline.access import API_KEY_ENV, Access, parse_credentials
from pipeline.api import ApiAccess, openai_routes
from pipeline.budgets import GiB, app_default_budgets, beyond_hardware, detect_hardware
from pipeline.chat import ReplyStats
from pipeline.errors import PipelineError
from pipeline.params import GenerationParams
from pipeline.presets import REPO_ROOT, default_model, list_presets, load_app_config, offload_root
from pipeline.preview import chat_display, chat_raw, error_html, plan_html
from pipeline.quantization import QuantSettings
from pipeline.remote import list_models
from pipeline.session import ModelManager, Settings

logger = logging.getLogger("app")

QUANT_LABELS = {"none": "none", "8-bit": "int8", "4-bit": "4bit"}
CONCURRENCY = 16  # chat events streaming at once (the serving worker batches their replies)
MAX_UPLOAD = "1kb"  # nothing in this app takes a file
MAX_REPLIES_PER_SESSION = 2  # replies one page or API client may have running at once
MAX_REPLIES_PER_ADDRESS = 16  # ... and one address (many pages behind one address are normal: NAT, a class)
MAX_NEW_TOKENS_UI = 4096
ERROR_MARK = "⚠️ **Error:** "  # starts every error note in the chat; the model never sees those notes
# The model panel's inputs, in the order every settings event passes them (then one value per GPU).
SETTING_NAMES = ("preset", "custom", "quant", "threshold", "skip", "four_bit", "compute", "double_quant", "disk",
                 "offload_dir", "cpu")


def client_key(request: gr.Request | None) -> str:
    """The client's address (the first X-Forwarded-For hop behind a share link or a Space's proxy)."""
    if request is None:
        return "local"
    forwarded = (request.headers or {}).get("x-forwarded-for", "") if hasattr(request, "headers") else ""
    if forwarded:
        return forwarded.split(",")[0].strip()
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "local"


class ClientLimits:
    """Bounds the replies one client runs at once (per page or API session, and per address), so one
    visitor cannot fill the queue for everyone."""

    def __init__(self, per_session: int = MAX_REPLIES_PER_SESSION, per_address: int = MAX_REPLIES_PER_ADDRESS) -> None:
        self.per_session, self.per_address = per_session, per_address
        self._running: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, request: gr.Request | None) -> Iterator[None]:
        keys = [("session", getattr(request, "session_hash", None) or "local", self.per_session),
                ("address", client_key(request), self.per_address)]
        with self._lock:
            for kind, key, limit in keys:
                if self._running.get((kind, key), 0) >= limit:
                    raise PipelineError(f"this {'page' if kind == 'session' else 'address'} already has {limit} "
                                        "replies running; wait for one to finish")
            for kind, key, _ in keys:
                self._running[(kind, key)] = self._running.get((kind, key), 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for kind, key, _ in keys:
                    self._running[(kind, key)] -= 1
                    if not self._running[(kind, key)]:
                        del self._running[(kind, key)]


class ChatSession:
    """One browser page's reply state: the Stop button's event, and an epoch that Clear advances so
    that a reply still streaming never writes into the cleared chat."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.epoch = 0

    def begin(self) -> int:
        self.cancel.clear()
        return self.epoch

    def reset(self) -> None:
        self.epoch += 1
        self.cancel.set()


def _quant_label(mode: str) -> str:
    return {"int8": "8-bit", "nf4": "4-bit", "fp4": "4-bit"}.get(mode, "none")


# The model panel's inputs, in the order every settings event passes them (then one value per GPU).

def message_text(content: Any) -> str:
    """Chatbot content (a string, or Gradio 6's list of parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""

def model_messages(history: list[dict], system: str) -> list[dict[str, str]]:
    """The conversation the model sees: no stats or error notes (those carry metadata)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        if m.get("metadata") or m.get("role") not in ("user", "assistant"):
            continue
        if m["role"] == "assistant" and message_text(m.get("content")).startswith(ERROR_MARK):
            continue
        messages.append({"role": m["role"], "content": chat_raw(message_text(m.get("content")))})
    return messages

def generation_params(max_new: Any, temperature: Any, top_p: Any, top_k: Any, penalty: Any, seed: Any,
                      speculate: Any = "lookup") -> GenerationParams:
    seed = None if seed in (None, "", -1) or (isinstance(seed, float) and seed < 0) else seed
    return GenerationParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=penalty, seed=seed, speculate=speculate or "lookup")

def add_user_message(message: str, history: list[dict]) -> tuple[Any, Any]:
    if not message or not message.strip():
        gr.Warning("Type a message first.")
        return gr.skip(), gr.skip()  # leave the chat as it is (no re-render, nothing to answer)
    return "", history + [{"role": "user", "content": chat_display(message)}]

def drop_last_reply(history: list[dict]) -> list[dict]:
    """Retry: remove the last reply (and its stats) so the last user message is answered again."""
    while history and history[-1].get("role") == "assistant":
        history = history[:-1]
    return history

def undo(history: list[dict]) -> tuple[list[dict], str]:
    """Undo: remove the last exchange and put the user's message back in the box."""
    history = drop_last_reply(history)
    text = chat_raw(message_text(history[-1]["content"])) if history else ""
    return history[:-1], text


class ChatApp:
    """The app's long-lived state (the model manager, roles, per-page sessions, per-client limits) and
    its event functions. `create_app` builds one and its Blocks; tests and a second front end build
    their own instead of sharing import-time globals."""

    def __init__(self, config: dict[str, Any], manager: ModelManager, access: Access | None = None) -> None:
        self.config = config
        self.manager = manager
        self.access = access or Access()
        self.offload_root = str(offload_root(None, config))
        self.hardware = manager.hardware or detect_hardware(self.offload_root)
        self.defaults = app_default_budgets(self.hardware, config, self.offload_root)
        self.disk_cap_gib = self.defaults.disk_cap / GiB if self.defaults.disk_cap is not None else None
        self.model_roots = [REPO_ROOT / r for r in config.get("model_roots", ["models"])]
        self.presets = list_presets()
        self.limits = ClientLimits()
        self._sessions: dict[str, ChatSession] = {}
        self._sessions_lock = threading.Lock()

    def settings_model(self) -> str:
        """The model the panel starts with: the loaded one's preset, else the configured default."""
        loaded = self.manager.settings
        return loaded.model if loaded is not None and loaded.model in self.presets else default_model(self.config)

    def _session(self, request: gr.Request | None) -> ChatSession:
        key = getattr(request, "session_hash", None) or "default"
        with self._sessions_lock:
            return self._sessions.setdefault(key, ChatSession())

    def shown(self, error: object) -> str:
        """An error as a visitor of a shared app sees it: the app's install folder is not theirs to know
        (the operator's log keeps the full text)."""
        text = str(error)
        if self.access.shared:
            text = text.replace(str(REPO_ROOT), "<app>")
        return text

    def make_settings(
        self, preset: str, custom: str, quant: str, threshold: float, skip: str, four_bit: str, compute: str,
        double_quant: bool, disk: bool, offload_dir: str, cpu_gib: float, *gpu_gib: float,
    ) -> Settings:
        """UI values -> Settings. Validation happens in the pipeline, which names any bad value."""
        mode = QUANT_LABELS.get(quant, quant)
        if mode == "4bit":
            mode = four_bit
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise PipelineError(f"8-bit threshold={threshold!r} is not a number") from None
        folder = offload_root(offload_dir if isinstance(offload_dir, str) else None, self.config)
        root = Path(self.offload_root).resolve()
        if self.manager.allowed_roots is not None and not (folder.resolve() == root or root in folder.resolve().parents):
            # A shared app writes offload files only under its own offload root.
            raise PipelineError(f"offload folder {str(folder)!r} is outside {str(root)!r}, the only place this shared "
                                "app writes offload files")
        model = (custom or "").strip() or preset
        current = self.manager.settings
        return Settings(
            model=model,
            # A draft attached at start (--draft) stays with its model; another model gets its preset's own.
            draft=current.draft if current is not None and current.model == model else None,
            gpu_gib=tuple(gpu_gib),
            cpu_gib=cpu_gib,
            disk=bool(disk),
            offload_dir=str(folder),
            disk_cap_gib=self.disk_cap_gib,
            quant=QuantSettings(mode=mode, int8_threshold=threshold, skip_modules=skip or "", compute_dtype=compute,
                                double_quant=bool(double_quant)),
        )

    def preview(self, *values: Any) -> str:
        """Re-plan without loading; always returns HTML (errors are shown in the picture, not raised)."""
        try:
            settings = self.make_settings(*values)
            prepared = self.manager.prepare(settings)
            speed = prepared.estimate.describe() if prepared.estimate else ""
            return plan_html(prepared.plan, self.manager.resolve(settings).budgets.describe(), speed)
        except PipelineError as exc:
            title = "Does not fit" if "does not fit" in str(exc) or "needs" in str(exc) else "Cannot plan"
            return error_html(self.shown(exc), title)

    def what_if_preview(self, gpu_gib: Any, *values: Any) -> str:
        """"Plan for a GPU with N GiB": the plan and its predicted speed on hardware this machine does not
        have (priced as a CUDA machine runs it); Apply still loads for this machine."""
        try:
            settings = self.make_settings(*values)
            prepared = self.manager.prepare(settings, what_if_gpu_gib=gpu_gib)
            speed = f"{prepared.estimate.describe()} ({prepared.estimate.source})" if prepared.estimate else ""
            return plan_html(prepared.plan, f"GPU0 {float(gpu_gib):g} GiB (what-if) · CPU and disk as set", speed,
                             what_if=f"a GPU with {float(gpu_gib):g} GiB")
        except (PipelineError, TypeError, ValueError) as exc:
            return error_html(self.shown(exc), "Cannot plan")

    def status_markdown(self) -> str:
        info = self.manager.describe()
        if not info["loaded"]:
            return f"**No model loaded.** {info['status']}"
        if info["remote"]:
            return (f"**{info['model']}** · remote engine at {self.shown(info['remote'])} (nothing runs on this "
                    f"machine) · serving: {info['serving']}  \n{self.shown(info['status'])}")
        offload = f" (offloaded layers run with the {info['offload']})" if info["offload"] else ""
        return (
            f"**{info['model']}** · {info['dtype']} · quantization **{info['quantization']}** · "
            f"context {info['context_length']} tokens · serving: {info['serving']}  \n"
            f"Placement: {info['placement']}{offload} · planned {info['memory']}  \n"
            f"In use: {info['in_use']} · {info['status']}"
        )

    def max_new_limit(self, current: Any = None) -> Any:
        """Max new tokens up to half the loaded model's context: the other half is left for the conversation."""
        loaded = self.manager.current
        limit = max(1, min(MAX_NEW_TOKENS_UI, loaded.context_length // 2)) if loaded and loaded.loaded else MAX_NEW_TOKENS_UI
        if isinstance(current, (int, float)) and current > limit:
            return gr.update(maximum=limit, value=limit)
        return gr.update(maximum=limit)

    def still_loaded(self) -> str:
        loaded, remote = self.manager.current, self.manager.remote
        if remote is not None:
            return f"Replies still come from {remote.describe()}: chats go on as before."
        if loaded is not None and loaded.loaded:
            return f"{loaded.preset.display_name} is still loaded: chats go on as before."
        return f"No model is loaded now. {self.manager.status}"

    def apply_settings(self, operator: bool, *values: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
        """API `/load_model`: unload the current model and load the new plan (cancelling replies in flight);
        returns the status and the plan picture, or raises an error that says what is loaded now.

        `operator` is the caller's role (server-side state: an API client cannot set it)."""
        if not operator:
            logger.warning("a visitor's reload was refused")
            raise gr.Error("Only the operator of this shared app can change the model, its budgets, quantization or "
                           "offload folder; visitors can chat and see the plan (" + self.access.describe() + ").",
                           print_exception=False)
        try:
            settings = self.make_settings(*values)
            self.manager.load(settings, progress=lambda f, message: progress(f, desc=message))
        except PipelineError as exc:
            logger.warning("Apply & reload failed: %s", exc)
            raise gr.Error(self.shown(f"Loading failed: {exc}. {self.still_loaded()}"), print_exception=False) from None
        return self.status_markdown(), self.preview(*values)

    def apply_from_page(self, operator: bool, *values: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, str, str]:
        """The Apply button: like the API, but a failure is a message beside the button (the status and the
        plan stay readable), saying plainly whether the previous model still answers."""
        try:
            status, picture = self.apply_settings(operator, *values, progress=progress)
        except gr.Error as exc:
            return self._failed(str(exc.message)), self.status_markdown(), self.preview(*values)
        return "", status, picture

    def remote_models(self, operator: bool, url: str, key: str) -> Any:
        """"List models": the endpoint's model list, for the model box (the operator's only)."""
        if not operator:
            raise gr.Error("Only the operator can connect this app to a remote engine.", print_exception=False)
        try:
            names = list_models(url, key or None)
        except PipelineError as exc:
            logger.warning("listing a remote endpoint's models failed: %s", exc)
            raise gr.Error(str(exc), print_exception=False) from None
        if not names:
            gr.Warning("The endpoint lists no models: type the model's name.")
        return gr.update(choices=names, value=names[0] if names else None)

    def connect_remote(self, operator: bool, url: str, key: str, model: str) -> tuple[str, str, str]:
        """"Connect": replies come from the endpoint from now on; on failure nothing changes, and the
        message beside the button says what still answers."""
        if not operator:
            return self._failed("Only the operator of this shared app can change the model."), self.status_markdown(), gr.skip()
        try:
            remote = self.manager.connect_remote(url, model or "", key or None)
        except PipelineError as exc:
            logger.warning("connecting to a remote engine failed: %s", exc)
            return self._failed(f"Connecting failed: {exc}. {self.still_loaded()}"), self.status_markdown(), gr.skip()
        picture = (f"<div id='remote-plan' style='padding:8px'>Replies come from <b>{html.escape(remote.model)}</b> on "
                   f"{html.escape(remote.url)}: no layer is placed on this machine. Apply a local model to return.</div>")
        return "", self.status_markdown(), picture

    def _failed(self, message: str) -> str:
        return ('<div class="load-failed" role="alert" style="color:#991b1b;background:#fef2f2;border:1px solid #fca5a5;'
                f'border-radius:6px;padding:8px 10px">{html.escape(message)}</div>')

    def sign_in(self, user: str, password: str, request: gr.Request = None) -> tuple[bool, str]:
        """The operator signs in (this page, or this API client's session, becomes the operator)."""
        try:
            ok = self.access.check(user or "", password or "")
        except PipelineError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        if not ok:
            logger.warning("failed operator sign-in from session %s", getattr(request, "session_hash", "?"))
            raise gr.Error("Wrong operator name or password.", print_exception=False)
        logger.info("operator signed in (session %s)", getattr(request, "session_hash", "?"))
        return True, "Signed in as the operator: you can change the model."

    def respond(self, history: list[dict], system: str, max_new: Any, temperature: Any, top_p: Any, top_k: Any, penalty: Any,
                seed: Any, speculate: Any = "lookup", request: gr.Request = None):
        """Stream the assistant's reply into the chat, then its stats under it.

        The request comes before nothing variadic: Gradio fills a `gr.Request` parameter only then, and
        Stop, Clear and closing the page reach this reply through that page's session."""
        if not history or history[-1].get("role") != "user":
            yield gr.skip()  # nothing to answer (an empty message was refused); a bare return would clear the chat
            return
        session = self._session(request)
        epoch = session.begin()
        history = history + [{"role": "assistant", "content": ""}]
        stats = ReplyStats()
        reply = ""
        try:
            params = generation_params(max_new, temperature, top_p, top_k, penalty, seed, speculate)
            with self.limits.slot(request):
                for piece in self.manager.stream(model_messages(history[:-1], system), params, cancel=session.cancel,
                                            stats=stats):
                    if session.epoch != epoch:
                        # Cleared: the stream is cancelled. An update this stream sent just before Clear may
                        # still reach the page after Clear's empty chat, so the last word is an empty chat.
                        yield []
                        return
                    reply += piece
                    history[-1]["content"] = chat_display(reply)
                    yield history
        except Exception as exc:  # noqa: BLE001 - every failure becomes a note in the chat, and a log line
            if session.epoch != epoch:
                yield []
                return
            if isinstance(exc, PipelineError):
                logger.warning("chat error shown to the user: %s", exc)
                text = str(exc)
            else:
                logger.exception("unexpected chat error")
                text = f"internal error ({type(exc).__name__}); the operator's log has the details"
            if not history[-1]["content"]:
                history.pop()
            history.append({"role": "assistant", "content": ERROR_MARK + chat_display(self.shown(text))})
            yield history
            return
        if session.epoch != epoch:
            yield []
            return
        if not history[-1]["content"]:
            history[-1]["content"] = "(no text)"
        stopped = " · stopped" if stats.finish_reason == "cancelled" else ""
        history.append({"role": "assistant", "content": f"finished: {stats.finish_reason}",
                        "metadata": {"title": f"{stats.describe()}{stopped}", "status": "done"}})
        yield history

    def send_message(self, message: str, history: list[dict], system: str, max_new: Any, temperature: Any, top_p: Any,
                     top_k: Any, penalty: Any, seed: Any, speculate: Any = "lookup", request: gr.Request = None):
        """Enter or Send: the message joins the chat, the box empties, and the reply streams in.

        One event for both triggers with trigger_mode="always_last": a message sent while this page's
        reply still streams waits in the box and is sent when the reply ends, so it is never lost and
        never overwritten by the running stream."""
        box, history = add_user_message(message, history)
        if isinstance(history, type(gr.skip())):
            yield box, history
            return
        yield box, history
        for update in self.respond(history, system, max_new, temperature, top_p, top_k, penalty, seed, speculate,
                                   request):
            yield gr.skip(), update

    def stop(self, request: gr.Request = None) -> None:
        self._session(request).cancel.set()

    def clear_chat(self, request: gr.Request = None) -> list:
        """Clear: stop this page's reply and empty the chat (the reply will not write into it again)."""
        self._session(request).reset()
        return []

    def forget_session(self, request: gr.Request = None) -> None:
        """A closed page: stop its reply, if one is streaming, and forget the page."""
        key = getattr(request, "session_hash", None)
        with self._sessions_lock:
            session = self._sessions.pop(key, None) if key else None
        if session is not None:
            session.reset()

    def api_chat(self, message: str, system: str = "", max_new_tokens: int = 256, temperature: float = 0.7,
                 top_p: float = 0.95, top_k: int = 50, repetition_penalty: float = 1.1, seed: int = -1,
                 speculate: str = "lookup", request: gr.Request = None) -> Iterator[str]:
        """Answer one message with the loaded language model, streaming the growing reply text.

        Args:
            message: the user's message.
            system: an optional system prompt.
            max_new_tokens: the most tokens to generate.
            temperature: sampling temperature; 0 means greedy decoding.
            top_p: nucleus sampling threshold (0 to 1].
            top_k: sample among the k most likely tokens; 0 turns it off.
            repetition_penalty: above 1 discourages repeating tokens.
            seed: random seed for reproducible sampling; -1 for a random one.
            speculate: "lookup" (prompt-lookup speculation, the same output in fewer steps), "draft" (a draft
                model proposes; the loaded model must have one) or "off".
        """
        if not isinstance(message, str) or not isinstance(system, str):
            raise gr.Error("message and system must be text", print_exception=False)
        if not message or not message.strip():
            raise gr.Error("The message is empty: type something to send.", print_exception=False)
        text = ""
        try:
            params = generation_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, speculate)
            with self.limits.slot(request):
                for piece in self.manager.stream(model_messages([{"role": "user", "content": message}], system), params):
                    text += piece
                    yield text
        except PipelineError as exc:
            logger.warning("API chat error: %s", exc)
            raise gr.Error(self.shown(exc), print_exception=False) from None

    def build_app(self) -> gr.Blocks:
        names = {p.display_name: name for name, p in self.presets.items()}
        default_model = self.settings_model()
        # No component takes files: uploads are capped at MAX_UPLOAD by launch() and whatever arrives is
        # deleted within the hour (an unauthenticated 50 MiB upload was stored and served back).
        with gr.Blocks(title="Offload Chat", delete_cache=(600, 3600)) as demo:
            gr.Markdown("### Offload Chat <span style='font-weight:normal;font-size:0.8em'>· language models bigger than "
                        f"your GPU · {html.escape(self.hardware.describe())}</span>", elem_id="hardware")
            # What is loaded, where, and how much memory it uses: first, so it is visible without scrolling.
            status = gr.Markdown(self.status_markdown(), elem_id="status")
            with gr.Row():
                # The chat column comes first: on a phone, where columns stack, the chat is on top.
                with gr.Column(scale=3, min_width=420):
                    chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot", buttons=["copy", "copy_all"])
                    # lines=1: Gradio sends on Enter only for a one-line box; it still grows to max_lines,
                    # and Shift+Enter makes a new line.
                    message = gr.Textbox(placeholder="Type a message: Enter sends, Shift+Enter makes a new line",
                                         show_label=False, lines=1, max_lines=8, elem_id="message", autofocus=True,
                                         submit_btn=False)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", scale=2, elem_id="send")
                        stop_button = gr.Button("Stop", scale=1, elem_id="stop")
                        clear = gr.Button("Clear", scale=1, elem_id="clear")
                    with gr.Accordion("Generation", open=False):
                        system = gr.Textbox("", label="System prompt", lines=2)
                        gen = self.presets[default_model].generation if default_model in self.presets else GenerationParams()
                        max_new = gr.Slider(1, MAX_NEW_TOKENS_UI, value=gen.max_new_tokens, step=1,
                                            label="Max new tokens (up to half the model's context)", elem_id="max-new")
                        temperature = gr.Slider(0, 2, value=gen.temperature, step=0.05, label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1, value=gen.top_p, step=0.01, label="Top-p")
                        top_k = gr.Slider(0, 200, value=gen.top_k, step=1, label="Top-k (0 = off)")
                        penalty = gr.Slider(0.8, 2, value=gen.repetition_penalty, step=0.01, label="Repetition penalty")
                        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                        speculate = gr.Radio([("off", "off"), ("prompt lookup", "lookup"), ("draft model", "draft")],
                                             value="lookup", elem_id="speculate",
                                             label="Speculation (the same reply in fewer steps when a chat runs "
                                                   "alone; draft model: a model loaded with one, e.g. --draft)")
                with gr.Column(scale=2, min_width=360):
                    with gr.Group():
                        preset = gr.Dropdown(choices=[(label, name) for label, name in names.items()],
                                             value=default_model if default_model in self.presets else None,
                                             label="Model: a preset", elem_id="preset")
                        custom = gr.Textbox(label="…or a hub ID / local path (replaces the preset)",
                                            placeholder="owner/name or /path/to/model", elem_id="custom-model")
                        quant = gr.Radio(["none", "8-bit", "4-bit"], label="Quantization (bitsandbytes)",
                                         value=_quant_label(self.presets[default_model].quantization if default_model in self.presets else "none"),
                                         elem_id="quant")
                        with gr.Accordion("Advanced quantization", open=False):
                            threshold = gr.Number(6.0, label="8-bit outlier threshold")
                            skip = gr.Textbox("lm_head", label="Modules kept unquantized (comma-separated)")
                            four_bit = gr.Radio(["nf4", "fp4"], value="nf4", label="4-bit type")
                            compute = gr.Dropdown(["auto", "float16", "bfloat16", "float32"], value="auto",
                                                  label="4-bit compute dtype")
                            double_quant = gr.Checkbox(True, label="4-bit double quantization")
                    gpu_sliders = [
                        gr.Slider(0, round(g.total / GiB, 2), value=round(self.defaults.gpu[g.index] / GiB, 2), step=0.05,
                                  label=f"GPU {g.index} · {g.name} (GiB)", elem_id=f"gpu-{g.index}")
                        for g in self.hardware.gpus
                    ]
                    cpu = gr.Slider(0, round(self.hardware.ram_total / GiB, 2), value=round(self.defaults.cpu / GiB, 2), step=0.01,
                                    label="CPU RAM budget (GiB)", elem_id="cpu-slider")
                    with gr.Row():
                        disk = gr.Checkbox(bool(self.config.get("disk", True)), label="Disk offload", elem_id="disk")
                        offload_dir = gr.Textbox(self.offload_root, label="Offload folder", scale=3)
                    plan_view = gr.HTML(elem_id="plan-preview")
                    with gr.Row():
                        what_if_gib = gr.Number(None, label="…or plan for a GPU you don't have (GiB)", minimum=0,
                                                maximum=4096, scale=3, elem_id="what-if-gib")
                        what_if_button = gr.Button("Plan for it", scale=1, elem_id="what-if")
                    apply = gr.Button("Apply & reload model", variant="primary", elem_id="apply",
                                      interactive=self.access.open_to_all)
                    # Loading progress and a failed load's error are shown here, never over the plan or status.
                    load_box = gr.HTML("", elem_id="load-result")
                    with gr.Accordion("…or a remote engine (OpenAI-compatible: vLLM, SGLang, another Offload Chat)",
                                      open=False, elem_id="remote"):
                        remote_url = gr.Textbox(label="Endpoint URL", placeholder="http://127.0.0.1:8000/v1",
                                                elem_id="remote-url")
                        remote_key = gr.Textbox(label="API key (if it needs one)", type="password", elem_id="remote-key")
                        remote_model = gr.Dropdown([], label="Model", allow_custom_value=True, elem_id="remote-model")
                        with gr.Row():
                            remote_list = gr.Button("List models", elem_id="remote-list")
                            remote_connect = gr.Button("Connect", variant="primary", elem_id="remote-connect")
                        gr.Markdown("Top-k and repetition penalty are not part of OpenAI's API and are not sent.")
                    with gr.Accordion("Operator sign-in", open=False, visible=self.access.shared, elem_id="operator"):
                        gr.Markdown(self.access.describe().capitalize() + ".", elem_id="role")
                        op_user = gr.Textbox(label="Operator name", elem_id="op-user")
                        op_password = gr.Textbox(label="Password", type="password", elem_id="op-password")
                        op_button = gr.Button("Sign in", elem_id="op-sign-in")
                        op_result = gr.Markdown("", elem_id="op-result")

            settings_inputs = [preset, custom, quant, threshold, skip, four_bit, compute, double_quant, disk, offload_dir,
                               cpu, *gpu_sliders]
            # This page's role, kept on the server (API clients cannot send it): a local app's user is the
            # operator; in a shared app only after signing in (or logging in with the operator's account).
            operator = gr.State(self.access.open_to_all)
            panel = [*settings_inputs, apply, remote_url, remote_key, remote_model, remote_list, remote_connect]

            def role_view(is_operator: bool) -> list[Any]:
                return [gr.update(interactive=is_operator) for _ in panel]

            def role_from_login(request: gr.Request = None) -> list[Any]:
                is_operator = self.access.open_to_all or self.access.is_operator_login(getattr(request, "username", None))
                return [is_operator, *role_view(is_operator)]

            demo.load(role_from_login, None, [operator, *panel], api_visibility="private", show_progress="hidden")
            op_button.click(self.sign_in, [op_user, op_password], [operator, op_result], api_name="sign_in",
                            api_visibility="undocumented").success(
                role_view, operator, panel, api_visibility="private", show_progress="hidden")
            gen_inputs = [max_new, temperature, top_p, top_k, penalty, seed, speculate]

            # Live preview. Sliders re-plan on every user change (dragging, arrow keys, a typed number):
            # always_last runs one preview at a time and then the newest.
            for slider in [cpu, *gpu_sliders]:
                slider.input(self.preview, settings_inputs, plan_view, api_visibility="private", show_progress="hidden",
                             trigger_mode="always_last")
            for component in [quant, threshold, four_bit, compute, double_quant, disk]:
                component.change(self.preview, settings_inputs, plan_view, api_visibility="private", show_progress="hidden")
            for textbox in [skip, offload_dir]:
                textbox.submit(self.preview, settings_inputs, plan_view, api_visibility="private", show_progress="hidden")
                textbox.blur(self.preview, settings_inputs, plan_view, api_visibility="private", show_progress="hidden")

            # One model choice: a path typed replaces the preset (the dropdown empties), a preset chosen
            # replaces the path (the box empties).
            def custom_changed(path: str, *values: Any) -> tuple[Any, str]:
                if not (path or "").strip():
                    return gr.skip(), self.preview(*values)
                return gr.update(value=None), self.preview(None, path, *values[2:])

            for trigger in (custom.submit, custom.blur):
                trigger(custom_changed, [custom, *settings_inputs], [preset, plan_view], api_visibility="private",
                        show_progress="hidden")

            def preset_changed(name: str | None, *values: Any) -> tuple[Any, Any, str]:
                if name not in self.presets:
                    return gr.skip(), gr.skip(), self.preview(name, *values)
                label = _quant_label(self.presets[name].quantization)
                values = list(values)
                values[0], values[1] = "", label  # the path box empties; quant follows the preset's default
                return "", label, self.preview(name, *values)

            preset.input(preset_changed, settings_inputs, [custom, quant, plan_view], api_visibility="private",
                         show_progress="hidden")
            synced = [preset, custom, quant, disk, cpu, *gpu_sliders]

            def sync_with_loaded(*values: Any) -> list[Any]:
                """A new page shows the loaded model's settings, not the config defaults."""
                ui = dict(zip(SETTING_NAMES, values))
                gpus = list(values[len(SETTING_NAMES):])
                loaded = self.manager.settings
                if loaded is not None:
                    if loaded.model in self.presets:
                        ui["preset"], ui["custom"] = loaded.model, ""
                    else:
                        ui["preset"], ui["custom"] = None, loaded.model
                    ui["quant"] = _quant_label(self.manager.current.quant.mode if self.manager.current else "none")
                    ui["disk"] = loaded.disk
                    if loaded.cpu_gib is not None:
                        ui["cpu"] = round(float(loaded.cpu_gib), 2)
                    for i, gib in enumerate(loaded.gpu_gib[: len(gpus)]):
                        gpus[i] = round(float(gib), 2)
                all_values = [*ui.values(), *gpus]
                return [ui["preset"], ui["custom"], ui["quant"], ui["disk"], ui["cpu"], *gpus, self.preview(*all_values)]

            demo.load(sync_with_loaded, settings_inputs, [*synced, plan_view], api_visibility="private",
                      show_progress="hidden")
            demo.load(lambda current: (self.status_markdown(), self.max_new_limit(current)), max_new, [status, max_new],
                      api_visibility="private", show_progress="hidden")

            gr.on([what_if_button.click, what_if_gib.submit], self.what_if_preview, [what_if_gib, *settings_inputs],
                  plan_view, api_visibility="private", show_progress="hidden")
            apply.click(self.apply_from_page, [operator, *settings_inputs], [load_box, status, plan_view],
                        api_visibility="private", concurrency_limit=1, concurrency_id="reload",
                        show_progress_on=load_box).then(self.max_new_limit, max_new, max_new, api_visibility="private",
                                                        show_progress="hidden")
            remote_list.click(self.remote_models, [operator, remote_url, remote_key], remote_model,
                              api_visibility="private", show_progress_on=remote_model)
            remote_connect.click(self.connect_remote, [operator, remote_url, remote_key, remote_model],
                                 [load_box, status, plan_view], api_visibility="private", concurrency_limit=1,
                                 concurrency_id="reload", show_progress_on=load_box)
            # The API's /load_model: the same reload, raising errors for API clients (a button never shown).
            api_status, api_plan = gr.Markdown(visible=False), gr.HTML(visible=False)
            gr.Button(visible=False).click(self.apply_settings, [operator, *settings_inputs], [api_status, api_plan],
                                           api_name="load_model", concurrency_limit=1, concurrency_id="reload",
                                           api_visibility="undocumented")  # callable, but not an MCP tool
            gr.api(self.preview_api, api_name="plan")
            gr.api(self.status_api, api_name="status")

            gr.on([message.submit, send.click], self.send_message, [message, chatbot, system, *gen_inputs], [message, chatbot],
                  api_visibility="private", show_progress="hidden", trigger_mode="always_last")
            stop_button.click(self.stop, None, None, api_visibility="private", queue=False)
            clear.click(self.clear_chat, None, chatbot, api_visibility="private", queue=False)
            chatbot.retry(drop_last_reply, chatbot, chatbot, api_visibility="private").then(
                self.respond, [chatbot, system, *gen_inputs], chatbot, api_visibility="private", show_progress="hidden")
            chatbot.undo(undo, chatbot, [chatbot, message], api_visibility="private")
            chatbot.clear(self.clear_chat, None, chatbot, api_visibility="private", queue=False)
            # Every page's status follows reloads made elsewhere and how many chats are being answered.
            gr.Timer(2.0).tick(self.status_markdown, None, status, api_visibility="private", show_progress="hidden",
                               queue=False)
            gr.api(self.api_chat, api_name="chat")
            demo.unload(self.forget_session)
        return demo

    def status_api(self) -> dict:
        """What model is loaded, its placement and memory, and how many chats are being answered (JSON)."""
        info = self.manager.describe()
        if self.access.shared:
            info = {key: self.shown(value) if isinstance(value, str) else value for key, value in info.items()}
        return info

    def preview_api(self, model: str, cpu_gib: float, disk: bool = True, quantization: str = "none",
                    gpu_gib: str = "") -> dict:
        """Plan where every layer of a model would be placed (GPU, CPU RAM, disk) under memory budgets,
        without loading it; returns the plan as JSON.

        Args:
            model: a preset name, a local checkpoint folder or a Hugging Face hub ID.
            cpu_gib: CPU RAM budget in GiB.
            disk: whether layers may be offloaded to disk.
            quantization: "none", "int8", "nf4" or "fp4".
            gpu_gib: comma-separated GPU budgets in GiB, one per GPU (empty: no GPU). One budget larger
                than this machine's GPU (or on a machine without one) plans for a GPU of that size.
        """
        try:
            gpus = tuple(float(x) for x in gpu_gib.split(",") if x.strip()) if gpu_gib else ()
            settings = Settings(model=model, gpu_gib=gpus, cpu_gib=cpu_gib, disk=disk, offload_dir=self.offload_root,
                                quant=QuantSettings(mode=quantization))
            what_if = len(gpus) == 1 and beyond_hardware(self.hardware, gpus)
            prepared = self.manager.prepare(settings, what_if_gpu_gib=gpus[0] if what_if else None)
            data = prepared.plan.to_dict()
            data["estimate"] = prepared.estimate.to_dict() if prepared.estimate else None
            data["what_if"] = what_if
            return data
        except (PipelineError, ValueError) as exc:
            raise gr.Error(self.shown(exc), print_exception=False) from None


def create_app(config: dict[str, Any] | None = None, manager: ModelManager | None = None,
               access: Access | None = None) -> gr.Blocks:
    """The app's Blocks around `manager` (a new, empty one by default) with `config` (configs/app.yaml)."""
    config = load_app_config() if config is None else config
    return ChatApp(config, manager or ModelManager(detect_hardware(offload_root(None, config))), access).build_app()


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port; accepted: an integer from 1 to 65535")
    return port


def parse_args(argv: list[str] | None = None, config: dict[str, Any] | None = None) -> argparse.Namespace:
    config = load_app_config() if config is None else config
    parser = argparse.ArgumentParser(description="Offload Chat: a browser chat for models bigger than your GPU.")
    parser.add_argument("--model", default=default_model(config),
                        help="preset, hub ID or local path loaded at start (default: %(default)s)")
    on_space = bool(os.environ.get("SPACE_ID"))
    parser.add_argument("--draft", default=None, metavar="PRESET_OR_PATH",
                        help="attach a draft model (a smaller model with the same tokenizer) to --model, for the "
                             "'draft model' speculation; '' detaches the preset's own draft")
    parser.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1")
    parser.add_argument("--port", type=_port, default=os.environ.get("PORT", "7860"), help="1-65535 (default: 7860)")
    parser.add_argument("--share", action="store_true", help="create a public share link")
    parser.add_argument("--auth", default=os.environ.get("APP_AUTH"),
                        help="USER:PASS required to open the app (or set APP_AUTH)")
    parser.add_argument("--gpu-memory", nargs="+", type=float, metavar="GIB", default=None,
                        help="starting budget per GPU (default: 90%% of each GPU's free memory)")
    parser.add_argument("--cpu-memory", type=float, metavar="GIB", default=None,
                        help="starting CPU RAM budget (default: 70%% of available)")
    parser.add_argument("--no-disk", action="store_true", help="start with disk offload off")
    parser.add_argument("--shared", action="store_true",
                        help="treat the app as shared with strangers (implied by --share and on a Space)")
    parser.add_argument("--admin", default=os.environ.get("APP_ADMIN"),
                        help="USER:PASS of the operator, the only one who may change the model in a shared app "
                             "(or set APP_ADMIN)")
    parser.add_argument("--require-auth", action="store_true", help="refuse to share without --auth")
    parser.add_argument("--api-key", default=None,
                        help=f"key the OpenAI-compatible API at /v1 requires (or set {API_KEY_ENV}); a shared app or "
                             "one with --auth serves that API only with a key")
    parser.add_argument("--remote", default=None, metavar="URL",
                        help="answer from an OpenAI-compatible endpoint (vLLM, SGLang, another Offload Chat) instead "
                             "of a local model")
    parser.add_argument("--remote-model", default=None, metavar="NAME", help="the endpoint's model (with --remote)")
    parser.add_argument("--remote-api-key", default=os.environ.get("REMOTE_API_KEY"),
                        help="the endpoint's API key (with --remote; or set REMOTE_API_KEY)")
    parser.add_argument("--mcp", action="store_true",
                        help="also serve the chat, plan and status functions as MCP tools at /gradio_api/mcp/")
    parser.add_argument("--allow-any-path", action="store_true",
                        help="when shared, allow local model paths outside configs/app.yaml's model_roots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_app_config()
    args = parse_args(argv, config)
    try:
        auth = parse_credentials(args.auth, "--auth")
        admin = parse_credentials(args.admin, "--admin")
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    shared = args.share or args.shared or bool(os.environ.get("SPACE_ID"))
    access = Access(shared=shared, admin=admin)
    if shared and auth is None:
        if args.require_auth:
            sys.exit("error: --require-auth: give --auth USER:PASS (or set APP_AUTH) to share this app")
        logger.warning("shared without --auth: anyone with the link can use this app and your hardware. "
                       "Add --auth USER:PASS (or set APP_AUTH) to require a login.")
    if shared:
        logger.info("shared app: %s", access.describe())
    root = str(offload_root(None, config))
    manager = ModelManager(detect_hardware(root))
    chat_app = ChatApp(config, manager, access)
    if shared and not args.allow_any_path:
        manager.allowed_roots = chat_app.model_roots  # strangers may not load arbitrary folders of this machine
        logger.info("local model paths limited to %s", ", ".join(str(r) for r in chat_app.model_roots))
    if args.remote:
        try:
            manager.connect_remote(args.remote, args.remote_model or "", args.remote_api_key)
        except PipelineError as exc:
            logger.error("could not connect to %s: %s (the app starts without a model)", args.remote, exc)
    else:
        defaults = chat_app.defaults
        try:
            gpu = args.gpu_memory if args.gpu_memory is not None else [b / GiB for b in defaults.gpu]
            cpu = args.cpu_memory if args.cpu_memory is not None else defaults.cpu / GiB
            disk = bool(config.get("disk", True)) and not args.no_disk
            settings = Settings(model=args.model, gpu_gib=tuple(gpu), cpu_gib=cpu, disk=disk, offload_dir=root,
                                disk_cap_gib=chat_app.disk_cap_gib, quant_from_preset=True, draft=args.draft)
            manager.load(settings)
            logger.info("loaded %s: %s", args.model, manager.current.plan.summary)
        except PipelineError as exc:
            logger.error("could not load %s: %s (the app starts without a model)", args.model, exc)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    refusal = None
    if api_key is None and (shared or auth is not None):
        refusal = ("this app is shared (or has a login), so its OpenAI-compatible API needs a key: its operator "
                   f"starts it with --api-key KEY (or sets {API_KEY_ENV})")
        logger.info("OpenAI-compatible API off: %s", refusal)
    else:
        logger.info("OpenAI-compatible API on http://%s:%d/v1 (%s)", args.host, args.port,
                    "key required" if api_key else "no key: local use only")
    demo = chat_app.build_app()
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    # The API's routes go to Gradio's own FastAPI app (the same port), ahead of Gradio's routes.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=access.gradio_auth(auth),
                show_error=True, max_file_size=MAX_UPLOAD, mcp_server=args.mcp,
                app_kwargs={"routes": openai_routes(manager, ApiAccess(api_key, refusal))})


if __name__ == "__main__":
    main()
