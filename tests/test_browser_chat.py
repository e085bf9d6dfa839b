"""The chat controls in a real browser while a reply is still streaming: Stop, a message sent during
a reply, Clear during a reply, Enter and Shift+Enter, closing the page, and the status line.

The app serves a random model that never emits end-of-sequence, so a reply of 2048 tokens streams
for many seconds: every button below is pressed while the reply is still arriving.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app_server import running_app
from test_browser import ARGS, CHROMIUM, pytestmark  # noqa: F401 - the same skip rule as the other browser test

BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, endless_model: Path):
    from playwright.sync_api import sync_playwright

    log = tmp_path_factory.mktemp("browser-chat") / "app.log"
    with running_app("--model", str(endless_model), log=log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser, url
        browser.close()


@pytest.fixture
def page(browser):
    browser, url = browser
    page = browser.new_page(viewport={"width": 1400, "height": 1050})
    page.goto(url)
    page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
    long_replies(page)
    yield page
    page.close()


def open_generation(page) -> None:
    """Open the "Generation" accordion; a click that lands while the page still hydrates is lost, so
    click again until its sliders are there."""
    for _ in range(5):
        page.get_by_text("Generation", exact=True).click()
        try:
            page.wait_for_selector("#max-new input[type=range]", timeout=3_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try the click again
            continue
    raise AssertionError("the Generation accordion never opened")


def long_replies(page) -> None:
    """Max new tokens at its maximum (half the model's context of 4096), set with the End key."""
    open_generation(page)
    # The page's load event bounds the slider by the model's context: wait for it before moving it.
    page.wait_for_function("() => document.querySelector('#max-new input[type=range]')?.max == '2048'",
                           timeout=30_000)
    page.locator("#max-new input[type=range]").press("End")
    page.wait_for_function("() => document.querySelector('#max-new input[type=number]').value == '2048'",
                           timeout=30_000)


def bot_length(page, index: int = -1) -> int:
    return page.evaluate(f"""() => {{
        const bots = [...document.querySelectorAll('{BOT}')];
        const bot = bots.at({index});
        return bot ? bot.innerText.length : 0;
    }}""")


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def wait_streaming(page, at_least: int = 20) -> None:
    """The first reply has started and is still growing."""
    page.wait_for_function(f"() => document.querySelector('{BOT}')?.innerText.length >= {at_least}", timeout=60_000)


def test_enter_sends_and_shift_enter_makes_a_new_line(page) -> None:
    box = page.locator("#message textarea")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator(USER).count() == 0  # nothing was sent
    box.press("Enter")
    page.wait_for_selector(USER, timeout=30_000)
    assert "first line" in page.locator(USER).first.inner_text()
    page.click("#stop")
    page.wait_for_selector("#chatbot >> text=stopped", timeout=30_000)


def test_stop_ends_the_reply_and_marks_it_stopped(page) -> None:
    send(page, "Hello and the earth")
    wait_streaming(page)
    page.click("#stop")
    page.wait_for_selector("#chatbot >> text=stopped", timeout=15_000)
    length = bot_length(page, 0)
    page.wait_for_selector("#status >> text=serving: idle", timeout=15_000)  # the worker has let the reply go
    assert bot_length(page, 0) == length, "the reply kept growing after Stop"
    assert length < 2048 * 3  # far from a complete 2048-token reply


def test_a_message_sent_during_a_reply_is_answered_after_it(page) -> None:
    send(page, "In the beginning")
    wait_streaming(page)
    send(page, "The quick brown fox")  # while the first reply streams
    grown = bot_length(page, 0) + 40
    page.wait_for_function(f"() => document.querySelector('{BOT}').innerText.length >= {grown}", timeout=30_000)
    assert page.locator(USER).count() == 1  # it waits while the first reply goes on ...
    assert page.locator("#message textarea").input_value() == "The quick brown fox"  # ... and is not lost
    page.click("#stop")  # end the first reply: the waiting message goes out
    page.wait_for_function(f"() => document.querySelectorAll('{USER}').length == 2", timeout=30_000)
    users = page.locator(USER)
    assert "In the beginning" in users.nth(0).inner_text() and "The quick brown fox" in users.nth(1).inner_text()
    page.wait_for_function(f"() => document.querySelectorAll('{BOT}').length >= 3", timeout=30_000)
    wait_streaming(page, 5)
    page.click("#stop")
    page.wait_for_function("() => document.querySelectorAll('#chatbot .message-wrap *').length > 0 && "
                           "[...document.querySelectorAll('#chatbot')].some(c => "
                           "(c.innerText.match(/stopped/g) || []).length >= 2)", timeout=30_000)
    assert page.locator("#message textarea").input_value() == ""


def test_clear_during_a_reply_empties_the_chat_for_good(page) -> None:
    send(page, "Memory budgets")
    wait_streaming(page)
    page.click("#clear")
    page.wait_for_function(f"() => document.querySelectorAll('{USER}').length == 0", timeout=10_000)
    # From now on, record whether the cleared conversation ever comes back (a late update of its stream).
    page.evaluate("""() => { window.restored = false;
        new MutationObserver(() => { if (document.querySelector('#chatbot').innerText.includes('Memory budgets'))
            window.restored = true; }).observe(document.querySelector('#chatbot'),
            {subtree: true, childList: true, characterData: true}); }""")
    page.wait_for_selector("#status >> text=serving: idle", timeout=15_000)  # the stream has ended
    send(page, "darkness")  # and the page still chats; the updates of this reply come after every update
    wait_streaming(page, 5)  # of the cleared one (one event stream per page), so by now any came back
    page.click("#stop")
    page.wait_for_selector("#chatbot >> text=stopped", timeout=15_000)
    assert page.locator(USER).count() == 1 and "darkness" in page.locator(USER).inner_text()
    assert page.evaluate("() => window.restored") is False


def test_status_counts_chats_and_closing_a_page_cancels_its_reply(browser, page) -> None:
    browser_, url = browser
    other = browser_.new_page(viewport={"width": 1400, "height": 1050})
    other.goto(url)
    other.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
    long_replies(other)
    send(other, "God and the earth")
    wait_streaming(other)
    page.wait_for_selector("#status >> text=1 chat being answered together", timeout=15_000)
    other.close()  # the closed page's reply is cancelled: the status of this page goes back to idle
    page.wait_for_selector("#status >> text=serving: idle", timeout=15_000)
