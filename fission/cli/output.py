"""How a run's end reaches the terminal, for both ways ``fission run`` runs (stdlib only).

``fission.cli.run`` (the full command) and ``fission.cli.fast_run`` (the fast path against a
running daemon) print through these, so output, notes and exit codes are the same either way.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing costs milliseconds at start-up; type checkers see True
if TYPE_CHECKING:
    from typing import NoReturn


class LiveOutput:
    """Writes output chunks to this process's stdout and stderr as they arrive."""

    def __init__(self) -> None:
        self.closed: set[str] = set()

    def __call__(self, stream: str, data: bytes) -> None:
        if stream in self.closed:
            return
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        try:
            target.write(data)
            target.flush()
        except BrokenPipeError:
            self.closed.add(stream)


def end_notes(
    *,
    timed_out: bool,
    oom: bool,
    truncated: bool,
    timeout: float,
    memory_mb: int,
    output_limit_mb: float,
) -> list[str]:
    """One line per way the run was cut short, naming the option that changes it."""
    notes = []
    if timed_out:
        notes.append(f"timed out after {timeout:g} s (--timeout)")
    if oom:
        notes.append(f"killed: out of memory (--memory {memory_mb} MB)")
    if truncated:
        notes.append(f"output truncated at {output_limit_mb:g} MB (--output-limit)")
    return notes


def finish(exit_code: int, json_line: str | None, notes: list[str]) -> NoReturn:
    """Print ``json_line`` (``--json``) or else the notes on stderr; exit with ``exit_code``."""
    if json_line is not None:
        sys.stdout.write(json_line + "\n")
    else:
        for note in notes:
            sys.stderr.write(f"fission: {note}\n")
    sys.stdout.flush()
    raise SystemExit(exit_code)
