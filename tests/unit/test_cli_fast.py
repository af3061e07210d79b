"""`fission run`'s fast path: it takes only what the full command would treat the same, speaks
the daemon's HTTP, prints and exits as the full command does, and hands everything else over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from typer.testing import CliRunner

import fission
import fission.cli.run
from fission.api.run_stream import error_body, output_line, result_line
from fission.cli import app
from fission.cli.fast_run import (
    Unsure,
    decimal_number,
    fast_run,
    parse_args,
    request_body,
    whole_number,
)
from fission.config import daemon_socket, daemon_socket_name
from fission.core.languages import resolve_language
from fission.core.spec import RunResult, RunSpec
from fission.errors import Busy, ImagesNotBuilt, LimitOutOfRange, UnknownLanguage
from tests.unit.fake_daemon import (
    Answer,
    chunked,
    fake_daemon,
    ndjson_lines,
    refusal,
    sized,
    until_close,
)

RESULT = RunResult(3, b"hi\n", b"oops\n", False, False, False, 0, 12.3456, 0.5, 20.25)


@pytest.fixture(autouse=True)
def no_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FISSION_URL", raising=False)
    monkeypatch.delenv("FISSION_API_KEY", raising=False)


@pytest.fixture
def socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "d.sock"
    monkeypatch.setenv("FISSION_SOCKET", str(path))
    return path


def streamed(result: RunResult = RESULT) -> bytes:
    """The NDJSON a run of ``result`` streams: its output lines, then its result line."""
    lines = [output_line("stdout", result.stdout), output_line("stderr", result.stderr)]
    return ndjson_lines(*lines, result_line(result))


def exit_code(argv: list[str]) -> int | None:
    """The code fast_run exited with, or None when it handed the command over."""
    try:
        fast_run(argv)
    except SystemExit as exited:
        return int(exited.code or 0)
    return None


# -- what it takes and what it leaves to the full command ---------------------------------------
TAKEN = [
    ["print(1)"],
    ["--lang", "bash", "echo hi"],
    ["-l", "JavaScript", "console.log(1)"],
    ["--lang=node", "--timeout=2.5", "console.log(1)"],
    ["x", "--memory", "512", "--cpus", "1", "--disk", "1024", "--pids", "64"],
    ["--output-limit", "0.5", "--timeout", "007", "x"],
    ["-e", "A=1", "--env", "B=two=2", "--env=C=", "x"],
    ["--network", "--allow-host", "example.com", "--allow-host=*.pypi.org:443", "x"],
    ["--json", "--stdin", "-i", "x"],
    ["--timeout", "-5", "x"],  # typer reads it as -5 too; the daemon then refuses it
    [""],
]
LEFT = [
    [],
    ["a", "b"],
    ["--help"],
    ["x", "--no-daemon"],
    ["x", "--upload", "a:/b"],
    ["x", "--download", "/b:a"],
    ["-lbash", "x"],
    ["-l=bash", "x"],
    ["--json=1", "x"],
    ["--", "x"],
    ["x", "--lang"],
    ["x", "--timeout", "1e3"],
    ["x", "--timeout", "inf"],
    ["x", "--timeout", " 5"],
    ["x", "--memory", "1_000"],
    ["x", "--memory", "1.0"],
    ["x", "--memory", "+5"],
    ["x", "--timeout", "2."],
    ["x", "--memory", "\u0665"],  # an Arabic-Indic digit: typer's int() would take it
    ["x", "--env", "NOEQUALS"],
    ["x", "--env", "1BAD=x"],
    ["x", "--env", "\u00e9T\u00c9=x"],
    ["x", "--allow-host", "example.com"],
    ["x", "--file", "/nonexistent/prog.py"],
    ["x", "--bogus"],
    ["-"],
]


@pytest.mark.parametrize("argv", TAKEN)
def test_it_takes_the_common_options(argv: list[str]) -> None:
    request_body(parse_args(argv))


@pytest.mark.parametrize("argv", LEFT)
def test_it_leaves_anything_else_to_the_full_command(argv: list[str]) -> None:
    with pytest.raises(Unsure):
        request_body(parse_args(argv))


@pytest.mark.parametrize("argv", [a for a in TAKEN if "-5" not in a])
def test_what_it_sends_is_the_run_the_full_command_makes(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RunSpec] = []

    class Recorder:
        def run(self, spec: RunSpec, *rest: Any) -> RunResult:
            seen.append(spec)
            return RESULT

        def close(self) -> None:
            pass

    monkeypatch.setattr(fission.cli.run, "open_backend", lambda **_: Recorder())
    outcome = CliRunner().invoke(app, ["run", *argv], input=b"input bytes")
    assert outcome.exit_code == RESULT.exit_code, outcome.output
    options = parse_args(argv)
    body = request_body(options)
    (spec,) = seen
    assert resolve_language(body["language"]) == spec.language
    assert body["code"] == spec.code
    limits = {key: body[key] for key in ("timeout", "memory_mb", "cpus", "disk_mb", "pids")}
    assert limits == {key: getattr(spec.limits, key) for key in limits}
    assert body["output_limit_mb"] == spec.limits.output_limit_mb
    assert body["env"] == spec.env
    assert (spec.stdin == b"input bytes") is options["stdin"]
    network = body.get("network", {"enabled": False, "allow_hosts": []})
    assert network == {
        "enabled": spec.network.enabled,
        "allow_hosts": [str(rule) for rule in spec.network.allow],
    }


TYPER_INT, TYPER_FLOAT = TypeAdapter(int), TypeAdapter(float)  # how typer reads these options


@settings(deadline=None)  # a busy machine is not a failure
@given(st.from_regex(r"-?[0-9]{1,7}", fullmatch=True))
def test_whole_numbers_read_as_typer_reads_them(text: str) -> None:
    assert whole_number(text) == TYPER_INT.validate_python(text)


@settings(deadline=None)
@given(st.from_regex(r"-?[0-9]{1,5}(\.[0-9]{1,5})?", fullmatch=True))
def test_decimal_numbers_read_as_typer_reads_them(text: str) -> None:
    assert decimal_number(text) == TYPER_FLOAT.validate_python(text)


def test_a_program_file_is_read_as_the_full_command_reads_it(tmp_path: Path) -> None:
    program = tmp_path / "main.py"
    program.write_bytes("print('\u00e9')\r\nprint(2)\n".encode())
    body = request_body(parse_args(["--file", str(program)]))
    assert body["code"] == fission.cli.run.read_code(None, program)


# -- against a daemon ----------------------------------------------------------------------------
def test_a_run_streams_prints_and_exits_with_the_program_code(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with fake_daemon(socket_path, lambda _: chunked(streamed())) as daemon:
        assert exit_code(["--lang", "bash", "-e", "A=1", "echo hi"]) == 3
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"hi\n", b"oops\n")
    (request,) = daemon.requests
    assert (request.method, request.path) == ("POST", "/v1/run")
    assert request.headers["accept"] == "application/x-ndjson"
    body = request.json()
    assert (body["language"], body["code"], body["env"]) == ("bash", "echo hi", {"A": "1"})
    assert "stdin_b64" not in body and "network" not in body


@pytest.mark.parametrize("framing", [chunked, sized, until_close])
def test_json_is_the_full_commands_json_whatever_the_framing(
    framing: Any, socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with fake_daemon(socket_path, lambda _: framing(streamed())):
        assert exit_code(["--json", "x"]) == 3
    out, err = capsysbinary.readouterr()
    assert out == json.dumps(RESULT.to_json()).encode() + b"\n"
    assert err == b""


def test_notes_name_the_option_as_the_full_command_does(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cut = RunResult(124, b"", b"", True, True, True, 0, 1.0, 0.0, 2.0)
    with fake_daemon(socket_path, lambda _: chunked(streamed(cut))):
        assert exit_code(["--timeout", "2", "--memory", "64", "--output-limit", "0.5", "x"]) == 124
    err = capsysbinary.readouterr().err
    assert err == (
        b"fission: timed out after 2 s (--timeout)\n"
        b"fission: killed: out of memory (--memory 64 MB)\n"
        b"fission: output truncated at 0.5 MB (--output-limit)\n"
    )


def test_output_that_is_not_utf8_arrives_as_bytes(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    raw = RunResult(0, b"\xff\xfe\n", b"", False, False, False, 0, 1.0, 0.0, 2.0)
    with fake_daemon(socket_path, lambda _: chunked(streamed(raw))):
        assert exit_code(["x"]) == 0
    assert capsysbinary.readouterr().out == b"\xff\xfe\n"


def test_stdin_is_sent(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(sys, "stdin", _stdin(b"shout\n"))
    with fake_daemon(socket_path, lambda _: chunked(streamed())) as daemon:
        exit_code(["-i", "x"])
    assert daemon.requests[0].json()["stdin_b64"] == "c2hvdXQK"


def _stdin(data: bytes) -> Any:
    import io

    return io.TextIOWrapper(io.BytesIO(data))


def test_invalid_input_is_handed_over_with_the_stdin_it_read(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _stdin(b"keep me"))
    refused = UnknownLanguage("unknown language 'cobol'")
    with fake_daemon(socket_path, lambda _: refusal(refused)) as daemon:
        assert exit_code(["-i", "--lang", "cobol", "x"]) is None
    assert len(daemon.requests) == 1
    assert sys.stdin.buffer.read() == b"keep me"  # the full command reads what was read


def test_a_limit_refused_by_the_daemon_is_handed_over(socket_path: Path) -> None:
    with fake_daemon(socket_path, lambda _: refusal(LimitOutOfRange("--memory 1"))):
        assert exit_code(["--memory", "1", "x"]) is None


@pytest.mark.parametrize("error", [Busy("no VM free within 10 s"), ImagesNotBuilt("build them")])
def test_other_refusals_are_reported_as_the_full_command_does(
    error: Any, socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with fake_daemon(socket_path, lambda _: refusal(error)):
        assert exit_code(["x"]) == 125
    assert capsysbinary.readouterr().err == f"fission: error: {error.message}\n".encode()


def test_a_refusal_that_is_not_fissions_is_handed_over(socket_path: Path) -> None:
    with fake_daemon(socket_path, lambda _: sized(b"oops", "502 Bad Gateway", "text/plain")):
        assert exit_code(["x"]) is None


def test_an_error_line_ends_the_run_with_its_code(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    failed = ndjson_lines(output_line("stdout", b"partial\n"), error_body(Busy("gone")))
    with fake_daemon(socket_path, lambda _: chunked(failed)):
        assert exit_code(["x"]) == 125
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"partial\n", b"fission: error: gone\n")


@pytest.mark.parametrize("timeout", ["-100", "99999999999999999999"])
def test_a_timeout_out_of_range_is_left_to_the_daemon(timeout: str, socket_path: Path) -> None:
    with fake_daemon(socket_path, lambda _: refusal(LimitOutOfRange("--timeout"))) as daemon:
        assert exit_code(["--timeout", timeout, "x"]) is None
    assert daemon.requests[0].json()["timeout"] == float(timeout)


def test_an_answer_that_is_not_http_is_a_lost_connection(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with fake_daemon(socket_path, lambda _: Answer(b"garbage\r\n\r\n", close=True)):
        assert exit_code(["x"]) == 125
    assert b"fission: error: lost the connection to the daemon" in capsysbinary.readouterr().err


def test_a_stream_without_a_result_is_an_error(
    socket_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with fake_daemon(socket_path, lambda _: until_close(b"")):
        assert exit_code(["x"]) == 125
    assert b"ended the stream without a result" in capsysbinary.readouterr().err


def test_no_daemon_hands_over_without_reading_stdin(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _stdin(b"untouched"))
    assert exit_code(["-i", "x"]) is None  # no socket at all
    socket_path.touch()  # a socket file nobody accepts on
    assert exit_code(["-i", "x"]) is None
    assert sys.stdin.buffer.read() == b"untouched"


def test_a_tcp_daemon_is_the_full_commands(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_URL", "http://127.0.0.1:1")
    with fake_daemon(socket_path, lambda _: Answer(b"")) as daemon:
        assert exit_code(["x"]) is None
    assert daemon.requests == []


def test_a_unix_url_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "named.sock"
    monkeypatch.setenv("FISSION_URL", f"unix:{named}")
    with fake_daemon(named, lambda _: chunked(streamed())) as daemon:
        assert exit_code(["x"]) == 3
    assert len(daemon.requests) == 1


# -- the socket it looks for and what it loads ---------------------------------------------------
@pytest.mark.parametrize(
    "env",
    [
        {"FISSION_SOCKET": "/elsewhere/d.sock"},
        {"FISSION_RUNTIME_DIR": "{tmp}/rt"},
        {"XDG_RUNTIME_DIR": "{tmp}"},
        {"XDG_RUNTIME_DIR": "{tmp}/missing"},
    ],
)
def test_the_socket_is_the_full_commands(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FISSION_SOCKET", "FISSION_RUNTIME_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert daemon_socket_name() == str(daemon_socket())


HEAVY = ("typer", "rich", "pydantic", "httpx", "h11", "http", "fission.sdk", "fission.core")
LOADED_BY_THE_FAST_PATH = """
import sys
before = set(sys.modules)
from fission.__main__ import main
import fission.cli.fast_run, fission.config
fission.config.daemon_socket_name()
new = set(sys.modules) - before
print(sorted(m for m in new if m.split(".")[0] in {heavy} or m.startswith({heavy})))
print(sorted(m for m in new if m in ("typing", "pathlib", "socket", "dataclasses", "asyncio")))
"""


def test_the_fast_path_loads_nothing_heavy(tmp_path: Path) -> None:
    code = LOADED_BY_THE_FAST_PATH.format(heavy=HEAVY)
    env = {**os.environ, "FISSION_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert proc.stdout.splitlines() == ["[]", "[]"]


def test_version_answers_without_the_full_cli() -> None:
    code = "import sys; sys.argv = ['fission', 'version']\nfrom fission.__main__ import main\n"
    code += (
        "main()\nprint(sorted(m for m in sys.modules if m.startswith(('typer', 'fission.cli'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == [fission.__version__, "[]"]
