"""Exposed ports and terminals of persistent sandboxes: who may open which stream into a VM.

A sandbox has no network device; its owner ``expose``s a port, and the daemon's URL
``/v1/sandboxes/{id}/ports/{port}/...`` then reaches 127.0.0.1:port inside the guest through
the agent channel (``agent.ingress``). Who may use that URL: the sandbox's owner (its API key),
or anyone holding a port token the owner minted for that one port (a browser preview). Tokens
are ``fpt_<id>_<secret>``; only the secret's SHA-256 is kept, compared in constant time; revoking
one, or unexposing the port, refuses it from then on and ends the streams opened through it.
Terminals (``pty``) are streams too, for the owner only. Every stream of a sandbox ends when it
pauses, stops or is deleted (``detach``); exposures and tokens last while the sandbox does (not
across a daemon restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fission.agent.ingress import IngressTunnel, StreamRefused
from fission.agent.tunnel_streams import TunnelStream
from fission.core.limits import MB
from fission.errors import Busy, InvalidInput, PortNotExposed, PortUnreachable, Unauthorized
from fission.net.egress import PROXY_PORT

if TYPE_CHECKING:
    from fission.core.machines import Machine
    from fission.core.managed_sandbox import ManagedSandbox
    from fission.core.sandboxes import SandboxManager

MAX_STREAMS = 32  # port and terminal streams open into one sandbox at once
MAX_TOKENS = 16  # tokens per exposed port
MAX_PTYS = 4  # terminals open into one sandbox at once (each is a shell and its own cgroup)
TOKEN_PREFIX = "fpt_"
DEFAULT_SHELL_SIZE = (80, 24)


def check_port(port: object) -> int:
    """``port`` if it is a port a sandbox may expose; InvalidInput naming the problem if not."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise InvalidInput(f"port must be a whole number from 1 to 65535, not {port!r}")
    if port == PROXY_PORT:
        raise InvalidInput(
            f"port {PROXY_PORT} is the sandbox's egress proxy and cannot be exposed: "
            "listen on another port"
        )
    return port


def check_size(cols: object, rows: object) -> tuple[int, int]:
    """A terminal's (cols, rows) if each is a whole number from 1 to 1000; InvalidInput if not."""
    for name, value in (("cols", cols), ("rows", rows)):
        if type(value) is not int or not 1 <= value <= 1000:
            raise InvalidInput(f"{name} must be a whole number from 1 to 1000, not {value!r}")
    return cols, rows  # type: ignore[return-value]


def ports_path(sandbox_id: str, port: int) -> str:
    """The daemon path that reaches ``port`` of the sandbox (append the guest's path)."""
    return f"/v1/sandboxes/{sandbox_id}/ports/{port}/"


@dataclass
class Exposure:
    """One exposed port: the tokens minted for it (id -> SHA-256 of the secret)."""

    port: int
    tokens: dict[str, str] = field(default_factory=dict)
    streams: set[TunnelStream] = field(default_factory=set)

    def to_json(self, sandbox_id: str) -> dict[str, Any]:
        """What the API shows of it (never a token's secret)."""
        return {
            "sandbox_id": sandbox_id,
            "port": self.port,
            "path": ports_path(sandbox_id, self.port),
            "tokens": sorted(self.tokens),
            "streams": len(self.streams),
        }


