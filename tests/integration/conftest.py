"""Fixtures for tests that boot real microVMs.

Every test here runs with FISSION_RUNTIME_DIR pointing at a directory of its own session; after
each test the ``no_leftovers`` fixture checks that no VMM process of this session and no VM
directory remain, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fission.errors import FissionError
from fission.images.store import image_set

LANGUAGES = ("python", "node", "bash")
FISSION = str(Path(sys.executable).with_name("fission"))


@pytest.fixture(scope="session", autouse=True)
def runtime_dir() -> Iterator[Path]:
    """A private runtime dir for this session's VMs (short path: Unix sockets live there)."""
    path = Path(tempfile.mkdtemp(prefix="fission-test-", dir="/tmp"))
    previous = os.environ.get("FISSION_RUNTIME_DIR")
    os.environ["FISSION_RUNTIME_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FISSION_RUNTIME_DIR", None)
    else:
        os.environ["FISSION_RUNTIME_DIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def data_dir() -> Iterator[Path]:
    """A private data dir (API keys and the audit log) for this session."""
    path = Path(tempfile.mkdtemp(prefix="fission-data-", dir="/tmp"))
    previous = os.environ.get("FISSION_DATA_DIR")
    os.environ["FISSION_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FISSION_DATA_DIR", None)
    else:
        os.environ["FISSION_DATA_DIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def images_built() -> None:
    """Skip the whole module when images or QEMU are missing (``make setup`` provides both)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed: run `make setup`")
    for language in LANGUAGES:
        try:
            image_set(language)
        except FissionError as exc:
            pytest.skip(f"images not built ({exc}): run `make setup`")


def vmm_processes(runtime: Path) -> list[int]:
    """PIDs of live processes whose command line names a VM dir under ``runtime``."""
    pids = []
    marker = str(runtime).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in cmdline and b"qemu" in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_leftovers(runtime_dir: Path) -> Iterator[None]:
    """After each test: no VMM process, socket, disk overlay or VM directory of this session."""
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (vmm_processes(runtime_dir) or any(runtime_dir.iterdir())):
        time.sleep(0.1)
    assert vmm_processes(runtime_dir) == [], "a VMM process outlived its run"
    assert sorted(p.name for p in runtime_dir.iterdir()) == [], "a VM left files behind"


def fission_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
                timeout: float = 180.0) -> subprocess.CompletedProcess[bytes]:
    """Run the installed ``fission`` command with the session's environment plus ``env``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([FISSION, *args], input=stdin, capture_output=True, env=full_env,
                          timeout=timeout, check=False,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
