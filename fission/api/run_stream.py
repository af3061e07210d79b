"""The JSON shapes the daemon and its clients exchange (pure; shared by both sides).

A run streams newline-delimited JSON: ``{"type": "output", "stream": "stdout", "data": "..."}``
per chunk (``data_b64`` instead of ``data`` when the bytes are not UTF-8), then the closing
lines: ``{"type": "file", "path": ..., "data_b64": ...}`` per downloaded file, for ``install``
one ``{"type": "install", "cached": ..., "setup_ms": ..., "installed": ...}``, and last one
``{"type": "result", ...}`` (RunResult.to_json without the output) — or, instead of all closing
lines, one ``{"type": "error", "code": ..., "message": ...}``.
"""

from __future__ import annotations

import base64
from typing import Any

from fission.core.provision import InstallResult
from fission.core.spec import RunResult
from fission.errors import ERRORS_BY_CODE, FissionError


def output_line(stream: str, data: bytes) -> dict[str, Any]:
    """One output chunk as a JSON object."""
    try:
        return {"type": "output", "stream": stream, "data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": "output", "stream": stream, "data_b64": base64.b64encode(data).decode()}


def output_bytes(line: dict[str, Any]) -> tuple[str, bytes]:
    """The (stream, bytes) of an output line."""
    if "data_b64" in line:
        return str(line["stream"]), base64.b64decode(line["data_b64"])
    return str(line["stream"]), str(line["data"]).encode("utf-8")


def result_line(result: RunResult) -> dict[str, Any]:
    """The closing line of a run (output was streamed before it)."""
    body = result.to_json()
    del body["stdout"], body["stderr"]
    return {"type": "result", **body}


def closing_lines(outcome: RunResult | InstallResult) -> list[dict[str, Any]]:
    """What follows a run's output: its downloaded files, install facts, then its result."""
    lines: list[dict[str, Any]] = []
    result = outcome
    if isinstance(outcome, InstallResult):
        result = outcome.result
        lines.append(install_line(outcome))
    assert isinstance(result, RunResult)
    for path, data in result.files.items():
        lines.append({"type": "file", "path": path, "data_b64": base64.b64encode(data).decode()})
    lines.append(result_line(result))
    return lines


def install_line(outcome: InstallResult) -> dict[str, Any]:
    """Facts of an install: whether it came from the cache, how long set-up took."""
    return {
        "type": "install",
        "cached": outcome.cached,
        "setup_ms": round(outcome.setup_ms, 3),
        "installed": outcome.installed,
    }


def file_bytes(line: dict[str, Any]) -> tuple[str, bytes]:
    """The (guest path, bytes) of a file line."""
    return str(line["path"]), base64.b64decode(line["data_b64"], validate=True)


def error_body(error: FissionError) -> dict[str, Any]:
    """An error as JSON: its code slug and message."""
    return {"type": "error", "code": error.code, "message": error.message}


def error_from_body(body: dict[str, Any]) -> FissionError:
    """The FissionError subclass named by an error body's code."""
    cls = ERRORS_BY_CODE.get(str(body.get("code")), FissionError)
    return cls(str(body.get("message", "the daemon reported an error")))


def result_from_lines(
    result: dict[str, Any], stdout: bytes, stderr: bytes, files: dict[str, bytes] | None = None
) -> RunResult:
    """Rebuild a RunResult from its closing line, the collected output and files."""
    return RunResult(
        exit_code=int(result["exit_code"]),
        stdout=stdout,
        stderr=stderr,
        timed_out=bool(result["timed_out"]),
        oom=bool(result["oom"]),
        truncated=bool(result["truncated"]),
        signal=int(result["signal"]),
        duration_ms=float(result["duration_ms"]),
        boot_ms=float(result["boot_ms"]),
        total_ms=float(result["total_ms"]),
        files=dict(files or {}),
        checkpoint_id=str(result["checkpoint_id"]) if result.get("checkpoint_id") else None,
    )
