"""The HMI's logins: server-side sessions with idle and absolute expiry, and a brake on password guessing.

A session is a random token (the HttpOnly, SameSite=Strict cookie, Secure over HTTPS) mapped to the
user, the role and a second random token, the CSRF token, that the page sends back in a header with
every control request. Only the HMI's own event loop touches these objects (no locks).

Sessions live in this process's memory, on purpose (docs/hmi.md, "Sessions across restarts"): the store
belongs to the HmiServer, so they survive a restart of the HMI's thread (after a crash), and a restart of
the service ends them all. Each token starts with the id of the store that made it, so a token of an
earlier run of the service is told apart from an unknown one: the page then says that the line service
was restarted and shows the login.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sorter.config import Role

MAX_SESSIONS = 256  # beyond this the least recently used session goes (a panel logging in again and again)
FAIL_WINDOW_S = 60.0
FAIL_LIMIT = 5  # wrong passwords from one address within FAIL_WINDOW_S before it has to wait
LOCKOUT_S = 30.0


@dataclass
class Session:
    token: str
    user: str
    role: Role
    csrf: str
    created: float  # monotonic seconds
    seen: float  # last activity (a request, a touch on the panel)

    def csrf_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(self.csrf.encode(), value.encode("utf-8", "replace"))


class SessionStore:
    def __init__(self, idle_s: float, max_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self.instance = secrets.token_hex(4)  # this store's (this run's) id, the first part of its tokens

    def create(self, user: str, role: Role) -> Session:
        now = self._clock()
        token = f"{self.instance}.{secrets.token_urlsafe(32)}"
        s = Session(token, user, role, secrets.token_urlsafe(32), now, now)
        self._sessions[s.token] = s
        while len(self._sessions) > MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda x: x.seen)
            del self._sessions[oldest.token]
        return s

    def get(self, token: str | None) -> tuple[Session | None, str]:
        """The live session of this token, or None and why not: "none", "unknown", "expired", or "restarted"
        (a token of another store: an earlier run of the service)."""
        if not token:
            return None, "none"
        s = self._sessions.get(token)
        if s is None:
            made_by, dot, _ = token.partition(".")
            return None, "restarted" if dot and made_by != self.instance else "unknown"
        if self.expired(s):
            del self._sessions[token]
            return None, "expired"
        return s, "ok"

    def expired(self, s: Session) -> bool:
        now = self._clock()
        return now - s.seen > self.idle_s or now - s.created > self.max_s

    def alive(self, s: Session) -> bool:
        """Still in the store and not expired (a WebSocket checks its session with this at every push)."""
        return self._sessions.get(s.token) is s and not self.expired(s)

    def touch(self, s: Session) -> None:
        s.seen = self._clock()

    def drop(self, token: str) -> None:
        self._sessions.pop(token, None)

    def __len__(self) -> int:
        return len(self._sessions)


class LoginThrottle:
    """Wrong passwords per client address: after FAIL_LIMIT within a minute, LOCKOUT_S of refusals.

    Each login costs an argon2 verification (tens of ms of CPU on a line PC that also sorts): this
    and the HMI verifying one password at a time bound what a guessing client can take.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fails: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}

    def locked(self, client: str) -> float:
        """Seconds this client must still wait (0: may try)."""
        until = self._locked.get(client, 0.0)
        left = until - self._clock()
        if left <= 0:
            self._locked.pop(client, None)
            return 0.0
        return left

    def failed(self, client: str) -> None:
        now = self._clock()
        q = self._fails.setdefault(client, deque())
        q.append(now)
        while q and q[0] < now - FAIL_WINDOW_S:
            q.popleft()
        if len(q) >= FAIL_LIMIT:
            self._locked[client] = now + LOCKOUT_S
            q.clear()
        if len(self._fails) > 4096:  # many addresses: forget the quiet ones
            self._fails = {k: v for k, v in self._fails.items() if v}

    def succeeded(self, client: str) -> None:
        self._fails.pop(client, None)
