"""The Speculation control in a real browser: the app started with a draft model (`--draft`, the demo
drafting for itself), each choice clicked, the stats line under each reply read back. Fails when the
control does not reach the worker: off must take 1.0 tokens per step, draft model many more than prompt
lookup on a prompt that does not repeat."""

from __future__ import annotations

import re

import pytest

from app_server import running_app
from test_browser import ARGS, CHROMIUM, pytestmark  # noqa: F401 - the same skip rule as the other browser tests
from test_browser_chat import open_generation

STATS = '#chatbot >> text=/tokens\\/step/'


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    log = tmp_path_factory.mktemp("browser-speculation") / "app.log"
    with running_app("--model", "demo", "--draft", "demo", log=log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1050})
        page.goto(url)
        page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
        open_generation(page)
        yield page
        browser.close()


def tokens_per_step(page, choice: str, answered: int) -> float:
    """Choose `choice` in the Speculation radio, send a greedy message, read the reply's tokens/step."""
    page.locator("#speculate").get_by_text(choice, exact=True).click()
    page.locator("#message textarea").fill("In the beginning")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#chatbot *')].filter(e => e.children.length === 0 && "
        f"/tokens\\/step/.test(e.textContent)).length > {answered}", timeout=60_000)
    texts = page.evaluate("() => [...document.querySelectorAll('#chatbot *')].filter(e => e.children.length === 0 && "
                          "/tokens\\/step/.test(e.textContent)).map(e => e.textContent)")
    return float(re.search(r"([\d.]+) tokens/step", texts[-1]).group(1))


def test_each_speculation_choice_reaches_the_worker(page) -> None:
    assert page.locator("#status").get_by_text(re.compile("draft Demo")).count() >= 1  # the draft in the status
    temperature = page.get_by_label("Temperature (0 = greedy)", exact=False).first
    temperature.fill("0")
    temperature.press("Enter")
    steps = {}
    for i, (name, choice) in enumerate([("off", "off"), ("lookup", "prompt lookup"), ("draft", "draft model")]):
        steps[name] = tokens_per_step(page, choice, i)
    assert steps["off"] == 1.0 and steps["draft"] > steps["lookup"] + 1, steps
