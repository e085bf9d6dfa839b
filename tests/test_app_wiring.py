"""app.py's event functions called directly: errors become visible chat notes, never tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

import app
from pipeline.presets import load_app_config
from pipeline.session import ModelManager, Settings

GEN = (24, 0, 0.9, 50, 1.0, -1)  # max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed


CHAT = app.ChatApp(load_app_config(), ModelManager())  # this module's own app state, built by the factory's class


@pytest.fixture(scope="module", autouse=True)
def loaded_demo(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    CHAT.manager.load(Settings(model="demo", cpu_gib=1, disk=True, offload_dir=str(tmp_path_factory.mktemp("off"))))
    yield
    CHAT.manager.current.unload()


def run(history: list[dict], system: str = "", gen: tuple = GEN) -> list[list[dict]]:
    return [list(h) for h in CHAT.respond(history, system, *gen)]


def test_reply_streams_then_stats_follow_it() -> None:
    updates = run([{"role": "user", "content": "And God said"}])
    assert len(updates) >= 3
    final = updates[-1]
    assert [m["role"] for m in final] == ["user", "assistant", "assistant"]
    assert final[1]["content"] and "metadata" not in final[1]
    assert "tokens/s" in final[2]["metadata"]["title"]  # the stats line under the reply


@pytest.mark.parametrize(
    ("history", "gen", "message"),
    [
        ([{"role": "user", "content": "earth " * 2000}], GEN, "the message is too long"),
        ([{"role": "user", "content": "hi"}], (24, -1, 0.9, 50, 1.0, -1), "temperature=-1"),
        ([{"role": "user", "content": "hi"}], (0, 0, 0.9, 50, 1.0, -1), "max_new_tokens=0"),
    ],
)
def test_bad_chat_input_becomes_an_error_note(history, gen, message) -> None:
    final = run(history, gen=gen)[-1]
    note = final[-1]
    assert note["content"].startswith(app.ERROR_MARK) and message in note["content"]  # shown open, not folded
    assert "metadata" not in note
    assert "Traceback" not in note["content"]
    assert final[:-1] == history  # nothing else was added


def test_the_model_sees_no_stats_or_error_notes() -> None:
    history = run([{"role": "user", "content": "And God said"}])[-1]
    history.append({"role": "user", "content": [{"type": "text", "text": "Amen"}]})  # Gradio 6 content parts
    messages = app.model_messages(history, "Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Amen"


class Page:
    """What Gradio passes as `gr.Request`: the page's session hash."""

    def __init__(self, session_hash: str) -> None:
        self.session_hash = session_hash


def test_stop_cancels_that_pages_reply_only() -> None:
    mine, other = Page("page-a"), Page("page-b")
    stream = CHAT.respond([{"role": "user", "content": "And God said"}], "", 400, 0, 0.9, 50, 1.0, -1, request=mine)
    neighbour = CHAT.respond([{"role": "user", "content": "In the beginning"}], "", 60, 0, 0.9, 50, 1.0, -1, request=other)
    next(stream), next(neighbour)
    CHAT.stop(mine)
    assert "stopped" in list(stream)[-1][-1]["metadata"]["title"]
    final = list(neighbour)[-1]
    assert "stopped" not in final[-1]["metadata"]["title"] and "finished: " in final[-1]["content"]


def test_gradio_fills_the_request_of_every_chat_event() -> None:
    """Gradio fills a gr.Request parameter only when no *args comes before it."""
    import inspect

    for function in (CHAT.respond, CHAT.send_message, CHAT.stop, CHAT.clear_chat, CHAT.forget_session):
        kinds = [p.kind for p in inspect.signature(function).parameters.values()]
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, function.__name__
        assert "request" in inspect.signature(function).parameters, function.__name__


