"""The `fission` command as a user types it: output, exit codes, --json, --file, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import fission_cli

pytestmark = pytest.mark.vm


def test_run_prints_output_and_exits_with_the_program_code() -> None:
    proc = fission_cli(
        "run", "--lang", "python", "print('Hello from isolation!'); raise SystemExit(7)"
    )
    assert proc.stdout == b"Hello from isolation!\n"
    assert proc.returncode == 7


def test_javascript_alias_and_file(tmp_path: Path) -> None:
    script = tmp_path / "hello.js"
    script.write_text("console.log(6 * 7)\n")
    proc = fission_cli("run", "--lang", "javascript", "--file", str(script))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"42\n"


def test_json_output() -> None:
    proc = fission_cli(
        "run",
        "--lang",
        "bash",
        "--json",
        "--env",
        "WHO=world",
        'echo "hello $WHO"; echo oops >&2; exit 4',
    )
    assert proc.returncode == 4
    result = json.loads(proc.stdout)
    assert result["stdout"] == "hello world\n"
    assert result["stderr"] == "oops\n"
    assert result["exit_code"] == 4
    assert result["timed_out"] is False and result["oom"] is False and result["truncated"] is False
    assert result["duration_ms"] > 0


def test_timeout_exits_124_and_says_so() -> None:
    proc = fission_cli("run", "--timeout", "2", "import time; time.sleep(60)")
    assert proc.returncode == 124
    assert b"timed out after 2 s (--timeout)" in proc.stderr


def test_stdin_flag_passes_input() -> None:
    proc = fission_cli("run", "--lang", "bash", "--stdin", "tr a-z A-Z", stdin=b"shout\n")
    assert proc.stdout == b"SHOUT\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--lang", "cobol", "x"], b"unknown language 'cobol': choose one of python"),
        (["run", "--file", "/nonexistent/prog.py"], b"--file /nonexistent/prog.py: no such file"),
        (["run", "--memory", "1", "x"], b"--memory 1 is out of range: use 32 to 16384 MB"),
        (["run", "--timeout", "0", "x"], b"--timeout 0 is out of range"),
        (["run", "--cpus", "999", "x"], b"--cpus 999"),
        (["run", "--env", "NOEQUALS", "x"], b"--env 'NOEQUALS' is not KEY=VALUE"),
        (["run"], b"give the code as an argument or with --file PATH"),
    ],
)
def test_bad_input_is_refused_clearly(args: list[str], message: bytes) -> None:
    proc = fission_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_images_not_built_names_the_command(tmp_path: Path) -> None:
    proc = fission_cli("run", "print(1)", env={"FISSION_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 125
    assert b"fission images build python" in proc.stderr


def test_qemu_missing_is_reported(tmp_path: Path) -> None:
    proc = fission_cli("run", "print(1)", env={"FISSION_QEMU": str(tmp_path / "no-qemu")})
    assert proc.returncode == 125
    assert b"FISSION_QEMU" in proc.stderr and b"qemu-system-x86_64" in proc.stderr


def test_images_list_json() -> None:
    proc = fission_cli("images", "list", "--json")
    assert proc.returncode == 0
    listing = json.loads(proc.stdout)
    assert {row["language"]: row["status"] for row in listing["images"]} == {
        "python": "ready",
        "node": "ready",
        "bash": "ready",
        "go": "ready",
    }
    assert listing["kernel"].startswith("linux-image-")
