"""Who may change what a shared app serves: the operator, signed in; visitors only chat.

A local app has one user, who is the operator. A shared app (a share link, a Hugging Face Space,
or `--shared`) has visitors: they chat, see what is loaded and see its plan, and only the operator,
who signs in with the credentials given by `--admin USER:PASS` (or `APP_ADMIN`), can load models
or change budgets, quantization and the offload folder. Sign-in attempts are throttled.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import ConfigError

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

    def check(self, user: str, password: str, now: float | None = None) -> bool:
        """Verify operator credentials; raises ConfigError while sign-ins are paused after failures."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._failures and now - self._failures[0] > WINDOW_SECONDS:
                self._failures.popleft()
            if len(self._failures) >= MAX_FAILURES:
                wait = WINDOW_SECONDS - (now - self._failures[0])
                raise ConfigError(f"too many failed sign-ins: try again in {wait:.0f} s")
            if self.admin is None:
                raise ConfigError("this shared app has no operator account (it was started without --admin)")
            ok = hmac.compare_digest(str(user).encode(), self.admin[0].encode()) & hmac.compare_digest(
                str(password).encode(), self.admin[1].encode())
            if not ok:
                self._failures.append(now)
            return bool(ok)

    def gradio_auth(self, visitor: tuple[str, str] | None):
        """The `auth` for `launch()`: the visitors' login, and the operator's too when both exist."""
        if visitor is None:
            return None
        if self.admin is None:
            return [visitor]
        return [visitor, self.admin]
