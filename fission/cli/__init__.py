"""The ``fission`` command line: a thin adapter over the orchestrator and the image builder.

The typer application is ``fission.cli.commands`` and loads only when a command needs it:
``fission run`` against a running daemon is served by ``fission.cli.fast_run`` without it (see
docs/cli.md, "Start-up"), so importing this package costs nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up; type checkers see True
if TYPE_CHECKING:
    from typing import Any


def main() -> None:
    """Run the full command line (typer) on ``sys.argv``."""
    from fission.cli.commands import app

    app()


def __getattr__(name: str) -> Any:
    if name == "app":  # `from fission.cli import app`, as before the app had a module of its own
        from fission.cli.commands import app

        return app
    raise AttributeError(f"module 'fission.cli' has no attribute {name!r}")
