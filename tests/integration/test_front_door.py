"""One front door: `fission run`, `repo` and uploads/downloads give the same result through a
running daemon as embedded, and the daemon is really the one that served them (its audit log).

Network runs and file transfers used to be forced embedded; now the CLI sends the policy and the
upload bytes to the daemon and gets the downloaded bytes back. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import FISSION, fission_cli
from tests.integration.test_network import FETCH, git_site, serve, site  # noqa: F401 (fixtures)
from tests.integration.test_sdk import Daemon

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon for the module (a pool of one Python VM), on its own socket and database."""
    started = Daemon("--pool", "python=1")
    started.start()
    try:
        yield started
    finally:
        started.stop()
        started.remove()


def through(
    daemon: Daemon, *args: str, timeout: float = 180.0
) -> subprocess.CompletedProcess[bytes]:
    """`fission ARGS` with the daemon's socket as the default one (found, probed, used)."""
    return fission_cli(*args, env={"FISSION_SOCKET": str(daemon.socket)}, timeout=timeout)


def embedded(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[bytes]:
    """`fission ARGS --no-daemon`."""
    return fission_cli(*args, "--no-daemon", timeout=timeout)


def daemon_events(daemon: Daemon, action: str) -> list[dict[str, object]]:
    """The daemon's audit events of ``action``, newest first."""
    out = subprocess.run(
        [FISSION, "audit", "--db", str(daemon.db), "--action", action, "--json", "--limit", "50"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(out.stdout))


def test_a_network_run_goes_through_the_daemon_with_the_same_result(
    daemon: Daemon,
    site: int,  # noqa: F811
) -> None:
    url = f"http://127.0.0.1:{site}/hello.txt"
    args = (
        "run",
        "--network",
        "--allow-host",
        f"127.0.0.1:{site}",
        FETCH.replace("URL", repr(url)),
    )
    before = len(daemon_events(daemon, "run.egress"))
    served = through(daemon, *args)
    local = embedded(*args)
    assert served.returncode == local.returncode == 0, (
        served.stderr.decode() + local.stderr.decode()
    )
    assert served.stdout == local.stdout and b"hello from the host" in served.stdout
    egress = daemon_events(daemon, "run.egress")
    assert len(egress) == before + 1, "the daemon did not proxy the run's connection"
    assert egress[0]["outcome"] == "allowed" and egress[0]["detail"]["port"] == site  # type: ignore[index]


def test_a_refused_host_is_refused_the_same_way_through_the_daemon(
    daemon: Daemon,
    site: int,  # noqa: F811
) -> None:
    url = f"http://localhost:{site}/hello.txt"
    args = (
        "run",
        "--network",
        "--allow-host",
        f"localhost:{site}",
        FETCH.replace("URL", repr(url)),
    )
    served, local = through(daemon, *args), embedded(*args)
    assert served.returncode == local.returncode == 0
    assert served.stdout == local.stdout and b"failed: 403" in served.stdout


def test_uploads_and_downloads_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "input.csv"
    source.write_bytes(b"a,b\n1,2\n3,4\n" + bytes(range(256)) * 4)
    results = {}
    before = len(daemon_events(daemon, "run"))
    for how, call in (("daemon", lambda *a: through(daemon, *a)), ("embedded", embedded)):
        target = tmp_path / how / "copy.bin"
        target.parent.mkdir()
        proc = call(
            "run",
            "--upload",
            f"{source}:/data/input.csv",
            "--download",
            f"/data/copy.bin:{target}",
            "import shutil; shutil.copy('/data/input.csv', '/data/copy.bin'); print('copied')",
        )
        assert proc.returncode == 0, proc.stderr.decode()
        results[how] = (proc.stdout, target.read_bytes())
        assert sorted(p.name for p in target.parent.iterdir()) == ["copy.bin"]
    assert results["daemon"] == results["embedded"] == (b"copied\n", source.read_bytes())
    assert len(daemon_events(daemon, "run")) == before + 1


def test_a_missing_download_fails_the_same_way(daemon: Daemon, tmp_path: Path) -> None:
    args = ("run", "--download", f"/data/nothing:{tmp_path / 'x'}", "print(1)")
    served, local = through(daemon, *args), embedded(*args)
    assert served.returncode == local.returncode != 0
    assert not (tmp_path / "x").exists()


def test_repo_from_a_local_directory_through_the_daemon(
    daemon: Daemon,
    git_site: tuple[str, Path],  # noqa: F811
) -> None:
    _, work = git_site
    args = (
        "repo",
        str(work),
        "--ref",
        "broken",
        "--command",
        "python3 -m pytest -q -p no:cacheprovider",
    )
    served = through(daemon, *args)
    assert served.returncode == 1, served.stdout.decode() + served.stderr.decode()
    assert b"1 failed" in served.stdout
    assert daemon_events(daemon, "repo"), "the daemon did not run the repo command"
