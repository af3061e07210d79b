"""What a caller asks for (RunSpec) and what it gets back (RunResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fission.core.languages import Language
from fission.core.limits import Limits
from fission.errors import InvalidInput
from fission.net.policy import NetworkPolicy

MAX_CODE_BYTES = 16 * 1024 * 1024
MAX_STDIN_BYTES = 16 * 1024 * 1024


def _check_text(what: str, text: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates, e.g. from undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} is not valid UTF-8 text (at character {exc.start}): "
            "pass files with non-UTF-8 bytes through --file or stdin"
        ) from exc


@dataclass(frozen=True)
class RunSpec:
    """One one-shot run: a program in a language, under limits, with env, stdin and network."""

    language: Language
    code: str
    limits: Limits = field(default_factory=Limits)
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    # A built template's name: the run starts from its snapshot (``core.template_build``).
    template: str | None = None

    def __post_init__(self) -> None:
        _check_text("the program", self.code)
        for key, value in self.env.items():
            _check_text(f"env {key!r}", key + value)
        size = len(self.code.encode("utf-8"))
        if size > MAX_CODE_BYTES:
            raise InvalidInput(
                f"the program is {size} bytes; the most fission takes is "
                f"{MAX_CODE_BYTES} (write larger data to a file in the sandbox)"
            )
        if "\0" in self.code:
            raise InvalidInput("the program holds a NUL byte")
        if self.stdin is not None and len(self.stdin) > MAX_STDIN_BYTES:
            raise InvalidInput(f"stdin is {len(self.stdin)} bytes; the most is {MAX_STDIN_BYTES}")


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what it printed (up to the output cap)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    oom: bool
    truncated: bool
    signal: int
    duration_ms: float
    boot_ms: float
    total_ms: float
    # Files read out of the VM after the run (``downloads``), by guest path; not in to_json.
    files: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    # The checkpoint taken right after this step (``checkpoint=True`` in a sandbox), if any.
    checkpoint_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (output decoded as UTF-8, bad bytes replaced)."""
        return {
            "stdout": self.stdout.decode("utf-8", errors="replace"),
            "stderr": self.stderr.decode("utf-8", errors="replace"),
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "oom": self.oom,
            "truncated": self.truncated,
            "signal": self.signal,
            "duration_ms": round(self.duration_ms, 3),
            "boot_ms": round(self.boot_ms, 3),
            "total_ms": round(self.total_ms, 3),
        } | ({"checkpoint_id": self.checkpoint_id} if self.checkpoint_id else {})
