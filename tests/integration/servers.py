"""A `fission serve` on loopback TCP with its own state dir and key database, for API tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.integration.conftest import FISSION


def deleting_on_stop(args: tuple[str, ...] | list[str]) -> list[str]:
    """``args`` for a test daemon that destroys its sandboxes when stopped (the default keeps
    them running for the next daemon; test_durable tests that), unless they say otherwise."""
    return [*args] if "--on-stop" in args else [*args, "--on-stop", "delete"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpDaemon:
    """A daemon listening on 127.0.0.1, where every request needs an API key."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))
        self.state = self.dir / "state"
        self.db = self.dir / "keys.sqlite3"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def create_key(self, name: str, *options: str) -> str:
        """A new API key (``fission keys create``), e.g. with ``--max-sandboxes 1``."""
        out = subprocess.run(
            [FISSION, "keys", "create", name, "--db", str(self.db), *options],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]

    def revoke_key(self, name: str) -> None:
        """Revoke a key by name."""
        subprocess.run(
            [FISSION, "keys", "revoke", name, "--db", str(self.db)],
            capture_output=True,
            timeout=60,
            check=True,
        )

    def start(self) -> None:
        """Start and wait until it answers /v1/health."""
        argv = [
            FISSION,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state),
            "--db",
            str(self.db),
            *deleting_on_stop(self.args),
        ]
        with open(self.dir / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon did not answer: {self.log()}")

    def log(self) -> str:
        """What the daemon printed."""
        return (self.dir / "daemon.log").read_text(errors="replace")

    def client(self, key: str | None) -> httpx.Client:
        """An HTTP client sending ``key`` (or none)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> None:
        """SIGTERM the daemon (by its pid), wait for it, remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
