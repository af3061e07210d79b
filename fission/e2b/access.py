"""Who may use which sandbox through the E2B API, and E2B's shapes for fission's errors.

The control plane admits a caller by its fission API key (sent as ``X-API-Key``, as E2B's SDK
sends its own), through the daemon's gatekeeper (passed in: the key store and rate limits stay
the server's). It hands out, for each sandbox, an envd access token: an HMAC of the sandbox id
under a secret of this daemon process, which the SDK sends back as ``X-Access-Token`` on every
in-sandbox call. A token names one sandbox and is good only with it; a restarted daemon has a
new secret, so clients reconnect (``Sandbox.connect``) to get a fresh token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Protocol

from fastapi import Depends, Header, Request

from fission.core.sandbox_spec import SandboxRecord
from fission.core.sandboxes import SandboxManager
from fission.errors import (
    Busy,
    Conflict,
    FileNotFound,
    FissionError,
    InvalidInput,
    PathNotAllowed,
    QuotaExceeded,
    SandboxNotFound,
    SandboxNotRunning,
    Unauthorized,
)

ENVD_VERSION = "0.5.7"  # the envd whose features fission serves (see docs/e2b.md)
ENVD_PORT = 49983
JUPYTER_PORT = 49999


class Caller(Protocol):
    """The identity the daemon's gatekeeper admits (``server.auth.Caller``)."""

    @property
    def owner(self) -> str | None: ...

    @property
    def max_sandboxes(self) -> int | None: ...


Admit = Callable[[str | None, str | None], Awaitable[Caller]]


class SandboxAccess:
    """Envd access tokens of this daemon process, and the check of a sandbox call."""

    def __init__(self, manager: SandboxManager, secret: bytes | None = None) -> None:
        self.manager = manager
        self._secret = secret or secrets.token_bytes(32)

    def token(self, sandbox_id: str) -> str:
        """The envd access token of ``sandbox_id``."""
        return hmac.new(self._secret, sandbox_id.encode(), hashlib.sha256).hexdigest()

    def check(self, sandbox_id: str | None, token: str | None) -> SandboxRecord:
        """The sandbox a call with these headers may use; Unauthorized or SandboxNotFound."""
        if not sandbox_id:
            raise InvalidInput("the E2b-Sandbox-Id header is missing")
        if not token or not hmac.compare_digest(token, self.token(sandbox_id)):
            raise Unauthorized(
                "the X-Access-Token is not this sandbox's: connect to it again "
                "(Sandbox.connect) to get a current one"
            )
        return self.manager.get(sandbox_id)


def sandbox_of_request(
    request: Request,
    e2b_sandbox_id: Annotated[str | None, Header()] = None,
    x_access_token: Annotated[str | None, Header()] = None,
    e2b_traffic_access_token: Annotated[str | None, Header()] = None,
) -> SandboxRecord:
    """FastAPI dependency: the sandbox an in-sandbox HTTP call may use (the interpreter's
    context calls send the traffic token instead of the access token: they are the same)."""
    access: SandboxAccess = request.app.state.access
    return access.check(e2b_sandbox_id, x_access_token or e2b_traffic_access_token)


Box = Annotated[SandboxRecord, Depends(sandbox_of_request)]


def http_status(exc: FissionError) -> int:
    """The status E2B's API answers for ``exc`` (the SDK maps these to its exceptions)."""
    if isinstance(exc, SandboxNotFound | FileNotFound):
        return 404
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, QuotaExceeded | Busy):
        return 429
    if isinstance(exc, SandboxNotRunning | Conflict):
        return 409
    if isinstance(exc, PathNotAllowed):
        return 403
    if isinstance(exc, InvalidInput):
        return 400
    return exc.http_status if exc.http_status >= 400 else 500
