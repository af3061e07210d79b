"""The one execution path: an agent, a request and limits in, a RunResult out.

One-shot runs (``Service.run``, ``fission install``/``repo``) and sandboxes (runs, commands,
contexts) all execute through ``execute``. The guest agent enforces the program's timeout; the
host enforces it again ``KILL_GRACE`` seconds later. A guest that has not reported an exit by
then is *wedged* (hung, paused, or hostile): the result says timed out, and ``Execution.wedged``
tells the caller that this VM must not be used again.

Where a run's time goes (benchmarks): inside ``tracing(sink)``, or with ``FISSION_TRACE_FILE``
naming a file (a daemon), every run asks the guest for its per-step times and hands a
``RunTrace`` to the sink (or appends it to the file as a JSON line). Host steps are
``time.monotonic()`` seconds, comparable between processes on one host (a client timing its
own request can place them); guest steps are ms after the agent read the EXEC frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from fission.agent.client import (
    AgentClient,
    ExecOutcome,
    ExecRequest,
    OutputSink,
    Stdin,
    TraceSteps,
)
from fission.core.spec import RunResult
from fission.errors import VMError

KILL_GRACE = 2.0
TIMEOUT_EXIT_CODE = 124
TRACE_FILE_ENV = "FISSION_TRACE_FILE"


@dataclass(frozen=True)
class RunTrace:
    """Where one run's time went: host steps (monotonic s) and guest steps (ms after EXEC)."""

    host: dict[str, float]
    guest: TraceSteps
    warm: bool

    def as_json(self) -> dict[str, Any]:
        """The trace as one JSON object (``host``, ``guest`` as ``[[step, ms], ...]``, ``warm``)."""
        return {"host": self.host, "guest": [list(step) for step in self.guest], "warm": self.warm}


TraceSink = Callable[[RunTrace], None]
_sinks: list[TraceSink] = []


@contextlib.contextmanager
def tracing(sink: TraceSink) -> Iterator[None]:
    """Hand the trace of every run this process executes meanwhile to ``sink``."""
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)


def _trace_sinks() -> list[TraceSink]:
    path = os.environ.get(TRACE_FILE_ENV)
    if not path:
        return list(_sinks)

    def append(trace: RunTrace) -> None:
        with contextlib.suppress(OSError), open(path, "a") as lines:
            lines.write(json.dumps(trace.as_json()) + "\n")

    return [*_sinks, append]


@dataclass(frozen=True)
class Execution:
    """A run's result, whether the host had to cut off a guest that never answered, its trace."""

    result: RunResult
    wedged: bool
    trace: RunTrace | None = None


async def execute(
    agent: AgentClient,
    request: ExecRequest,
    on_output: OutputSink | None = None,
    stdin: Stdin | None = None,
    *,
    boot_ms: float = 0.0,
    diagnostics: Callable[[], str] | None = None,
) -> Execution:
    """Run ``request`` through ``agent``, streaming output to ``on_output`` as it arrives
    and ``stdin`` (bytes, or an async iterable drained while it runs) to the program.

    A ``VMError`` (the VM died under the run) is re-raised with ``diagnostics()`` appended.
    """
    started = time.monotonic()
    sinks = _trace_sinks()
    marks: dict[str, float] | None = {"execute": started} if sinks else None
    if marks is not None:
        request = replace(request, trace=True)
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def sink(stream: str, data: bytes) -> None:
        if marks is not None and "first_output" not in marks:
            marks["first_output"] = time.monotonic()
        chunks[stream].append(data)
        if on_output is not None:
            on_output(stream, data)

    wedged = False
    try:
        async with asyncio.timeout(request.timeout + KILL_GRACE):
            outcome = await agent.exec(request, sink, stdin, marks=marks)
    except TimeoutError:
        wedged = True
        elapsed = (time.monotonic() - started) * 1000.0
        printed = sum(map(len, chunks["stdout"] + chunks["stderr"]))
        capped = printed >= request.output_limit
        outcome = ExecOutcome(TIMEOUT_EXIT_CODE, 0, True, False, capped, elapsed)
    except VMError as exc:
        if diagnostics is None:
            raise
        raise type(exc)(f"{exc}\n{diagnostics()}".rstrip()) from exc
    result = RunResult(
        exit_code=TIMEOUT_EXIT_CODE if outcome.timed_out else outcome.exit_code,
        stdout=b"".join(chunks["stdout"]),
        stderr=b"".join(chunks["stderr"]),
        timed_out=outcome.timed_out,
        oom=outcome.oom,
        truncated=outcome.output_truncated,
        signal=outcome.signal,
        duration_ms=outcome.duration_ms,
        boot_ms=boot_ms,
        total_ms=boot_ms + (time.monotonic() - started) * 1000.0,
    )
    trace = None
    if marks is not None:
        marks["done"] = time.monotonic()
        trace = RunTrace(marks, outcome.trace, outcome.warm)
        for each in sinks:
            each(trace)
    return Execution(result, wedged, trace)
