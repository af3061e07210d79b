"""What ``Sandbox`` and ``AsyncSandbox`` share: the create request, the connection, the id.

Three durations, three names, all in seconds: ``ttl`` is how long the sandbox lives (the daemon
deletes it after that unless ``set_ttl`` extends it), ``timeout`` is how long one run or command
may take (a sandbox's default; each ``run``/``exec`` may pass its own), ``request_timeout`` is
how long one HTTP call to the daemon may wait for an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fission.errors import Conflict
from fission.sdk import _requests as calls
from fission.sdk._connection import DEFAULT_REQUEST_TIMEOUT, Connection, resolve_connection
from fission.sdk._models import SandboxInfo

DEFAULT_TTL = 300.0
DEFAULT_CONTEXT = "default"  # the code context run_code shares when none is named
DEFAULT_TIMEOUT = 30.0


class SandboxCore:
    """The parts of a sandbox handle that do no I/O."""

    _id: str | None
    _info: SandboxInfo | None
    _create: calls.Call | None
    _conn: Connection

    def __init__(
        self,
        language: str = "python",
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        memory_mb: int = 256,
        cpus: int = 1,
        disk_mb: int = 512,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        network: str | Mapping[str, Any] = "none",
        allow_hosts: Sequence[str] | None = None,
        from_snapshot: str | None = None,
        template: str | None = None,
        on_timeout: str = "delete",
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        """Describe a sandbox; it is created on entering a ``with`` block (or by ``create``).

        ``language``: python, node, go or bash. ``ttl``: seconds it lives. ``timeout``: default
        seconds per run or command. ``memory_mb``, ``cpus``, ``disk_mb``: its VM's size.
        ``env``: variables every run sees. ``metadata``: labels to find it by (``list``).
        ``network``: ``"none"`` (no network) or a policy object; ``allow_hosts``: ``HOST[:PORT]``
        entries the sandbox may reach through the host's egress proxy. ``from_snapshot``: a
        snapshot id to start from (its language, limits, memory and files). ``template``: a
        built template's name (``fission template build``) to start from: its language, env
        and default limits, its files and packages. ``on_timeout``:
        what the end of its ttl does, ``"delete"`` it or ``"pause"`` it. ``url``: the daemon,
        ``http://HOST:PORT`` or ``unix:/PATH`` (default: ``FISSION_URL``, else the local socket).
        ``api_key``: sent as a bearer token (default: ``FISSION_API_KEY``).
        ``request_timeout``: seconds one HTTP call may wait.
        """
        self._attach(resolve_connection(url, api_key, request_timeout), None)
        self._create = calls.create_sandbox(
            language,
            ttl=ttl,
            timeout=timeout,
            memory_mb=memory_mb,
            cpus=cpus,
            disk_mb=disk_mb,
            env=env,
            metadata=metadata,
            network=network,
            allow_hosts=allow_hosts,
            from_snapshot=from_snapshot,
            template=template,
            on_timeout=on_timeout,
        )

    def _attach(self, conn: Connection, sandbox_id: str | None) -> None:
        """Bind to a daemon (and to an existing sandbox when ``sandbox_id`` is given)."""
        self._conn = conn
        self._id = sandbox_id
        self._info = None
        self._create = None

    @property
    def id(self) -> str:
        """The sandbox's id (``sbx_...``)."""
        if self._id is None:
            raise Conflict("this sandbox is not created yet: enter its with block or use create()")
        return self._id

    @property
    def _created(self) -> bool:
        return self._id is not None

    @property
    def _default_timeout(self) -> float:
        """The sandbox's own per-run timeout (what a run without ``timeout=`` gets)."""
        return self._info.timeout if self._info is not None else DEFAULT_TIMEOUT

    def _remember(self, body: Any) -> SandboxInfo:
        """Parse a sandbox's JSON and keep it as the latest facts."""
        info = calls.parse_sandbox(body)
        self._id, self._info = info.id, info
        return info

    def __repr__(self) -> str:
        state = self._info.state if self._info is not None else "not created"
        name = type(self).__name__
        return f"<{name} {self._id or '-'} {state} at {self._conn.where}>"
