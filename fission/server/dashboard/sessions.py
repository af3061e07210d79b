"""Dashboard sessions: a random id in an HttpOnly cookie, the facts on the server, CSRF tokens.

The browser holds only the session id (``secrets.token_urlsafe(32)``), never the API key: the
key is checked once at login and the session remembers the key's id. Each request looks the key
up again, so revoking it or taking its admin role away ends its sessions at once. Sessions live
in memory (a daemon restart logs everyone out), expire after ``IDLE_EXPIRY`` seconds without a
request and ``ABSOLUTE_EXPIRY`` seconds after login, and at most ``MAX_SESSIONS`` exist (the
oldest goes first).

Every state-changing request must carry the session's CSRF token (``X-CSRF-Token`` header or
``csrf_token`` form field) and come from this origin (``Origin``, else ``Referer``, naming the
host the request was sent to). The cookie is also ``SameSite=Strict``: three separate locks.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fission.errors import Forbidden, Unauthorized

COOKIE = "fission_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
IDLE_EXPIRY = 30 * 60.0
ABSOLUTE_EXPIRY = 12 * 3600.0
MAX_SESSIONS = 1000
LOCAL_OWNER = "local"  # who a session on the Unix socket acts as (no key)


class SessionExpired(Unauthorized):
    """The session cookie names no live session: forged, expired, or logged out."""

    code = "session_expired"


@dataclass
class Session:
    """One logged-in browser: which key (None on the local socket) and its CSRF token."""

    id: str
    key_id: str | None
    created_at: float
    last_seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def who(self) -> str:
        """The key id this session acts as, or ``local``."""
        return self.key_id or LOCAL_OWNER


class SessionStore:
    """The live sessions of one dashboard."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, key_id: str | None) -> Session:
        """A new session for ``key_id`` (None: the local socket)."""
        self._sweep()
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        now = self._clock()
        session = Session(secrets.token_urlsafe(32), key_id, now, now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session:
        """The live session with this id (refreshing its idle clock); SessionExpired otherwise."""
        session = self._sessions.get(session_id or "")
        now = self._clock()
        if session is None or self._expired(session, now):
            if session is not None:
                del self._sessions[session.id]
            raise SessionExpired(
                "your dashboard session has expired or is not valid: log in again at /ui/login"
            )
        session.last_seen = now
        return session

    def peek(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None, without refreshing it."""
        session = self._sessions.get(session_id or "")
        if session is None or self._expired(session, self._clock()):
            return None
        return session

    def end(self, session_id: str | None) -> None:
        """Forget a session (logout); an unknown id changes nothing."""
        self._sessions.pop(session_id or "", None)

    def end_key(self, key_id: str) -> None:
        """Forget every session of one key (it was revoked or lost its admin role)."""
        for session in [s for s in self._sessions.values() if s.key_id == key_id]:
            del self._sessions[session.id]

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen > IDLE_EXPIRY or now - session.created_at > ABSOLUTE_EXPIRY

    def _sweep(self) -> None:
        now = self._clock()
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[session.id]


def check_csrf(session: Session, token: str | None) -> None:
    """Refuse a state-changing request whose CSRF token is missing or not the session's."""
    if not token or not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise Forbidden(
            "this request has no valid CSRF token: reload the page and try again "
            f"(forms send it as {CSRF_FIELD}, scripts as the X-CSRF-Token header)"
        )


def check_origin(origin: str | None, referer: str | None, host: str | None) -> None:
    """Refuse a state-changing request that does not come from a page of this host."""
    source = origin if origin and origin != "null" else referer
    if not source or not host:
        raise Forbidden(
            "this request names no Origin: the dashboard accepts changes only from its own pages"
        )
    if urlsplit(source).netloc.lower() != host.lower():
        raise Forbidden(
            f"this request comes from {source[:100]!r}, not from this dashboard ({host[:100]}): "
            "refused"
        )
