"""The one execution path: an agent, a request and limits in, a RunResult out.

One-shot runs (``Service.run``, ``fission install``/``repo``) and sandboxes (runs, commands,
contexts) all execute through ``execute``. The guest agent enforces the program's timeout; the
host enforces it again ``KILL_GRACE`` seconds later. A guest that has not reported an exit by
then is *wedged* (hung, paused, or hostile): the result says timed out, and ``Execution.wedged``
tells the caller that this VM must not be used again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fission.agent.client import AgentClient, ExecOutcome, ExecRequest, OutputSink
from fission.core.spec import RunResult
from fission.errors import VMError

KILL_GRACE = 2.0
TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True)
class Execution:
    """A run's result, and whether the host had to cut off a guest that never answered."""

    result: RunResult
    wedged: bool


async def execute(
    agent: AgentClient,
    request: ExecRequest,
    on_output: OutputSink | None = None,
    stdin: bytes | None = None,
    *,
    boot_ms: float = 0.0,
    diagnostics: Callable[[], str] | None = None,
) -> Execution:
    """Run ``request`` through ``agent``, streaming output to ``on_output`` as it arrives.

    A ``VMError`` (the VM died under the run) is re-raised with ``diagnostics()`` appended.
    """
    started = time.monotonic()
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def sink(stream: str, data: bytes) -> None:
        chunks[stream].append(data)
        if on_output is not None:
            on_output(stream, data)

    wedged = False
    try:
        async with asyncio.timeout(request.timeout + KILL_GRACE):
            outcome = await agent.exec(request, sink, stdin)
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
    return Execution(result, wedged)
