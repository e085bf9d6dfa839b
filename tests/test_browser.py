"""A real browser (Debian's headless Chromium, driven by Playwright) against the launched app."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app_server import running_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def _browser_available() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists()


# CI installs Chromium and Playwright (.ci/run), so there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(not _browser_available() and not os.environ.get("CI"),
                                reason="needs Debian's chromium and playwright (see .ci/run)")

# Records each new length of the first bot message's text, to see the reply grow in the page.
WATCH_CHAT = """() => {
  window.__lengths = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const length = bots.length ? bots[0].innerText.length : 0;
    const seen = window.__lengths;
    if (length && (!seen.length || seen[seen.length - 1] !== length)) seen.push(length);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    from playwright.sync_api import sync_playwright

    log = tmp_path_factory.mktemp("browser") / "app.log"
    with running_app(log=log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1050})
        page.goto(url)
        page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
        yield page
        browser.close()


def test_send_a_message_and_see_the_reply_grow(page, tmp_path: Path) -> None:
    page.evaluate(WATCH_CHAT)
    page.fill("#message textarea", "And God said, Let there be light")
    page.click("#send")
    # The stats line appears under the reply once it is complete.
    page.wait_for_selector("#chatbot >> text=tokens/s", timeout=60_000)
    lengths = page.evaluate("window.__lengths")
    assert len(lengths) >= 4 and lengths == sorted(lengths), f"the reply did not grow in steps: {lengths}"
    text = page.inner_text("#chatbot")
    assert "And God said, Let there be light" in text
    assert "Traceback" not in text
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)


def test_moving_the_cpu_slider_changes_the_plan_picture(page, tmp_path: Path) -> None:
    before = page.inner_text("#plan-preview .plan-summary")
    assert before.startswith("CPU:") and "disk" not in before
    slider = page.locator("#cpu-slider input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + 1, box["y"] + box["height"] / 2)  # drag to ~0 GiB: everything to disk
    page.wait_for_function(
        "() => document.querySelector('#plan-preview .plan-summary')?.innerText.includes('disk')", timeout=30_000)
    assert page.locator('#plan-preview .plan-legend[data-device="disk"]').count() == 1
    assert page.locator('#plan-preview .plan-seg[data-device="disk"]').count() >= 6  # one per layer at least
    page.screenshot(path=str(tmp_path / "plan.png"), full_page=True)


def test_empty_message_shows_a_warning_not_an_error(page) -> None:
    messages = page.locator('#chatbot [data-testid="user"]').count()
    page.fill("#message textarea", "   ")
    page.click("#send")
    page.wait_for_selector("text=Type a message first.", timeout=10_000)
    stats = page.locator("#chatbot >> text=tokens/s").count()
    page.fill("#message textarea", "And God said")  # then a real message: exactly one more in the chat
    page.click("#send")
    page.wait_for_function(f"() => [...document.querySelectorAll('#chatbot *')].filter(e => e.children.length == 0 "
                           f"&& e.innerText && e.innerText.includes('tokens/s')).length > {stats}", timeout=60_000)
    assert page.locator('#chatbot [data-testid="user"]').count() == messages + 1


def test_html_in_a_message_is_shown_as_text_never_run(page) -> None:
    attack = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script><b>bold?</b>'
    stats = page.locator("#chatbot >> text=tokens/s").count()  # the page is shared with the tests above
    page.fill("#message textarea", attack)
    page.click("#send")
    page.wait_for_function("() => [...document.querySelectorAll('#chatbot [data-testid=\"user\"]')]"
                           ".some(e => e.innerText.includes('bold?'))", timeout=60_000)  # this message is shown
    page.wait_for_function(f"() => [...document.querySelectorAll('#chatbot *')].filter(e => e.children.length == 0 "
                           f"&& e.innerText && e.innerText.includes('tokens/s')).length > {stats}",
                           timeout=60_000)  # and its reply is complete
    assert page.evaluate("window.__xss") is None
    user_messages = page.locator('#chatbot [data-testid="user"]')
    shown = user_messages.nth(user_messages.count() - 1).inner_text()
    assert attack in shown  # the markup is visible as typed
    assert page.locator("#chatbot img[src='x'], #chatbot b:text('bold?')").count() == 0
