"""A client of the fission daemon over its Unix socket (or TCP), and the embedded fallback.

``run()`` is what ``fission run`` and ``fission.run()`` call: through the daemon when one
answers on the socket, else in this process (restore from the snapshot, run, destroy). Both
paths give the same RunResult and the same exit codes.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from fission.config import daemon_socket
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError, VMError
from fission.wire import error_from_body, output_bytes, result_from_lines

OutputCallback = Callable[[str, bytes], None]
CONNECT_TIMEOUT = 2.0


class DaemonClient:
    """Talks HTTP to one daemon; ``request_timeout`` bounds each call, in seconds."""

    def __init__(
        self, socket: Path | None = None, base_url: str | None = None, request_timeout: float = 60.0
    ) -> None:
        self.socket = socket if base_url is None else None
        if base_url is None:
            self.socket = socket or daemon_socket()
            transport = httpx.HTTPTransport(uds=str(self.socket))
            self._http = httpx.Client(transport=transport, base_url="http://fission")
        else:
            self._http = httpx.Client(base_url=base_url)
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
            response = self._http.get("/v1/health", timeout=CONNECT_TIMEOUT)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def pools(self) -> dict[str, Any]:
        """The daemon's pools and memory budget."""
        response = self._http.get("/v1/pools", timeout=self.request_timeout)
        self._raise_for_error(response)
        return dict(response.json())

    def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> RunResult:
        """Run ``spec`` on the daemon, streaming output to ``on_output``."""
        body = {
            "language": spec.language.name,
            "code": spec.code,
            "timeout": spec.limits.timeout,
            "memory_mb": spec.limits.memory_mb,
            "cpus": spec.limits.cpus,
            "disk_mb": spec.limits.disk_mb,
            "pids": spec.limits.pids,
            "output_limit_mb": spec.limits.output_limit_mb,
            "env": spec.env,
            "stdin_b64": base64.b64encode(spec.stdin).decode() if spec.stdin is not None else None,
        }
        # The run's own timeout plus room to get a VM and to stream the result back.
        timeout = httpx.Timeout(self.request_timeout + spec.limits.timeout, connect=CONNECT_TIMEOUT)
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        try:
            with self._http.stream("POST", "/v1/run", json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    self._raise_for_error(response)
                for raw in response.iter_lines():
                    if not raw:
                        continue
                    line = json.loads(raw)
                    if line["type"] == "output":
                        stream, data = output_bytes(line)
                        chunks[stream].append(data)
                        if on_output is not None:
                            on_output(stream, data)
                    elif line["type"] == "result":
                        stdout, stderr = b"".join(chunks["stdout"]), b"".join(chunks["stderr"])
                        return result_from_lines(line, stdout, stderr)
                    elif line["type"] == "error":
                        raise error_from_body(line)
        except httpx.HTTPError as exc:
            raise VMError(f"lost the daemon while running: {exc}") from exc
        raise VMError("the daemon ended the run without a result")

    @staticmethod
    def _raise_for_error(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json().get("error") or {}
        except ValueError:
            body = {}
        if not body:
            detail = response.text[:500]
            raise FissionError(f"the daemon answered HTTP {response.status_code}: {detail}")
        raise error_from_body(body)


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
