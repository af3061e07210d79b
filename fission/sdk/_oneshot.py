"""``fission.run``: one program in a fresh microVM, through the daemon or embedded."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from fission.core.limits import Limits
from fission.errors import FissionError
from fission.sdk import _requests as calls
from fission.sdk._connection import DEFAULT_REQUEST_TIMEOUT, resolve_connection
from fission.sdk._http import SyncHTTP
from fission.sdk._models import OutputCallback, OutputEvent, RunResult
from fission.sdk._sync import drain, stream_run

PROBE_TIMEOUT = 2.0  # seconds a local daemon has to answer before the run goes embedded


def answers(http: SyncHTTP) -> bool:
    """True when a daemon answers the health probe."""
    if http.conn.socket is not None and not http.conn.socket.exists():
        return False
    try:
        http.json(calls.health(PROBE_TIMEOUT))
    except FissionError:
        return False
    return True


def run(
    code: str,
    language: str = "python",
    *,
    timeout: float = 30.0,
    memory_mb: int = 256,
    cpus: int = 1,
    env: Mapping[str, str] | None = None,
    stdin: bytes | str | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
    allow_hosts: Sequence[str] | None = None,
    url: str | None = None,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> RunResult:
    """Run ``code`` once in a fresh microVM; a non-zero exit is a result, not an error.

    ``language``: python, node or bash. ``timeout``: seconds the program may run (boot not
    included). ``memory_mb``, ``cpus``: its VM's size. ``env``: its environment (the host's
    never leaks in). ``stdin``: bytes (or text) fed to it. ``on_stdout``/``on_stderr`` get each
    chunk (bytes) as it is printed. ``allow_hosts``: ``HOST[:PORT]`` entries it may reach
    (network on, through the host's egress proxy; default: no network). Goes through the
    daemon at ``url`` (else ``FISSION_URL``, else the local socket); with no url and no local
    daemon, runs embedded in this process.
    """
    conn = resolve_connection(url, api_key, request_timeout)
    http = SyncHTTP(conn)
    try:
        if conn.explicit or answers(http):
            limits = {"timeout": timeout, "memory_mb": memory_mb, "cpus": cpus}
            call = calls.one_shot_run(language, code, limits, env, stdin, allow_hosts)
            return drain(stream_run(http, call), on_stdout, on_stderr)
    finally:
        http.close()
    limited = Limits(timeout=timeout, memory_mb=memory_mb, cpus=cpus)
    return run_embedded(
        code, language, limited, env, stdin, on_stdout, on_stderr, allow_hosts or ()
    )


def run_embedded(
    code: str,
    language: str,
    limits: Limits,
    env: Mapping[str, str] | None,
    stdin: bytes | str | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    allow_hosts: Sequence[str] = (),
) -> RunResult:
    """Run in this process: restore a VM from the warm snapshot, run, destroy it."""
    from fission.core.languages import resolve_language
    from fission.core.orchestrator import run as orchestrate
    from fission.core.spec import RunSpec
    from fission.net.policy import NetworkPolicy

    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    spec = RunSpec(
        resolve_language(language),
        code,
        limits,
        dict(env or {}),
        data,
        NetworkPolicy.allowing(list(allow_hosts)) if allow_hosts else NetworkPolicy(),
    )

    def sink(stream: str, chunk: bytes) -> None:
        callback = calls.callback_for(OutputEvent(stream, chunk), on_stdout, on_stderr)
        if callback is not None:
            callback(chunk)

    return asyncio.run(orchestrate(spec, sink))
