"""A shared app: visitors chat and see the plan; only the signed-in operator changes the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import SETTING_NAMES
from app_server import running_app
from pipeline.access import MAX_FAILURES, WINDOW_SECONDS, Access, parse_credentials
from pipeline.errors import ConfigError
from test_browser import ARGS, CHROMIUM, _browser_available

SETTINGS = dict(zip(SETTING_NAMES, ["demo", "", "none", 6.0, "lm_head", "nf4", "auto", True, True, "", 0.012]))
CHAT = ["And God said", "", 12, 0, 0.9, 50, 1.0, -1]


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    log = tmp_path_factory.mktemp("shared") / "app.log"
    with running_app("--shared", "--admin", "op:s3cret-pass", log=log) as url:
        yield url


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_a_visitor_cannot_reload_but_chats_and_sees_the_plan(shared_url: str) -> None:
    from gradio_client.exceptions import AppError

    visitor = client(shared_url)
    with pytest.raises(AppError, match="Only the operator of this shared app can change the model"):
        visitor.predict(*SETTINGS.values(), api_name="/load_model")
    assert len(visitor.predict(*CHAT, api_name="/chat").split()) >= 3
    assert visitor.predict("demo", 0.004, True, "none", "", api_name="/plan")["layers_per_device"]["disk"]


def test_the_operator_signs_in_and_reloads(shared_url: str) -> None:
    from gradio_client.exceptions import AppError

    operator = client(shared_url)
    with pytest.raises(AppError, match="Wrong operator name or password"):
        operator.predict("op", "guess", api_name="/sign_in")
    with pytest.raises(AppError, match="Only the operator"):
        operator.predict(*SETTINGS.values(), api_name="/load_model")
    operator.predict("op", "s3cret-pass", api_name="/sign_in")
    status, picture = operator.predict(*SETTINGS.values(), api_name="/load_model")
    assert "disk" in picture and "Placement: CPU" in status  # 12 MiB of RAM: the new plan is loaded
    other = client(shared_url)  # another visitor is still a visitor
    with pytest.raises(AppError, match="Only the operator"):
        other.predict(*SETTINGS.values(), api_name="/load_model")
    status, _ = operator.predict(*{**SETTINGS, "cpu": 1.0}.values(), api_name="/load_model")
    assert "Placement: CPU 100 %" in status


@pytest.mark.skipif(not _browser_available(), reason="needs Debian's chromium and playwright")
def test_in_the_browser_the_panel_is_locked_until_the_operator_signs_in(shared_url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(shared_url)
        page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#apply').disabled", timeout=10_000)
        assert page.locator("#cpu-slider input[type=range]").is_disabled()
        page.get_by_text("Operator sign-in").click()
        page.locator("#op-user textarea").fill("op")
        page.locator("#op-password input").fill("wrong")
        page.click("#op-sign-in")
        page.wait_for_selector("text=Wrong operator name or password", timeout=10_000)
        assert page.locator("#apply").is_disabled()
        page.locator("#op-password input").fill("s3cret-pass")
        page.click("#op-sign-in")
        page.wait_for_function("() => !document.querySelector('#apply').disabled", timeout=10_000)
        assert not page.locator("#cpu-slider input[type=range]").is_disabled()
        browser.close()


def test_sign_ins_are_throttled_after_repeated_failures() -> None:
    access = Access(shared=True, admin=("op", "pw"))
    for i in range(MAX_FAILURES):
        assert access.check("op", f"wrong{i}", now=100.0 + i) is False
    with pytest.raises(ConfigError, match="too many failed sign-ins: try again in"):
        access.check("op", "pw", now=110.0)  # even the right password waits
    assert access.check("op", "pw", now=100.0 + WINDOW_SECONDS + MAX_FAILURES) is True


def test_app_logins_are_throttled_after_repeated_failures() -> None:
    """Gradio's login page (`--auth`) has no limit of its own: the auth function pauses logins."""
    login = Access(shared=True).gradio_auth(("guest", "pw"))
    assert login("guest", "pw", now=0.0)
    for i in range(MAX_FAILURES):
        assert not login("guest", f"wrong{i}", now=100.0 + i)
    assert not login("guest", "pw", now=110.0)  # paused: even the right password waits
    assert login("guest", "pw", now=100.0 + WINDOW_SECONDS + MAX_FAILURES)


def test_roles_without_an_operator_account_and_credentials_parsing() -> None:
    assert Access(shared=False).open_to_all
    nobody = Access(shared=True)
    assert not nobody.open_to_all and "without an operator" in nobody.describe()
    with pytest.raises(ConfigError, match="no operator account"):
        nobody.check("op", "pw")
    assert parse_credentials("op:a:b", "--admin") == ("op", "a:b")
    with pytest.raises(ConfigError, match="--admin must be USER:PASS"):
        parse_credentials("justaname", "--admin")
    both = Access(shared=True, admin=("op", "pw"))
    login = both.gradio_auth(("visitor", "v"))
    assert login("visitor", "v") and login("op", "pw") and not login("visitor", "pw") and not login("op", "v")
    assert both.gradio_auth(None) is None
    assert both.is_operator_login("op") and not both.is_operator_login("visitor")


@pytest.mark.skipif(not _browser_available(), reason="needs Debian's chromium and playwright")
def test_logging_in_with_the_operator_account_unlocks_the_panel(tmp_path: Path, demo_dir: Path) -> None:
    """With --auth and --admin, the app's own login page takes both accounts; the operator's unlocks."""
    from playwright.sync_api import sync_playwright

    with running_app("--shared", "--auth", "guest:guest-pass", "--admin", "op:op-pass", log=tmp_path / "app.log") as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for user, password, unlocked in (("guest", "guest-pass", False), ("op", "op-pass", True)):
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            page.locator("input[type=text], input:not([type])").first.fill(user)
            page.locator("input[type=password]").fill(password)
            page.locator("input[type=password]").press("Enter")
            page.wait_for_selector("#plan-preview .plan-bar", timeout=60_000)
            condition = "!document.querySelector('#apply').disabled" if unlocked else \
                "document.querySelector('#apply').disabled"
            page.wait_for_function(f"() => {condition}", timeout=10_000)
            page.close()
        browser.close()
        # Gradio's own /login route, guessed at: after MAX_FAILURES wrong passwords even the right one
        # is refused for a while.
        import httpx

        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("login", data={"username": "guest", "password": "guest-pass"}).status_code == 200
            for i in range(MAX_FAILURES):
                assert http.post("login", data={"username": "guest", "password": f"guess{i}"}).status_code == 400
            assert http.post("login", data={"username": "guest", "password": "guest-pass"}).status_code == 400


def test_a_shared_app_without_an_api_key_refuses_the_openai_api(shared_url: str) -> None:
    import httpx

    response = httpx.get(shared_url + "v1/models", timeout=30)
    assert response.status_code == 403
    assert "needs a key" in response.json()["error"]["message"] and "--api-key" in response.json()["error"]["message"]


def test_a_shared_app_does_not_show_visitors_its_install_folder(shared_url: str) -> None:
    from gradio_client.exceptions import AppError

    from app_server import REPO

    with pytest.raises(AppError) as info:
        client(shared_url).predict(str(REPO / "models" / "no-such-model"), 1.0, True, "none", "", api_name="/plan")
    assert "does not exist" in str(info.value) and str(REPO) not in str(info.value)
    assert "<app>/models/no-such-model" in str(info.value)
