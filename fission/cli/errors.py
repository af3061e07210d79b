"""How the CLI reports fission's own errors: one line on stderr and a distinct exit code."""

from __future__ import annotations

import sys

from fission.errors import FissionError, InvalidInput

TYPE_CHECKING = False  # typing costs milliseconds at start-up (the fast path imports this)
if TYPE_CHECKING:
    from typing import NoReturn

# Like `docker run`: 125 means fission itself failed, so it is never confused with the
# program's own exit code; bad input exits 2, as usage errors do.
EXIT_INVALID_INPUT = 2
EXIT_FISSION_FAILED = 125
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def abort(error: FissionError) -> NoReturn:
    """Print ``error`` and exit with the code for its kind."""
    sys.stderr.write(f"fission: error: {error.message if hasattr(error, 'message') else error}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_INVALID_INPUT if isinstance(error, InvalidInput) else EXIT_FISSION_FAILED)


def interrupted() -> NoReturn:
    """Say that Ctrl-C (or SIGTERM) ended the run and its VM; exit 130."""
    sys.stderr.write("fission: interrupted; the VM was destroyed\n")
    raise SystemExit(EXIT_INTERRUPTED) from None