def split_token(token: str) -> tuple[str, str] | None:
    """``fpt_<id>_<secret>`` -> (id, secret); None when it has another shape."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not token_id or not secret:
        return None
    return token_id, secret


def digest(secret: str) -> str:
    """The stored form of a token's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class SandboxPorts:
    """Exposed ports, their tokens and the open streams of one ``SandboxManager``."""

    def __init__(
        self, manager: SandboxManager, max_streams: int = MAX_STREAMS, max_ptys: int = MAX_PTYS
    ) -> None:
        self.manager = manager
        self.max_streams = max_streams
        self.max_ptys = max_ptys
        self._ptys: dict[str, int] = {}  # terminals open per sandbox
        self._exposed: dict[str, dict[int, Exposure]] = {}
        # The ingress of each running sandbox's VM, made on first use, closed by ``detach``.
        self._ingress: dict[str, tuple[Machine, IngressTunnel]] = {}

    # -- the owner's side ----------------------------------------------------------------------
    def expose(self, sandbox_id: str, port: int, owner: str | None = None) -> dict[str, Any]:
        """Let ``port`` of the sandbox be reached through the daemon (again: no change)."""
        port = check_port(port)
        self.manager.check_running(sandbox_id, owner)
        ports = self._exposed.setdefault(sandbox_id, {})
        exposure = ports.setdefault(port, Exposure(port))
        return exposure.to_json(sandbox_id)

    def list_ports(self, sandbox_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """The sandbox's exposed ports, lowest first."""
        self.manager.get(sandbox_id, owner)
        ports = self._exposed.get(sandbox_id, {})
        return [ports[port].to_json(sandbox_id) for port in sorted(ports)]

    async def unexpose(self, sandbox_id: str, port: int, owner: str | None = None) -> None:
        """Refuse the port from now on (its tokens too) and end its open streams."""
        exposure = self._exposure(sandbox_id, port, owner)
        del self._exposed[sandbox_id][exposure.port]
        await self._end_streams(sandbox_id, exposure.streams)

    def mint_token(self, sandbox_id: str, port: int, owner: str | None = None) -> dict[str, Any]:
        """A new token for one exposed port: whoever holds it may use that port's URL."""
        exposure = self._exposure(sandbox_id, port, owner)
        if len(exposure.tokens) >= MAX_TOKENS:
            raise InvalidInput(
                f"port {port} has {MAX_TOKENS} tokens already: revoke one before minting another"
            )
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
        exposure.tokens[token_id] = digest(secret)
        return {
            "token_id": token_id,
            "token": f"{TOKEN_PREFIX}{token_id}_{secret}",
            "port": port,
            "path": ports_path(sandbox_id, port),
        }

    async def revoke_token(
        self, sandbox_id: str, port: int, token_id: str, owner: str | None = None
    ) -> None:
        """Refuse a token from now on and end the streams opened with it."""
        exposure = self._exposure(sandbox_id, port, owner)
        if exposure.tokens.pop(token_id, None) is None:
            raise PortNotExposed(f"port {port} of sandbox {sandbox_id} has no token {token_id!r}")
        # Streams do not remember their token: end the port's streams, the owner's too.
        await self._end_streams(sandbox_id, exposure.streams)

    # -- the visitor's side --------------------------------------------------------------------
    def admit(
        self, sandbox_id: str, port: int, owner: str | None, token: str | None, *, keyed: bool
    ) -> None:
        """Whether a visitor may use the port: a valid token for it, or the owner's key
        (``keyed``: the request carried a valid key, whose id is ``owner``)."""
        check_port(port)
        if token is not None and self._token_valid(sandbox_id, port, token):
            return
        if not keyed:
            raise Unauthorized(
                f"port {port} of sandbox {sandbox_id} needs the owner's API key or a valid port "
                "token (?fission_token=... or the X-Fission-Port-Token header)"
            )
        self._exposure(sandbox_id, port, owner)

    def _token_valid(self, sandbox_id: str, port: int, token: str) -> bool:
        parts = split_token(token)
        exposure = self._exposed.get(sandbox_id, {}).get(port)
        if parts is None or exposure is None:
            return False
        stored = exposure.tokens.get(parts[0])
        return stored is not None and hmac.compare_digest(stored, digest(parts[1]))

    @contextlib.asynccontextmanager
    async def open_port(self, sandbox_id: str, port: int) -> AsyncIterator[TunnelStream]:
        """A stream to the exposed port (``admit`` first); PortUnreachable if nothing listens."""
        exposure = self._exposure(sandbox_id, port, None)
        async with self._stream(sandbox_id, lambda ingress: ingress.connect(port)) as stream:
            exposure.streams.add(stream)
            try:
                yield stream
            finally:
                exposure.streams.discard(stream)

    @contextlib.asynccontextmanager
    async def open_pty(
        self,
        sandbox_id: str,
        owner: str | None,
        cols: int = DEFAULT_SHELL_SIZE[0],
        rows: int = DEFAULT_SHELL_SIZE[1],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncIterator[tuple[TunnelStream, IngressTunnel]]:
        """A shell on a new terminal in the sandbox, under the sandbox's limits (at most
        ``max_ptys`` at once), with ``env`` over the sandbox's and in ``cwd`` (else home);
        the stream's ``exit_code`` is the shell's once it ended."""
        check_size(cols, rows)
        box = self.manager._box(sandbox_id, owner)
        if self._ptys.get(sandbox_id, 0) >= self.max_ptys:
            raise Busy(
                f"sandbox {sandbox_id} has {self.max_ptys} terminals open already: close one first"
            )
        limits, spec = box.record.spec.limits, box.record.spec
        request = {
            "cols": cols,
            "rows": rows,
            "env": spec.env | (env or {}),
            "memory_bytes": limits.memory_mb * MB,
            "pids_max": limits.pids,
        }
        if cwd is not None:
            request["cwd"] = cwd
        self._ptys[sandbox_id] = self._ptys.get(sandbox_id, 0) + 1
        try:
            async with self._stream(sandbox_id, lambda ingress: ingress.pty(request)) as stream:
                yield stream, self._ingress[sandbox_id][1]
        finally:
            self._ptys[sandbox_id] -= 1
            if not self._ptys[sandbox_id]:
                del self._ptys[sandbox_id]

    @contextlib.asynccontextmanager
    async def _stream(self, sandbox_id: str, opener: Any) -> AsyncIterator[TunnelStream]:
        box = self.manager._box(sandbox_id, None)
        async with box.gate.operation():  # wakes a VM stopped for idleness
            ingress = self._ingress_of(box)
            try:
                stream = await opener(ingress)
            except StreamRefused as exc:
                raise PortUnreachable(
                    f"nothing in sandbox {sandbox_id} accepted the stream ({exc}): start the "
                    "program that listens on the port first (a terminal: see the reason)"
                ) from exc
        try:
            yield stream
        finally:
            await ingress.release(stream)

    def _ingress_of(self, box: ManagedSandbox) -> IngressTunnel:
        agent = box.agent  # SandboxNotRunning unless it runs
        machine = box.machine
        current = self._ingress.get(box.record.id)
        if current is None or current[0] is not machine:
            assert machine is not None
            current = (machine, agent.open_ingress(self.max_streams))
            self._ingress[box.record.id] = current
        return current[1]

    def _exposure(self, sandbox_id: str, port: int, owner: str | None) -> Exposure:
        check_port(port)
        self.manager.get(sandbox_id, owner)
        exposure = self._exposed.get(sandbox_id, {}).get(port)
        if exposure is None:
            raise PortNotExposed(
                f"port {port} of sandbox {sandbox_id} is not exposed: expose it first"
            )
        return exposure

    async def _end_streams(self, sandbox_id: str, streams: set[TunnelStream]) -> None:
        current = self._ingress.get(sandbox_id)
        for stream in list(streams):
            if current is not None:
                await current[1].release(stream)  # the guest closes its end too
            stream.feed_eof()
        streams.clear()

    # -- the manager's hooks -------------------------------------------------------------------
    def stream_count(self, sandbox_id: str) -> int:
        """Streams open into the sandbox (it is not idle while any is)."""
        current = self._ingress.get(sandbox_id)
        return len(current[1].streams) if current is not None else 0

    async def detach(self, sandbox_id: str) -> None:
        """End every stream into the sandbox (its VM pauses, stops or goes); exposures stay."""
        current = self._ingress.pop(sandbox_id, None)
        if current is not None:
            await current[1].aclose()

    def sandbox_gone(self, sandbox_id: str) -> None:
        """Forget the sandbox's exposures and tokens (it was deleted)."""
        self._exposed.pop(sandbox_id, None)
