"""Who is calling: an API key on TCP listeners (checked, rate-limited), nobody on the Unix socket.

The local Unix socket is protected by its file mode (0700 directory), so requests on it run as
``local`` without a key; a TCP listener answers 401 to a request without a valid key and 429
when the key is over its request rate. Concurrent-sandbox quotas are the core's (the sandbox
manager holds a slot per sandbox).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Request

from fission import log_context
from fission.auth.audit_log import LOCAL
from fission.auth.keys import ApiKey, KeyStore, key_from_authorization
from fission.auth.quotas import RateLimiter
from fission.core.telemetry import QUOTA_REFUSED, Telemetry
from fission.errors import Forbidden, QuotaExceeded


@dataclass(frozen=True)
class Caller:
    """The identity a request runs as: an API key, or None for the local socket."""

    key: ApiKey | None

    @property
    def owner(self) -> str | None:
        """The owner id of sandboxes this caller creates and may see (None: every sandbox)."""
        return self.key.id if self.key is not None else None

    @property
    def is_admin(self) -> bool:
        """Whether the caller may operate the service: an admin key, or the local socket."""
        return self.key is None or self.key.is_admin

    @property
    def max_sandboxes(self) -> int | None:
        """How many sandboxes this caller may hold at once (None: no per-caller limit)."""
        return self.key.limits.max_concurrent_sandboxes if self.key is not None else None

    @property
    def max_snapshot_mb(self) -> int | None:
        """Disk this caller's snapshots may take (None: no per-caller limit)."""
        return self.key.limits.max_snapshot_mb if self.key is not None else None


LOCAL_CALLER = Caller(None)


class Gatekeeper:
    """Checks API keys and request rates; with ``keys`` None every caller is local.

    The admitted key's id goes into the request's log context; a rate refusal is counted in
    ``telemetry`` (the service's, so that it shows in the metrics).
    """

    def __init__(self, keys_db: Path | None, telemetry: Telemetry | None = None) -> None:
        self.keys = KeyStore(keys_db) if keys_db is not None else None
        self.rates = RateLimiter()
        self.telemetry = telemetry or Telemetry()

    def paused_retention_of(self, owner: str) -> float | None:
        """The paused retention of the key ``owner`` (None: the daemon's applies)."""
        if self.keys is None:
            return None
        return self.keys.get(owner).limits.paused_retention

    async def admit(self, authorization: str | None, api_key: str | None = None) -> Caller:
        """The caller for these headers; Unauthorized or QuotaExceeded when refused."""
        if self.keys is None:
            log_context.key_id.set(LOCAL)
            return LOCAL_CALLER
        plaintext = api_key or key_from_authorization(authorization)
        key = await asyncio.to_thread(self.keys.authenticate, plaintext)
        log_context.key_id.set(key.id)
        try:
            self.rates.consume(key.id, key.limits.rate_per_minute)
        except QuotaExceeded:
            self.telemetry.emit(QUOTA_REFUSED, limit="rate")
            raise
        return Caller(key)

    def close(self) -> None:
        """Close the key database."""
        if self.keys is not None:
            self.keys.close()


async def current_caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """FastAPI dependency: admit the request through the app's Gatekeeper."""
    gate: Gatekeeper = request.app.state.gate
    return await gate.admit(authorization, x_api_key)


Who = Annotated[Caller, Depends(current_caller)]


async def admin_caller(caller: Who) -> Caller:
    """FastAPI dependency: the caller, if it may operate the service; Forbidden otherwise."""
    if not caller.is_admin:
        raise Forbidden(
            f"API key {caller.owner} has the role {caller.key.role if caller.key else '?'}: "
            "this needs an admin key (`fission keys role KEY admin`)"
        )
    return caller


Admin = Annotated[Caller, Depends(admin_caller)]
