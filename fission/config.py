"""Where fission keeps its files: the image cache, the per-VM runtime dirs and its data."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Root of the image cache (``FISSION_CACHE_DIR`` overrides the user cache dir)."""
    override = os.environ.get("FISSION_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("fission"))


def runtime_dir() -> Path:
    """Root of the per-VM directories: sockets, logs and disk overlays (``FISSION_RUNTIME_DIR``).

    Unix socket paths are limited to 107 bytes, so the default is short: the user's runtime dir
    when it exists, else ``/tmp/fission-<uid>``.
    """
    override = os.environ.get("FISSION_RUNTIME_DIR")
    if override:
        path = Path(override)
    elif os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fission"
    else:
        path = Path(f"/tmp/fission-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def use_runtime_dir(path: Path) -> None:
    """Make this process put its VM directories under ``path`` (the daemon's state dir)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["FISSION_RUNTIME_DIR"] = str(path)


def daemon_socket() -> Path:
    """Where `fission serve` listens by default and `fission run` looks for it."""
    override = os.environ.get("FISSION_SOCKET")
    return Path(override) if override else runtime_dir() / "fission.sock"


def data_dir() -> Path:
    """Root of fission's durable state, e.g. the key and audit database (``FISSION_DATA_DIR``)."""
    override = os.environ.get("FISSION_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir("fission"))
