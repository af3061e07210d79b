"""RunSpec validation and the JSON shape of RunResult."""

from __future__ import annotations

import json

import pytest

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.spec import MAX_CODE_BYTES, MAX_STDIN_BYTES, RunResult, RunSpec
from fission.errors import InvalidInput

PYTHON = resolve_language("python")


def result(**changes: object) -> RunResult:
    base: dict[str, object] = dict(
        exit_code=1,
        stdout=b"out\n",
        stderr=b"err\n",
        timed_out=False,
        oom=False,
        truncated=False,
        signal=0,
        duration_ms=12.3456,
        boot_ms=100.0,
        total_ms=112.3456,
    )
    base.update(changes)
    return RunResult(**base)  # type: ignore[arg-type]


def test_a_plain_spec_takes_default_limits() -> None:
    spec = RunSpec(PYTHON, "print(1)")
    assert spec.limits == Limits() and spec.env == {} and spec.stdin is None


def test_code_of_exactly_the_limit_is_accepted() -> None:
    assert len(RunSpec(PYTHON, "x" * MAX_CODE_BYTES).code) == MAX_CODE_BYTES


def test_code_over_the_limit_is_refused() -> None:
    with pytest.raises(InvalidInput, match=f"{MAX_CODE_BYTES + 1} bytes"):
        RunSpec(PYTHON, "x" * (MAX_CODE_BYTES + 1))


def test_the_code_limit_counts_utf8_bytes_not_characters() -> None:
    two_byte = "\u00e9"
    RunSpec(PYTHON, two_byte * (MAX_CODE_BYTES // 2))
    with pytest.raises(InvalidInput, match="bytes"):
        RunSpec(PYTHON, two_byte * (MAX_CODE_BYTES // 2 + 1))


@pytest.mark.parametrize("code", ["\0", "a\0b", "print(1)\n\0"])
def test_code_with_a_nul_byte_is_refused(code: str) -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        RunSpec(PYTHON, code)


def test_stdin_over_the_limit_is_refused() -> None:
    RunSpec(PYTHON, "", stdin=b"x" * MAX_STDIN_BYTES)
    with pytest.raises(InvalidInput, match="stdin"):
        RunSpec(PYTHON, "", stdin=b"x" * (MAX_STDIN_BYTES + 1))


@pytest.mark.parametrize("code", ["print('\udcff')", "\ud800"])
def test_code_that_cannot_be_sent_is_refused_up_front(code: str) -> None:
    # `fission run $'\xff'` gives Python the argument "\udcff" (surrogateescape).
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        RunSpec(PYTHON, code)


@pytest.mark.parametrize("env", [{"A": "\udcff"}, {"\ud800": "x"}])
def test_env_that_cannot_be_sent_is_refused_up_front(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="env"):
        RunSpec(PYTHON, "print(1)", env=env)


EXPECTED_KEYS = {"stdout", "stderr", "exit_code", "timed_out", "oom", "duration_ms", "truncated"}


def test_result_json_has_every_documented_key() -> None:
    body = result().to_json()
    assert set(body) >= EXPECTED_KEYS
    assert body["stdout"] == "out\n" and body["stderr"] == "err\n"
    assert body["exit_code"] == 1 and body["duration_ms"] == 12.346
    assert body["timed_out"] is False and body["oom"] is False and body["truncated"] is False


@pytest.mark.parametrize("flag", ["timed_out", "oom", "truncated"])
def test_result_json_flags(flag: str) -> None:
    body = result(**{flag: True}).to_json()
    assert body[flag] is True
    assert [key for key in ("timed_out", "oom", "truncated") if body[key]] == [flag]


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"\xffok", "\ufffdok"),
        (b"\xc3", "\ufffd"),
        (b"ok\xc3\x28", "ok\ufffd("),
        (b"\xe2\x82\xac", "\u20ac"),
        (b"", ""),
    ],
)
def test_result_json_replaces_invalid_utf8(raw: bytes, text: str) -> None:
    body = result(stdout=raw, stderr=raw).to_json()
    assert body["stdout"] == text and body["stderr"] == text
    assert json.loads(json.dumps(body)) == body
