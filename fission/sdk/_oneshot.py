"""``fission.run``: one program in a fresh microVM, through the daemon or embedded.

Made for calls in a loop: the daemon's connection is kept between calls and nothing is probed
or imported per call (``fission.sdk._backend.run_once``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import RunSpec
from fission.net.policy import NetworkPolicy
from fission.sdk import _requests as calls
from fission.sdk._backend import run_once
from fission.sdk._connection import DEFAULT_REQUEST_TIMEOUT
from fission.sdk._models import OutputCallback, OutputEvent, RunResult


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
    template: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> RunResult:
    """Run ``code`` once in a fresh microVM; a non-zero exit is a result, not an error.

    ``language``: python, node, go or bash. ``timeout``: seconds the program may run (boot not
    included). ``memory_mb``, ``cpus``: its VM's size. ``env``: its environment (the host's
    never leaks in). ``stdin``: bytes (or text) fed to it. ``on_stdout``/``on_stderr`` get each
    chunk (bytes) as it is printed. ``allow_hosts``: ``HOST[:PORT]`` entries it may reach
    (network on, through the host's egress proxy; default: no network). ``template``: a built
    template's name (``fission template build``): the run starts from its snapshot, in its
    language and env, with its limits where these are left at their defaults. Goes through the
    daemon at ``url`` (else ``FISSION_URL``, else the local socket); with no url and no local
    daemon, runs embedded in this process.
    """
    spec = RunSpec(
        resolve_language(language),
        code,
        Limits(timeout=timeout, memory_mb=memory_mb, cpus=cpus),
        dict(env or {}),
        stdin.encode("utf-8") if isinstance(stdin, str) else stdin,
        NetworkPolicy.allowing(list(allow_hosts)) if allow_hosts else NetworkPolicy(),
        template=template,
    )

    def sink(stream: str, chunk: bytes) -> None:
        callback = calls.callback_for(OutputEvent(stream, chunk), on_stdout, on_stderr)
        if callback is not None:
            callback(chunk)

    return run_once(spec, sink, url, api_key, request_timeout)
