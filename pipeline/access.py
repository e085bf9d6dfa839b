"""Who may change what a shared app serves: the operator, signed in; visitors only chat.

A local app has one user, who is the operator. A shared app (a share link, a Hugging Face Space,
or `--shared`) has visitors: they chat, see what is loaded and see its plan, and only the operator,
who signs in with the credentials given by `--admin USER:PASS` (or `APP_ADMIN`), can load models
or change budgets, quantization and the offload folder. Sign-in and login attempts are throttled.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import ConfigError

logger = logging.getLogger(__name__)

API_KEY_ENV = "OFFLOAD_CHAT_API_KEY"  # the OpenAI-compatible API's key, when no --api-key is given
MAX_FAILURES = 5  # failed sign-ins per window, for the whole app, before it pauses sign-ins
WINDOW_SECONDS = 60.0


def parse_credentials(value: str | None, flag: str) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, password); None stays None."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{flag} must be USER:PASS (got {len(value)} characters without a USER:PASS shape)")
    return user, password


@dataclass
class Access:
    """The app's roles. `shared` False: everyone is the operator."""

    shared: bool = False
    admin: tuple[str, str] | None = None
    _failures: deque = field(default_factory=deque)  # times of recent failed sign-ins
    _login_failures: deque = field(default_factory=deque)  # ... and of failed logins (`--auth`)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def open_to_all(self) -> bool:
        return not self.shared

    def describe(self) -> str:
        if not self.shared:
            return "local app: you are its operator"
        if self.admin is None:
            return "shared app without an operator: the model is fixed (start it with --admin USER:PASS to change it)"
        return "shared app: visitors chat; the operator signs in to change the model"

    def is_operator_login(self, username: str | None) -> bool:
        """A user logged in through the app's own login (`--auth`/`--admin` as Gradio auth) as the operator."""
        return self.admin is not None and username is not None and hmac.compare_digest(username, self.admin[0])

    def _throttle(self, failures: deque, now: float, what: str) -> None:
        while failures and now - failures[0] > WINDOW_SECONDS:
            failures.popleft()
        if len(failures) >= MAX_FAILURES:
            wait = WINDOW_SECONDS - (now - failures[0])
            raise ConfigError(f"too many failed {what}: try again in {wait:.0f} s")

    def check(self, user: str, password: str, now: float | None = None) -> bool:
        """Verify operator credentials; raises ConfigError while sign-ins are paused after failures."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._throttle(self._failures, now, "sign-ins")
            if self.admin is None:
                raise ConfigError("this shared app has no operator account (it was started without --admin)")
            ok = _matches(self.admin, user, password)
            if not ok:
                self._failures.append(now)
            return ok

    def gradio_auth(self, visitor: tuple[str, str] | None):
        """The `auth` for `launch()`: the visitors' login, and the operator's too when both exist.

        A function rather than Gradio's list of accounts: Gradio's own login page does not limit
        attempts, so failed logins are throttled here as sign-ins are (MAX_FAILURES per window)."""
        if visitor is None:
            return None
        accounts = [visitor] if self.admin is None else [visitor, self.admin]

        def login(user: str, password: str, now: float | None = None) -> bool:
            now = time.monotonic() if now is None else now
            with self._lock:
                try:
                    self._throttle(self._login_failures, now, "logins")
                except ConfigError as exc:
                    logger.warning("login refused: %s", exc)
                    return False
                ok = any([_matches(account, user, password) for account in accounts])  # no short cut: same time
                if not ok:
                    self._login_failures.append(now)
                    logger.warning("failed login (%d in the last %.0f s)", len(self._login_failures), WINDOW_SECONDS)
                return ok

        return login


def _matches(account: tuple[str, str], user: object, password: object) -> bool:
    return bool(hmac.compare_digest(str(user).encode(), account[0].encode())
                & hmac.compare_digest(str(password).encode(), account[1].encode()))
