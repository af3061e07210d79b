"""Where every millisecond of a warm run goes: host and guest steps, p50 and p99.

``--runs`` warm runs of ``print(42)`` (default 30) in each of three settings, each printed as
a markdown table of steps:

(a) an in-process ``Service`` with a python pool of two VMs (the daemon's default), paced
    (each run waits until the pool is full again): the bench times the call, the pool's
    ``acquire`` and the result;
(b) the same through a daemon (``fission serve --pool python=2``) and the SDK's daemon client;
    the daemon writes each run's trace to ``FISSION_TRACE_FILE``, and since host times are
    ``time.monotonic()`` the bench places them between its own send and receive;
(c) in a persistent sandbox of that daemon: ``run`` and ``exec("echo 42")``, back to back or
    ``--pause`` seconds apart (an agent's think time).

Host steps come from ``fission.core.execution`` (``execute`` entered, EXEC frame written, first
output, EXIT frame read, ``execute`` done); guest steps are the agent's own (ms after it read
the EXEC frame; a fork-server child reports when it woke, was ready, began and ended the
script). Each step's row gives the time since the step before it in that run (steps sorted by
when they happened), and its offset from the start of the host or guest part. ``channel`` is
the host's EXEC-written-to-EXIT-read time less the guest's EXEC-read-to-EXIT-sent time: the
two trips over virtio-serial plus the host's framing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_warm import start_daemon, stop_daemon, wait_pool_full
from benchlib import percentile

from fission.core.execution import TRACE_FILE_ENV, RunTrace, tracing
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.service import Service, ServiceConfig
from fission.core.spec import RunSpec
from fission.sdk import Sandbox
from fission.sdk._backend import DaemonBackend

CODE = "print(42)"
POOL_DEADLINE = 180.0
POOL = 2  # the daemon's default: with one, each run's refill starts beside it
HOST_LABELS = {
    "pool_acquired": "host: pool acquire",
    "execute": "host: to execute() (HTTP, routing, acquire, set-up)",
    "exec_sent": "host: EXEC frame written",
    "first_output": "host: first output read",
    "exit_read": "host: EXIT frame read",
    "done": "host: execute() returns",
    "end": "host: result in the caller's hands (audit, release, response)",
}
# One run: its step name -> monotonic seconds (host) and the guest's [step, ms] pairs.
Sample = dict[str, Any]


def host_steps(sample: Sample) -> list[tuple[str, float]]:
    """The host's steps of one run as (name, monotonic s), in the order they happened."""
    return sorted(sample["host"].items(), key=lambda step: step[1])


def rows_of(samples: list[Sample]) -> list[tuple[str, list[float], list[float]]]:
    """Per step: (name, ms since the step before it, ms since the first step of its side)."""
    since_previous: dict[str, list[float]] = defaultdict(list)
    since_start: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        host = host_steps(sample)
        start = host[0][1]
        for (name, at), (_, before) in zip(host[1:], host, strict=False):
            key = HOST_LABELS.get(name, f"host: {name}")
            since_previous[key].append((at - before) * 1000)
            since_start[key].append((at - start) * 1000)
        guest = sorted(sample["guest"], key=lambda step: step[1])
        previous = 0.0
        for name, ms in guest:
            key = f"guest: {name}"
            since_previous[key].append(ms - previous)
            since_start[key].append(ms)
            previous = ms
        marks = sample["host"]
        if guest and "exit_read" in marks and "exec_sent" in marks:
            round_trip = (marks["exit_read"] - marks["exec_sent"]) * 1000
            since_previous["channel (both ways)"].append(round_trip - guest[-1][1])
    keys = list(since_previous)
    guest_keys = [key for key in keys if key.startswith("guest: ")]
    guest_keys.sort(key=lambda key: statistics.median(since_start[key]))
    host_keys = [key for key in keys if key.startswith("host: ")]
    host_keys.sort(key=lambda key: statistics.median(since_start[key]))
    # The guest's part sits between the host's EXEC written and EXIT read.
    exit_read = HOST_LABELS["exit_read"]
    split = next((i for i, key in enumerate(host_keys) if key == exit_read), len(host_keys))
    ordered = host_keys[:split] + guest_keys + ["channel (both ways)"] + host_keys[split:]
    return [
        (key, since_previous[key], since_start.get(key, []))
        for key in ordered
        if key in since_previous
    ]


