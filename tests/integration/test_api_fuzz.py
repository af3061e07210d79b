"""Schemathesis fuzzes the served OpenAPI document of a real daemon: no request may get a 500.

The command it runs is the one to use by hand (with a key from ``fission keys create``)::

    st run http://127.0.0.1:PORT/openapi.json -H "Authorization: Bearer KEY" \
        --checks not_a_server_error --max-examples 15 --seed 1 --workers 1
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.servers import TcpDaemon
from tests.integration.test_warm import qemu_pids

pytestmark = pytest.mark.vm
SCHEMATHESIS = str(Path(sys.executable).with_name("st"))


@pytest.fixture(scope="module")
def daemon() -> Iterator[TcpDaemon]:
    d = TcpDaemon("--pool", "python=1", "--acquire-timeout", "5")
    d.start()
    yield d
    d.stop()
    assert qemu_pids(d.state) == [], "the daemon left a VM behind"


@pytest.mark.skipif(not Path(SCHEMATHESIS).exists(), reason="schemathesis is not installed")
def test_fuzzing_the_api_finds_no_server_errors(daemon: TcpDaemon) -> None:
    key = daemon.create_key("fuzzer", "--max-sandboxes", "2", "--rate-per-minute", "100000")
    argv = [
        SCHEMATHESIS, "run", f"{daemon.url}/openapi.json",
        "-H", f"Authorization: Bearer {key}",
        "--checks", "not_a_server_error",
        "--max-examples", "15",
        "--seed", "1",
        "--workers", "1",
        "--request-timeout", "120",
        "--generation-database", "none",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False,
                          cwd=daemon.dir)  # its reports go there, not into the checkout
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:] + daemon.log()[-3000:]
