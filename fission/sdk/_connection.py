"""Where the daemon is and how to talk to it: resolved once from arguments and environment.

``url`` (else ``FISSION_URL``) names a TCP daemon (``http://host:port``) or a Unix socket
(``unix:/path``); without either the SDK uses the local socket (``FISSION_SOCKET``, else the
default of ``fission serve``). ``api_key`` (else ``FISSION_API_KEY``) is sent as a bearer token.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fission import __version__
from fission.errors import InvalidInput, NotReady

DEFAULT_REQUEST_TIMEOUT = 60.0
UDS_BASE_URL = "http://fission"


class Unreachable(NotReady):
    """No daemon accepted the connection: nothing was sent, so the call may go elsewhere."""


@dataclass(frozen=True)
class Connection:
    """A resolved daemon address, credentials and per-request timeout (seconds)."""

    base_url: str
    socket: Path | None
    api_key: str | None
    request_timeout: float
    explicit: bool  # named by the caller (argument or FISSION_URL), not the default socket

    @property
    def where(self) -> str:
        """The address in words, for messages."""
        return f"the Unix socket {self.socket}" if self.socket is not None else self.base_url

    @property
    def headers(self) -> dict[str, str]:
        """Headers every request carries."""
        headers = {"User-Agent": f"fission-sdk/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def unreachable(self) -> str:
        """Why no daemon answered, and how to start one."""
        if self.socket is not None:
            serve = f"fission serve --socket {self.socket}" if self.explicit else "fission serve"
            hint = f"start one with `{serve}`"
            if self.socket.exists():
                hint = f"the socket exists but nothing accepts on it; {hint}"
            return f"no fission daemon answers at {self.where}: {hint}"
        return (
            f"no fission daemon answers at {self.base_url}: start one with "
            "`fission serve --host HOST --port PORT`, or check the url (FISSION_URL)"
        )


def check_request_timeout(request_timeout: float) -> float:
    """``request_timeout`` as a float if it is a positive finite number of seconds."""
    if (
        isinstance(request_timeout, bool)
        or not isinstance(request_timeout, (int, float))
        or not math.isfinite(request_timeout)
        or request_timeout <= 0
    ):
        raise InvalidInput(
            f"request_timeout must be a positive number of seconds, got {request_timeout!r}"
        )
    return float(request_timeout)


def resolve_connection(
    url: str | None = None,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> Connection:
    """The Connection for these arguments, falling back to the environment."""
    from fission.config import daemon_socket

    timeout = check_request_timeout(request_timeout)
    key = api_key if api_key is not None else os.environ.get("FISSION_API_KEY") or None
    given = url if url is not None else os.environ.get("FISSION_URL") or None
    if given is None:
        return Connection(UDS_BASE_URL, daemon_socket(), key, timeout, explicit=False)
    if given.startswith("unix:"):
        path = given.removeprefix("unix:").removeprefix("//")
        if not path:
            raise InvalidInput(f"url {given!r} names no socket: use unix:/path/to/fission.sock")
        return Connection(UDS_BASE_URL, Path(path), key, timeout, explicit=True)
    if not given.startswith(("http://", "https://")):
        raise InvalidInput(
            f"url {given!r} is not one fission understands: use http://HOST:PORT or unix:/PATH"
        )
    return Connection(given.rstrip("/"), None, key, timeout, explicit=True)