def test_clear_stops_the_reply_and_it_never_writes_into_the_cleared_chat() -> None:
    page = Page("page-c")
    stream = CHAT.respond([{"role": "user", "content": "And God said"}], "", 400, 0, 0.9, 50, 1.0, -1, request=page)
    next(stream)
    assert CHAT.clear_chat(page) == []
    assert list(stream) == [[]]  # only the empty chat: the stream would have put the conversation back


def test_a_message_sent_joins_the_chat_and_is_answered() -> None:
    updates = list(CHAT.send_message("And God said", [], "", *GEN, request=Page("page-d")))
    box, history = updates[0]
    assert box == "" and history == [{"role": "user", "content": "And God said"}]
    assert "tokens/s" in updates[-1][1][-1]["metadata"]["title"]


def test_retry_and_undo() -> None:
    history = run([{"role": "user", "content": "And God said"}])[-1]
    assert app.drop_last_reply(history) == history[:1]
    assert app.undo(history) == ([], "And God said")


def test_empty_message_is_refused_with_a_warning() -> None:
    import gradio as gr

    with pytest.warns(UserWarning, match="Type a message first"):
        message, history = app.add_user_message("   ", [])
    assert isinstance(message, type(gr.skip())) and isinstance(history, type(gr.skip()))


def test_preview_shows_does_not_fit_instead_of_raising() -> None:
    values = ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, False, "", 0.001]
    html = CHAT.preview(*values)
    assert 'data-fits="false"' in html and "does not fit" in html
    values[8] = True
    assert 'data-device="disk"' in CHAT.preview(*values)


def test_preview_escapes_html_in_model_names() -> None:
    values = ["demo", "<script>alert(1)</script>", "none", 6.0, "lm_head", "nf4", "auto", True, True, "", 1.0]
    html = CHAT.preview(*values)
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    "text",
    ["<script>alert(1)</script> & <b>bold</b>", "a &lt; b and `x < y` and\n```\nif a < b: pass\n```\n", "&amp;x", "``` <i>open"],
)
def test_chat_display_escapes_html_outside_code_and_round_trips(text: str) -> None:
    from pipeline.preview import chat_display, chat_raw

    shown = chat_display(text)
    outside_code = shown.split("`")[0]
    assert "<" not in outside_code and ">" not in outside_code
    assert chat_raw(shown) == text


def test_user_html_is_shown_as_text_and_the_model_sees_it_unchanged() -> None:
    _, history = app.add_user_message("<img src=x onerror=alert(1)> hi", [])
    assert history[0]["content"] == "&lt;img src=x onerror=alert(1)&gt; hi"
    assert app.model_messages(history, "")[0]["content"] == "<img src=x onerror=alert(1)> hi"
    assert app.undo(history + [{"role": "assistant", "content": "x"}])[1] == "<img src=x onerror=alert(1)> hi"


def test_shared_app_writes_offload_files_only_under_its_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipeline.errors import PipelineError

    values = ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, str(tmp_path), 1.0]
    assert CHAT.make_settings(*values).offload_dir == str(tmp_path)  # a local app may use any folder
    monkeypatch.setattr(CHAT.manager, "allowed_roots", CHAT.model_roots)  # as with --share or on a Space
    with pytest.raises(PipelineError, match="outside .* the only place this shared app writes offload files"):
        CHAT.make_settings(*values)
    values[9] = str(Path(CHAT.offload_root) / "sub")
    assert CHAT.make_settings(*values).offload_dir.startswith(CHAT.offload_root)


def test_closing_a_page_stops_its_reply_and_forgets_it() -> None:
    page = Page("page-1")
    stream = CHAT.respond([{"role": "user", "content": "And God said"}], "", 400, 0, 0.9, 50, 1.0, -1, request=page)
    next(stream)
    CHAT.forget_session(page)
    assert list(stream) == [[]] and "page-1" not in CHAT._sessions
    assert CHAT.manager.current.server.running == 0 or _eventually_idle()


def _eventually_idle() -> bool:
    import time

    deadline = time.monotonic() + 10
    while CHAT.manager.current.server.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return CHAT.manager.current.server.running == 0


