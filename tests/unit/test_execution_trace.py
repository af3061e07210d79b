"""Tracing a run through ``core.execution.execute``: who asks the guest, what the sink gets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest

from fission.agent.client import AgentClient, ExecOutcome, ExecRequest, OutputSink
from fission.core.execution import TRACE_FILE_ENV, RunTrace, execute, tracing

GUEST_STEPS = (("parsed", 0.5), ("handed_over", 2.0), ("exit_sent", 9.0))


class StubAgent:
    """Plays ``AgentClient.exec``: records the request, prints, marks as the real one does."""

    def __init__(self) -> None:
        self.requests: list[ExecRequest] = []
        self.marks: list[dict[str, float] | None] = []

    async def exec(
        self,
        request: ExecRequest,
        on_output: OutputSink,
        stdin: bytes | None = None,
        *,
        marks: dict[str, float] | None = None,
    ) -> ExecOutcome:
        self.requests.append(request)
        self.marks.append(marks)
        if marks is not None:
            marks["exec_sent"] = time.monotonic()
        on_output("stdout", b"42\n")
        on_output("stdout", b"more\n")
        if marks is not None:
            marks["exit_read"] = time.monotonic()
        steps = GUEST_STEPS if request.trace else ()
        return ExecOutcome(0, 0, False, False, False, 9.0, warm=True, trace=steps)


def request() -> ExecRequest:
    return ExecRequest(["python3"], {}, 5.0, 1 << 28, 64, 1000, script="print(42)", mode="python")


async def run(agent: StubAgent) -> Any:
    return await execute(cast(AgentClient, agent), request())


async def test_untraced_runs_ask_the_guest_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACE_FILE_ENV, raising=False)
    agent = StubAgent()
    execution = await run(agent)
    assert agent.requests[0].trace is False and agent.marks == [None]
    assert execution.trace is None
    assert execution.result.stdout == b"42\nmore\n"


async def test_a_sink_gets_host_and_guest_steps_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACE_FILE_ENV, raising=False)
    agent, seen = StubAgent(), []
    before = time.monotonic()
    with tracing(seen.append):
        execution = await run(agent)
    assert agent.requests[0].trace is True
    [trace] = seen
    assert trace is execution.trace and isinstance(trace, RunTrace)
    steps = ["execute", "exec_sent", "first_output", "exit_read", "done"]
    assert list(trace.host) == steps
    times = [trace.host[name] for name in steps]
    assert before <= times[0] and times == sorted(times) and times[-1] <= time.monotonic()
    assert trace.guest == GUEST_STEPS and trace.warm is True
    assert execution.result.stdout == b"42\nmore\n"  # tracing changes nothing else
    await run(agent)
    assert len(seen) == 1 and agent.requests[1].trace is False  # the sink is gone again


async def test_a_daemon_appends_traces_to_the_file_it_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_FILE_ENV, str(path))
    await run(StubAgent())
    await run(StubAgent())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["guest"] == [list(step) for step in GUEST_STEPS]
    assert set(lines[0]["host"]) == {"execute", "exec_sent", "first_output", "exit_read", "done"}


async def test_an_unwritable_trace_file_never_breaks_a_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACE_FILE_ENV, str(tmp_path / "missing-dir" / "trace.jsonl"))
    execution = await run(StubAgent())
    assert execution.result.exit_code == 0 and execution.trace is not None