def markdown(title: str, samples: list[Sample]) -> str:
    """One setting's steps as a markdown table."""
    lines = [
        f"#### {title} ({len(samples)} runs)",
        "",
        "| step | since previous p50 ms | p99 ms | since start p50 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, deltas, offsets in rows_of(samples):
        offset = f"{statistics.median(offsets):.2f}" if offsets else ""
        lines.append(
            f"| {name} | {statistics.median(deltas):.2f} | {percentile(deltas, 0.99):.2f} "
            f"| {offset} |"
        )
    totals = [(s["host"]["end"] - s["host"]["call"]) * 1000 for s in samples]
    lines.append(
        f"| **total, call to result** | **{statistics.median(totals):.2f}** | "
        f"**{percentile(totals, 0.99):.2f}** | |"
    )
    return "\n".join(lines)


def sample_of(trace: RunTrace | dict[str, Any], call: float, end: float, **more: float) -> Sample:
    """One run's sample: the trace's steps plus the caller's own ``call`` and ``end``."""
    data = trace.as_json() if isinstance(trace, RunTrace) else trace
    host = dict(data["host"]) | more | {"call": call, "end": end}
    return {"host": host, "guest": data["guest"]}


# -- (a) in process -----------------------------------------------------------------------------
async def in_process(runs: int, state_dir: Path, settle: float = 0.0) -> list[Sample]:
    """(a): paced warm runs through a Service in this process with a python pool of two.

    Each run starts ``settle`` seconds after the pool is full again.
    """
    service = Service(ServiceConfig(state_dir=state_dir, pools={"python": POOL}))
    await service.start()
    pool = service.pools["python"]
    acquired: list[float] = []
    real_acquire = pool.acquire

    async def timed_acquire(timeout: float) -> Any:
        machine = await real_acquire(timeout)
        acquired.append(time.monotonic())
        return machine

    pool.acquire = timed_acquire  # type: ignore[method-assign]
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    traces: list[RunTrace] = []
    samples = []
    try:
        with tracing(traces.append):
            for _ in range(runs):
                await wait_full(lambda: pool.status())
                await asyncio.sleep(settle)
                call = time.monotonic()
                result = await service.run(spec)
                end = time.monotonic()
                check(result.stdout, result.exit_code)
                samples.append(sample_of(traces[-1], call, end, pool_acquired=acquired[-1]))
    finally:
        await service.close()
    return samples


async def wait_full(status: Callable[[], dict[str, Any]]) -> None:
    """Wait until a pool has all its VMs ready."""
    give_up = time.monotonic() + POOL_DEADLINE
    while time.monotonic() < give_up:
        now = status()
        if now["ready"] >= now["size"]:
            return
        await asyncio.sleep(0.02)
    raise SystemExit("bench: the pool did not fill")


def check(stdout: bytes, exit_code: int) -> None:
    """Every run must print 42 and exit 0."""
    if stdout != b"42\n" or exit_code != 0:
        raise SystemExit(f"bench: the run printed {stdout!r} and exited {exit_code}")


# -- (b), (c) through a daemon ------------------------------------------------------------------
def traced_calls(
    runs: int, trace_file: Path, call: Callable[[], Any], before: Callable[[], object]
) -> list[Sample]:
    """Time ``call`` ``runs`` times; match each to the daemon's trace written meanwhile."""
    samples = []
    for _ in range(runs):
        before()
        seen = len(trace_lines(trace_file))
        start = time.monotonic()
        answer = call()
        end = time.monotonic()
        check(answer.stdout, answer.exit_code)
        new = trace_lines(trace_file)[seen:]
        mine = [t for t in map(json.loads, new) if start <= t["host"]["execute"] <= end]
        if len(mine) != 1:
            raise SystemExit(f"bench: expected one trace for the call, found {len(mine)}")
        samples.append(sample_of(mine[0], start, end))
    return samples


def trace_lines(path: Path) -> list[str]:
    """The lines of the daemon's trace file so far."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def through_daemon(runs: int, workdir: Path, pause: float) -> dict[str, list[Sample]]:
    """(b) and (c): pooled runs, then sandbox runs and execs (``pause`` s apart), one daemon."""
    trace_file = workdir / "trace.jsonl"
    os.environ[TRACE_FILE_ENV] = str(trace_file)
    try:
        daemon, socket = start_daemon(workdir, POOL)
    finally:
        del os.environ[TRACE_FILE_ENV]
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    try:
        with DaemonBackend.connect(socket, request_timeout=120) as client:
            wait_pool_full(client, POOL_DEADLINE)
            found = {
                "(b) pooled run through the daemon": traced_calls(
                    runs, trace_file, lambda: client.run(spec), lambda: wait_pool_full(client)
                )
            }
        with Sandbox.create("python", url=f"unix:{socket}") as box:

            def idle() -> None:
                time.sleep(pause)

            found["(c) sandbox run"] = traced_calls(runs, trace_file, lambda: box.run(CODE), idle)
            found['(c) sandbox exec("echo 42")'] = traced_calls(
                runs, trace_file, lambda: box.exec("echo 42"), idle
            )
    finally:
        stop_daemon(daemon)
    return found


def main() -> None:
    """Parse flags, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="runs in each setting")
    parser.add_argument("--skip-in-process", action="store_true", help="only (b) and (c)")
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds between sandbox steps (think time)"
    )
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    tables = []
    with tempfile.TemporaryDirectory(prefix="fission-trace-") as tmp:
        if not args.skip_in_process:
            samples = asyncio.run(in_process(args.runs, Path(tmp) / "service"))
            tables.append(markdown("(a) pooled run, in-process Service", samples))
        daemon_dir = Path(tmp) / "daemon"
        daemon_dir.mkdir()
        for title, samples in through_daemon(args.runs, daemon_dir, args.pause).items():
            tables.append(markdown(title, samples))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