def test_a_shared_app_started_elsewhere_keeps_local_paths_inside_its_model_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model roots are the repository's folders wherever the app was started from: a relative path that
    exists in the working directory is refused, the repository's own models stay allowed."""
    from pipeline.errors import ModelSourceError
    from pipeline.presets import REPO_ROOT, resolve_model

    (tmp_path / "models" / "elsewhere").mkdir(parents=True)
    (tmp_path / "models" / "elsewhere" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    shared = app.ChatApp({"model_roots": ["models"]}, ModelManager())
    assert shared.model_roots == [REPO_ROOT / "models"]
    for spec in ("models/elsewhere", "./models/elsewhere", str(tmp_path / "models" / "elsewhere")):
        with pytest.raises(ModelSourceError, match="outside the folders this shared app may load from"):
            resolve_model(spec, allowed_roots=shared.model_roots)
    assert resolve_model(str(REPO_ROOT / "models" / "demo"), allowed_roots=shared.model_roots).name == "demo"


def test_the_speculation_control_reaches_the_worker_and_the_stats_show_tokens_per_step() -> None:
    verse = "And God said, Let there be light: and there was light. "
    history = [{"role": "user", "content": verse * 3 + "And God said,"}]
    gen = (48, 0, 0.9, 50, 1.0, -1)
    on = run(history, gen=(*gen, "lookup"))[-1]
    off = run(history, gen=(*gen, "off"))[-1]
    assert on[1]["content"] == off[1]["content"]  # the same greedy reply
    steps = {name: float(r[-1]["metadata"]["title"].split(" tokens/step")[0].rsplit("· ", 1)[-1])
             for name, r in (("on", on), ("off", off))}
    assert steps["off"] == 1.0 and steps["on"] > 1.0, steps


def test_draft_model_speculation_without_a_draft_is_a_clear_note_and_the_app_goes_on() -> None:
    history = [{"role": "user", "content": "And God said"}]
    refused = run(history, gen=(*GEN, "draft"))[-1]
    note = refused[-1]["content"]
    assert note.startswith(app.ERROR_MARK) and "needs a draft model" in note, note
    assert "--draft" in note and "Traceback" not in note
    answered = run(history, gen=(*GEN, "lookup"))[-1]
    assert "tokens/s" in answered[-1]["metadata"]["title"]  # the loaded model still answers


def test_the_draft_model_choice_reaches_the_worker(tmp_path: Path) -> None:
    """A model loaded with a draft (the demo drafting for itself): "draft model" speculates (several
    tokens per step, the same greedy reply), "off" takes one token per step; the model panel keeps the
    draft when the same model is applied again."""
    manager = ModelManager()
    chat = app.ChatApp(load_app_config(), manager)
    manager.load(Settings(model="demo", cpu_gib=1, disk=True, offload_dir=str(tmp_path), draft="demo"))
    try:
        verse = "And God said, Let there be light: and there was light. "
        history = [{"role": "user", "content": verse * 3 + "And God said,"}]
        gen = (48, 0, 0.9, 50, 1.0, -1)
        replies = {mode: list(chat.respond(history, "", *gen, mode))[-1] for mode in ("draft", "lookup", "off")}
        assert replies["draft"][1]["content"] == replies["off"][1]["content"] == replies["lookup"][1]["content"]
        steps = {mode: float(r[-1]["metadata"]["title"].split(" tokens/step")[0].rsplit("· ", 1)[-1])
                 for mode, r in replies.items()}
        # An identical draft is always right; prompt lookup only where the reply repeats the conversation.
        assert steps["off"] == 1.0 and steps["draft"] > steps["lookup"] + 1, steps
        assert "draft Demo" in manager.describe()["placement"]
        values = ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, str(tmp_path), 1.0]
        assert chat.make_settings(*values).draft == "demo"
        assert chat.make_settings(*(["smollm2-135m-instruct"] + values[1:])).draft is None
    finally:
        manager.current.unload()
