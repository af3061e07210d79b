"""The ``fission`` command (and ``python -m fission``): the CLI, or which extra to install.

``pip install fission`` is the SDK alone; the command needs ``fission[cli]`` (typer, rich) and
``fission serve`` / ``fission mcp`` need ``fission[server]``. A missing one is named with the
``pip install`` that brings it instead of a traceback.
"""

from __future__ import annotations

import sys

# Top-level import names of each extra's packages (pyproject.toml; test_packaging keeps in step).
EXTRA_OF: dict[str, str] = {
    "typer": "cli",
    "rich": "cli",
    "fastapi": "server",
    "uvicorn": "server",
    "pydantic": "server",
    "mcp": "server",
    "mcp_types": "server",
    "grpc": "server",
    "google": "server",
}


def missing_extra_message(module: str) -> str | None:
    """How to install the extra that provides ``module``, or None if no extra does."""
    extra = EXTRA_OF.get(module.split(".")[0])
    if extra is None:
        return None
    return f"fission: this needs {module}, which comes with pip install 'fission[{extra}]'"


def main() -> None:
    """Console-script entry point."""
    try:
        from fission.cli import main as cli_main

        cli_main()
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc.name or "")
        if message is None:
            raise
        sys.exit(message)


if __name__ == "__main__":
    main()
