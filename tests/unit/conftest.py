"""Fixtures shared by the unit tests: a hermetic environment and a private image cache."""

from __future__ import annotations

from pathlib import Path

import pytest

# Variables that change what fission reads or where it writes; a developer's shell may set them.
FISSION_ENV = (
    "FISSION_ACCEL",
    "FISSION_BOOT_TIMEOUT",
    "FISSION_CACHE_DIR",
    "FISSION_DATA_DIR",
    "FISSION_JAIL",
    "FISSION_QEMU",
    "FISSION_RUNTIME_DIR",
    "FISSION_SOCKET",
)


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No FISSION_* setting leaks in, and nothing can write to the user's real cache."""
    for name in FISSION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FISSION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("FISSION_DATA_DIR", str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty image cache at a known path (``FISSION_CACHE_DIR``)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FISSION_CACHE_DIR", str(path))
    return path
