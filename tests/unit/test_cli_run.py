"""`fission run`: where the program text comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.cli.run import read_code
from fission.errors import InvalidInput


def test_code_from_the_argument() -> None:
    assert read_code("print(1)", None) == "print(1)"
    assert read_code("", None) == ""


def test_code_from_a_file(tmp_path: Path) -> None:
    program = tmp_path / "main.py"
    program.write_text("print('\u00e9\u20ac')\n", encoding="utf-8")
    assert read_code(None, program) == "print('\u00e9\u20ac')\n"


@pytest.mark.parametrize("code", [None, "x"])
def test_exactly_one_source(tmp_path: Path, code: str | None) -> None:
    program = tmp_path / "main.py"
    program.write_text("print(1)")
    file = program if code is not None else None
    with pytest.raises(InvalidInput, match="one of the two"):
        read_code(code, file)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file") as caught:
        read_code(None, tmp_path / "missing.py")
    assert "missing.py" in str(caught.value)


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is a directory"):
        read_code(None, tmp_path)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"print('\xe9')", b"ok\xc3\x28"])
def test_a_file_that_is_not_utf8(tmp_path: Path, data: bytes) -> None:
    program = tmp_path / "latin1.py"
    program.write_bytes(data)
    with pytest.raises(InvalidInput, match="not UTF-8"):
        read_code(None, program)


def test_other_os_errors_become_invalid_input(tmp_path: Path) -> None:
    # A path through a regular file: ENOTDIR, neither "missing" nor "a directory".
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(InvalidInput, match="--file"):
        read_code(None, plain / "main.py")
