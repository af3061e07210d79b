"""The ``fission`` command (and ``python -m fission``): the CLI, or which extra to install.

``fission run`` against a running daemon takes a fast path (``fission.cli.fast_run``: the
standard library only) and ``fission version`` answers at once; every other command, and any
``run`` the fast path is not sure of, goes to the full CLI (typer). ``pip install fission`` is
the SDK alone; the full CLI needs ``fission[cli]`` (typer, rich) and ``fission serve`` /
``fission mcp`` need ``fission[server]``. A missing one is named with the ``pip install`` that
brings it instead of a traceback.
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
    "prometheus_client": "server",
    "jinja2": "server",
    "ray": "cluster",
    "e2b": "server",
    "connectrpc": "server",
    "protobuf": "server",
}


def missing_extra_message(module: str) -> str | None:
    """How to install the extra that provides ``module``, or None if no extra does."""
    extra = EXTRA_OF.get(module.split(".")[0])
    if extra is None:
        return None
    return f"fission: this needs {module}, which comes with pip install 'fission[{extra}]'"


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        from fission.cli.fast_run import fast_run

        fast_run(args[1:])  # exits when it served the run; returns when the full CLI should
    elif args == ["version"]:
        from fission import __version__

        sys.stdout.write(f"{__version__}\n")
        return
    try:
        import fission.cli

        fission.cli.main()
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc.name or "")
        if message is None:
            raise
        sys.exit(message)


if __name__ == "__main__":
    main()
