"""Steps in a persistent sandbox against a daemon, side by side with host ``python3 -c``.

Starts ``fission serve`` (no pool) in a temporary directory and, through the SDK's ``Sandbox``:
``Sandbox.create`` (``--creates`` times, each deleted again), then in one sandbox ``run`` of
``print(42)`` (``--runs`` times; the first run after create is its own row and is included in
the run row's p99 as well), ``exec("echo 42")`` and ``run(..., context="bench")``; then host
``python3 -c`` for the ratio the targets are stated in. Prints a table (markdown with
``--markdown``) and the targets of issue 16 (run p50 at most 1.5x host python3, p99 at most
3x; exec p50 at most 30 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_warm import start_daemon, stop_daemon
from benchlib import Row, markdown_table, percentile, print_table, time_command

from fission.sdk import Sandbox
from fission.sdk._backend import DaemonBackend

HOST_PYTHON = "/usr/bin/python3"
READY_DEADLINE = 120.0


def timed(step: Callable[[], object], check: Callable[[object], bool], runs: int) -> list[float]:
    """Wall-clock ms of ``step()`` ``runs`` times; every answer must pass ``check``."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = step()
        samples.append((time.perf_counter() - started) * 1000)
        if not check(answer):
            raise SystemExit(f"bench: unexpected answer {answer!r}")
    return samples


def printed_42(result: object) -> bool:
    """True for a RunResult that printed 42 and exited 0."""
    return getattr(result, "stdout", None) == b"42\n" and getattr(result, "exit_code", 1) == 0


def wait_daemon(socket: Path) -> None:
    """Block until the daemon answers on ``socket``."""
    give_up = time.monotonic() + READY_DEADLINE
    while time.monotonic() < give_up:
        try:
            with DaemonBackend.connect(socket, request_timeout=5) as client:
                client.pools()
            return
        except Exception:  # not listening yet
            time.sleep(0.1)
    raise SystemExit(f"bench: the daemon did not answer within {READY_DEADLINE:.0f} s")


def sandbox_rows(url: str, runs: int, creates: int) -> list[Row]:
    """create, first run, run, exec and context run in sandboxes of the daemon at ``url``."""
    create = timed(lambda: Sandbox.create("python", url=url).delete(), lambda _: True, creates)
    with Sandbox.create("python", url=url) as box:
        first = timed(lambda: box.run("print(42)"), printed_42, 1)
        run = first + timed(lambda: box.run("print(42)"), printed_42, runs - 1)
        command = timed(lambda: box.exec("echo 42"), printed_42, runs)
        context = timed(lambda: box.run("print(42)", context="bench"), printed_42, runs)
    return [
        ("Sandbox.create (+ kill)", create),
        ("first run after create", first),
        ("run print(42) (first included)", run),
        ('exec("echo 42")', command),
        ("run in a context", context),
    ]


def targets(rows: list[Row]) -> list[str]:
    """The issue's sandbox targets against this run's host python3 -c, met or not."""
    by_name = dict(rows)
    host = statistics.median(by_name["host python3 -c"])
    run = by_name["run print(42) (first included)"]
    command = by_name['exec("echo 42")']
    checks = [
        ("run p50", statistics.median(run), 1.5 * host),
        ("run p99 (first run included)", percentile(run, 0.99), 3 * host),
        ("exec p50", statistics.median(command), 30.0),
    ]
    return [
        f"- {name}: {value:.1f} ms, target at most {bound:.1f} ms: "
        f"**{'met' if value <= bound else 'not met'}**"
        for name, value, bound in checks
    ]


def main() -> None:
    """Parse flags, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="runs, execs, context runs")
    parser.add_argument("--creates", type=int, default=5, help="sandboxes created and deleted")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.runs < 2 or args.creates < 1:
        parser.error("--runs must be at least 2, --creates at least 1")
    with tempfile.TemporaryDirectory(prefix="fission-bench-") as tmp:
        daemon, socket = start_daemon(Path(tmp), 0)
        try:
            wait_daemon(socket)
            rows = sandbox_rows(f"unix:{socket}", args.runs, args.creates)
        finally:
            stop_daemon(daemon)
    rows.append(
        ("host python3 -c", asyncio.run(time_command([HOST_PYTHON, "-c", "print(42)"], args.runs)))
    )
    title = "python in a persistent sandbox, through the daemon (wall-clock ms)"
    if args.markdown:
        print("\n".join([f"### {title}", "", *markdown_table(rows), "", *targets(rows)]))
    else:
        print_table(title, rows)
        print("\n".join(targets(rows)))


if __name__ == "__main__":
    main()
