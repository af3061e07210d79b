"""Hello world, exit codes, stderr, streaming, env and stdin in each language, in real VMs."""

from __future__ import annotations

import pytest

from tests.integration.helpers import run_code

pytestmark = pytest.mark.vm

HELLO = {
    "python": "print('Hello from isolation!')",
    "node": "console.log('Hello from isolation!')",
    "bash": "echo 'Hello from isolation!'",
}
FAIL_WITH_STDERR = {
    "python": "import sys\nprint('to stderr', file=sys.stderr)\nsys.exit(3)",
    "node": "console.error('to stderr'); process.exit(3)",
    "bash": "echo 'to stderr' >&2; exit 3",
}


@pytest.mark.parametrize("language", sorted(HELLO))
async def test_hello_world(language: str) -> None:
    result = await run_code(language, HELLO[language])
    assert result.stdout == b"Hello from isolation!\n"
    assert result.stderr == b""
    assert result.exit_code == 0
    assert not (result.timed_out or result.oom or result.truncated)


@pytest.mark.parametrize("language", sorted(FAIL_WITH_STDERR))
async def test_exit_code_and_stderr(language: str) -> None:
    result = await run_code(language, FAIL_WITH_STDERR[language])
    assert result.exit_code == 3
    assert result.stderr == b"to stderr\n"
    assert result.stdout == b""


async def test_output_streams_live_in_order() -> None:
    events: list[tuple[float, str, bytes]] = []
    code = (
        "import sys, time\n"
        "print('first')\n"
        "time.sleep(1.0)\n"
        "print('second', file=sys.stderr)\n"
        "time.sleep(1.0)\n"
        "print('third')\n"
    )
    result = await run_code("python", code, events=events)
    assert result.exit_code == 0
    # Merge consecutive chunks of one stream (an unbuffered print may write in pieces),
    # keeping the arrival time of each group's first chunk.
    groups: list[tuple[float, str, bytes]] = []
    for at, stream, data in events:
        if groups and groups[-1][1] == stream:
            groups[-1] = (groups[-1][0], stream, groups[-1][2] + data)
        else:
            groups.append((at, stream, data))
    assert [(stream, data) for _, stream, data in groups] == [
        ("stdout", b"first\n"), ("stderr", b"second\n"), ("stdout", b"third\n")]
    # Live, not at exit: the groups arrived as far apart as the program slept.
    assert groups[1][0] - groups[0][0] > 0.7
    assert groups[2][0] - groups[1][0] > 0.7


async def test_signal_death_is_reported() -> None:
    result = await run_code("bash", "kill -TERM $$")
    assert result.signal == 15
    assert result.exit_code == 128 + 15


async def test_env_is_only_what_was_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_TEST_HOST_SECRET", "must-not-leak")
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    result = await run_code("python", code, env={"GREETING": "hi there"})
    import json

    env = json.loads(result.stdout)
    assert env["GREETING"] == "hi there"
    assert "FISSION_TEST_HOST_SECRET" not in env
    assert env["HOME"] == "/home/sandbox"
    assert not any("must-not-leak" in value for value in env.values())


async def test_stdin_reaches_the_program() -> None:
    data = b"".join(b"line %d\n" % i for i in range(20000))  # ~200 KB: several STDIN frames
    code = "import sys, hashlib; d = sys.stdin.buffer.read(); print(len(d), hashlib.sha256(d).hexdigest())"
    result = await run_code("python", code, stdin=data)
    import hashlib

    assert result.stdout.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]


async def test_pandas_groupby_on_a_csv_written_in_the_vm() -> None:
    from pathlib import Path

    code = Path(__file__).resolve().parents[2].joinpath("examples/data_analysis.py").read_text()
    result = await run_code("python", code, timeout=120)
    assert result.exit_code == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert "north    195" in lines
    assert "south    140" in lines
    assert "total units: 335" in lines
