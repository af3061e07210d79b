"""A client of the fission daemon over its Unix socket (or TCP), and the embedded fallback.

``run()`` is what ``fission run`` calls: through the daemon when one answers on the socket,
else in this process (restore from the snapshot, run, destroy). Both paths give the same
RunResult and the same exit codes. ``DaemonClient`` speaks the daemon's API through the SDK's
shared parts (``fission.sdk._requests`` builds and reads, ``fission.sdk._http`` sends); the SDK's
``fission.run`` is the same one-shot run with keyword options.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from fission.config import daemon_socket
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError
from fission.sdk import _requests as calls
from fission.sdk._connection import resolve_connection
from fission.sdk._http import SyncHTTP
from fission.sdk._sync import stream_run

OutputCallback = Callable[[str, bytes], None]
CONNECT_TIMEOUT = 2.0


class DaemonClient:
    """Talks HTTP to one daemon; ``request_timeout`` bounds each call, in seconds."""

    def __init__(
        self, socket: Path | None = None, base_url: str | None = None, request_timeout: float = 60.0
    ) -> None:
        self.socket = (socket or daemon_socket()) if base_url is None else None
        url = base_url if base_url is not None else f"unix:{self.socket}"
        self._http = SyncHTTP(resolve_connection(url, request_timeout=request_timeout))
        self.request_timeout = request_timeout

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def alive(self) -> bool:
        """True when a daemon answers on the socket."""
        if self.socket is not None and not self.socket.exists():
            return False
        try:
            self._http.json(calls.health(CONNECT_TIMEOUT))
        except FissionError:
            return False
        return True

    def pools(self) -> dict[str, Any]:
        """The daemon's pools and memory budget."""
        return dict(self._http.json(calls.pools()))

    def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> RunResult:
        """Run ``spec`` on the daemon, streaming output to ``on_output``."""
        limits = spec.limits
        call = calls.one_shot_run(
            spec.language.name,
            spec.code,
            {
                "timeout": limits.timeout,
                "memory_mb": limits.memory_mb,
                "cpus": limits.cpus,
                "disk_mb": limits.disk_mb,
                "pids": limits.pids,
                "output_limit_mb": limits.output_limit_mb,
            },
            spec.env,
            spec.stdin,
        )
        with closing(stream_run(self._http, call)) as events:
            for event in events:
                if isinstance(event, RunResult):
                    return event
                if on_output is not None:
                    on_output(event.stream, event.data)
        raise calls.missing_result()


def run(
    spec: RunSpec, on_output: OutputCallback | None = None, embedded: bool = False
) -> RunResult:
    """Run ``spec`` through the daemon if one answers, else embedded in this process."""
    if not embedded:
        client = DaemonClient()
        try:
            if client.alive():
                return client.run(spec, on_output)
        finally:
            client.close()
    from fission.core.orchestrator import run as run_embedded

    return asyncio.run(run_embedded(spec, on_output))
