"""Where fission keeps its files: the image cache, the per-VM runtime dirs and its data.

Each rule works on strings, and pathlib and platformdirs load only when a Path is asked for:
``fission run``'s fast path needs the daemon's socket alone (``daemon_socket_name``) and starts
in a few milliseconds without them (docs/cli.md, "Start-up").
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds at start-up; type checkers see True
if TYPE_CHECKING:
    from pathlib import Path


def as_path(text: str) -> Path:
    """``text`` as a Path (pathlib is loaded on first use)."""
    from pathlib import Path

    return Path(text)


def cache_dir() -> Path:
    """Root of the image cache (``FISSION_CACHE_DIR`` overrides the user cache dir)."""
    override = os.environ.get("FISSION_CACHE_DIR")
    if override:
        return as_path(override)
    import platformdirs

    return as_path(platformdirs.user_cache_dir("fission"))


def runtime_dir_name() -> str:
    """``runtime_dir`` as a string, created like it."""
    override = os.environ.get("FISSION_RUNTIME_DIR")
    if override:
        path = override
    elif os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "fission")
    else:
        path = f"/tmp/fission-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def runtime_dir() -> Path:
    """Root of the per-VM directories: sockets, logs and disk overlays (``FISSION_RUNTIME_DIR``).

    Unix socket paths are limited to 107 bytes, so the default is short: the user's runtime dir
    when it exists, else ``/tmp/fission-<uid>``.
    """
    return as_path(runtime_dir_name())


def use_runtime_dir(path: Path) -> None:
    """Make this process put its VM directories under ``path`` (the daemon's state dir)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["FISSION_RUNTIME_DIR"] = str(path)


def daemon_socket_name() -> str:
    """``daemon_socket`` as a string."""
    override = os.environ.get("FISSION_SOCKET")
    return override if override else os.path.join(runtime_dir_name(), "fission.sock")


def daemon_socket() -> Path:
    """Where `fission serve` listens by default and `fission run` looks for it."""
    return as_path(daemon_socket_name())


def daemon_state_dir() -> Path:
    """Where `fission serve` keeps its journal and VMs by default (one daemon per state dir)."""
    return as_path(runtime_dir_name()) / "daemon"


def data_dir() -> Path:
    """Root of fission's durable state, e.g. the key and audit database (``FISSION_DATA_DIR``)."""
    override = os.environ.get("FISSION_DATA_DIR")
    if override:
        return as_path(override)
    import platformdirs

    return as_path(platformdirs.user_data_dir("fission"))
