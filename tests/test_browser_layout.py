"""The page's layout and live controls in a real browser: what is visible without scrolling on a
desktop and a phone, budgets that re-plan as they are typed or moved with the keyboard, one model
choice, status that follows a reload made in another page, Max new tokens bounded by the context."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from app_server import REPO, running_app
from test_browser import ARGS, CHROMIUM, pytestmark  # noqa: F401 - the same skip rule as the other browser tests
from test_browser_chat import open_generation


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    log = tmp_path_factory.mktemp("layout") / "app.log"
    with running_app(log=log) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def open_page(browser, url: str, width: int = 1440, height: int = 900, **kwargs):
    page = browser.new_page(viewport={"width": width, "height": height}, **kwargs)
    page.goto(url)
    page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
    page.wait_for_selector("#status >> text=Placement", timeout=30_000)
    return page


def summary(page) -> str:
    return page.inner_text("#plan-preview .plan-summary")


def test_status_is_visible_without_scrolling_on_a_desktop(browser, app_url: str, tmp_path: Path) -> None:
    page = open_page(browser, app_url)
    box = page.locator("#status").bounding_box()
    assert box["y"] + box["height"] <= 900, f"the status ends at {box['y'] + box['height']:.0f} px"
    text = page.inner_text("#status")
    assert "Placement" in text and "In use" in text and "process RSS" in text
    page.locator("#message textarea").fill("And God said, Let there be light")
    page.locator("#message textarea").press("Enter")
    page.wait_for_selector("#chatbot >> text=tokens/s", timeout=60_000)
    page.screenshot(path=str(tmp_path / "desktop.png"))
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "desktop.png", REPO / "docs" / "screenshot.png")
    page.close()


def test_on_a_phone_the_chat_comes_first(browser, app_url: str, tmp_path: Path) -> None:
    page = open_page(browser, app_url, 390, 844, is_mobile=True, has_touch=True, device_scale_factor=2)
    chat, panel = page.locator("#chatbot").bounding_box(), page.locator("#preset").bounding_box()
    assert chat["y"] < panel["y"], "the model panel comes before the chat"
    assert chat["y"] < 844 and page.locator("#message textarea").bounding_box()["y"] < 844 * 1.2
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "phone.png"))
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "phone.png", REPO / "docs" / "screenshot-phone.png")
    page.close()


def test_a_typed_budget_and_slider_keys_re_plan(browser, app_url: str) -> None:
    page = open_page(browser, app_url)
    assert "disk" not in summary(page)
    box = page.locator("#cpu-slider input[type=number]")
    box.fill("0.005")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#plan-preview .plan-summary').innerText.includes('disk')",
                           timeout=15_000)
    box.fill("4")
    box.press("Enter")
    page.wait_for_function("() => !document.querySelector('#plan-preview .plan-summary').innerText.includes('disk')",
                           timeout=15_000)
    page.locator("#cpu-slider input[type=range]").press("Home")  # keyboard: to 0 GiB, everything on disk
    page.wait_for_function("() => document.querySelector('#plan-preview .plan-summary').innerText.includes('disk')",
                           timeout=15_000)
    page.close()


def test_one_model_choice(browser, app_url: str, demo_dir: Path) -> None:
    page = open_page(browser, app_url)
    path = page.locator("#custom-model textarea")
    path.fill(str(demo_dir))
    path.press("Enter")
    page.wait_for_function("() => !document.querySelector('#preset input').value", timeout=10_000)
    page.locator("#preset input").click()
    page.get_by_role("option").first.click()
    page.wait_for_function("() => document.querySelector('#custom-model textarea').value === ''", timeout=10_000)
    assert page.locator("#preset input").input_value()
    page.close()


def test_status_follows_a_reload_made_in_another_page(browser, app_url: str) -> None:
    watcher, operator = open_page(browser, app_url), open_page(browser, app_url)
    assert "disk" not in watcher.inner_text("#status")
    box = operator.locator("#cpu-slider input[type=number]")
    box.fill("0.012")
    box.press("Enter")
    operator.click("#apply")
    operator.wait_for_selector("#status >> text=disk", timeout=60_000)
    watcher.wait_for_selector("#status >> text=disk", timeout=15_000)  # refreshed without any action there
    box.fill("1")
    box.press("Enter")
    operator.click("#apply")
    watcher.wait_for_function("() => !document.querySelector('#status').innerText.includes('disk')", timeout=60_000)
    watcher.close()
    operator.close()


def test_max_new_tokens_is_bounded_by_the_context(browser, app_url: str) -> None:
    import json

    context = json.loads((REPO / "models" / "demo" / "config.json").read_text())["max_position_embeddings"]
    page = open_page(browser, app_url)
    open_generation(page)
    page.wait_for_function(f"() => document.querySelector('#max-new input[type=range]')?.max == '{min(4096, context // 2)}'",
                           timeout=10_000)
    page.close()


def test_a_failed_apply_says_the_previous_model_still_answers(browser, app_url: str) -> None:
    page = open_page(browser, app_url)
    page.locator("#disk input").uncheck()
    box = page.locator("#cpu-slider input[type=number]")
    box.fill("0.001")
    box.press("Enter")
    page.wait_for_selector("#plan-preview >> text=Does not fit", timeout=15_000)
    page.click("#apply")
    page.wait_for_selector("#load-result .load-failed", timeout=60_000)
    message = page.inner_text("#load-result")
    assert "Loading failed" in message and "does not fit" in message and "is still loaded" in message
    status, failure = page.locator("#status").bounding_box(), page.locator("#load-result").bounding_box()
    assert status["y"] + status["height"] <= failure["y"] or failure["y"] + failure["height"] <= status["y"]
    assert "Placement" in page.inner_text("#status")  # the status is still there to read
    page.close()


def test_a_plan_for_a_gpu_this_machine_does_not_have_with_its_predicted_speed(browser, app_url: str) -> None:
    page = open_page(browser, app_url)
    assert "Predicted: ≈" in page.inner_text("#plan-preview")  # this machine's plan has its speed too
    page.locator("#what-if-gib input").fill("24")
    page.click("#what-if")
    page.wait_for_selector("#plan-preview >> text=Planned for a GPU with 24 GiB", timeout=30_000)
    text = page.inner_text("#plan-preview")
    assert "GPU0" in summary(page) and "Predicted: ≈" in text and "tokens/s" in text and "assumed" in text
    page.close()
