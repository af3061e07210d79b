"""Egress through the per-VM proxy, `fission install` and `fission repo`, with loopback servers only.

Every server here listens on 127.0.0.1 of this machine; nothing is sent to outside addresses.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from fission.core.derived import derived_dir
from tests.integration.conftest import fission_cli

pytestmark = pytest.mark.vm


@contextlib.contextmanager
def serve(root: Path, routes: dict[str, bytes] | None = None) -> Iterator[int]:
    """A static HTTP server for ``root`` on 127.0.0.1 (an ephemeral port), in a thread.

    ``routes`` maps exact paths to JSON bodies (filled in once the port is known).
    """
    json_routes = routes if routes is not None else {}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = json_routes.get(self.path)
            if body is None:
                super().do_GET()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "hello.txt").write_text("hello from the host\n")
    with serve(tmp_path) as port:
        yield port


FETCH = """
import urllib.error, urllib.request
try:
    print(urllib.request.urlopen(URL, timeout=20).read().decode())
except urllib.error.HTTPError as exc:
    print("failed:", exc.code, exc.read().decode())
except Exception as exc:
    print("failed:", exc)
"""


def fetch(url: str, *options: str) -> subprocess.CompletedProcess[bytes]:
    return fission_cli("run", "--lang", "python", *options, FETCH.replace("URL", repr(url)))


def test_allowed_literal_address_is_reached(site: int) -> None:
    proc = fetch(f"http://127.0.0.1:{site}/hello.txt", "--network", "--allow-host", f"127.0.0.1:{site}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"hello from the host" in proc.stdout


def test_server_not_allowed_is_refused(site: int, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret.txt").write_text("secret\n")
    with serve(other) as other_port:
        proc = fetch(f"http://127.0.0.1:{other_port}/secret.txt", "--network", "--allow-host", f"127.0.0.1:{site}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"secret" not in proc.stdout
    assert b"403" in proc.stdout
    audit = fission_cli("audit", "--action", "run.egress", "--json", "--limit", "5")
    assert audit.returncode == 0, audit.stderr.decode()
    events = json.loads(audit.stdout)
    refused = [e for e in events if e["detail"].get("port") == other_port]
    assert refused and refused[0]["outcome"] == "refused", events


def test_name_resolving_to_loopback_is_refused(site: int) -> None:
    # localhost resolves to 127.0.0.1 on the host; only the literal address may reach it.
    proc = fetch(f"http://localhost:{site}/hello.txt", "--network", "--allow-host", f"localhost:{site}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"hello from the host" not in proc.stdout
    assert b"failed: 403" in proc.stdout
    assert b"not public" in proc.stdout and b"loopback" in proc.stdout


def test_no_network_without_the_flag(site: int) -> None:
    proc = fission_cli("run", "--lang", "python", """
import os, socket
print(sorted(os.listdir('/sys/class/net')))
print({k: v for k, v in os.environ.items() if 'proxy' in k.lower()})
s = socket.socket()
s.settimeout(5)
try:
    s.connect(('127.0.0.1', 3128))
    print('connected')
except OSError as exc:
    print('refused', exc.errno)
""")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.splitlines() == [b"['lo']", b"{}", b"refused 111"]


def test_upload_and_download(tmp_path: Path) -> None:
    source = tmp_path / "input.csv"
    source.write_text("a,b\n1,2\n3,4\n")
    target = tmp_path / "out" / "total.txt"
    target.parent.mkdir()
    proc = fission_cli(
        "run", "--upload", f"{source}:/data/input.csv", "--download", f"/data/total.txt:{target}",
        "import pandas as pd\nopen('/data/total.txt', 'w').write(str(pd.read_csv('/data/input.csv').a.sum()))",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert target.read_text() == "4"
    assert sorted(p.name for p in target.parent.iterdir()) == ["total.txt"]


def tiny_wheel(name: str, version: str) -> tuple[str, bytes]:
    """A pure-Python wheel built by hand: ``import <name>`` gives VALUE = 42."""
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: fission-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buffer.getvalue()


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[str]:
    """A PEP 503 simple index on loopback serving one hand-built wheel."""
    root = tmp_path / "index"
    filename, data = tiny_wheel("fissiondemo", "1.0")
    (root / "files").mkdir(parents=True)
    (root / "files" / filename).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / "simple" / "fissiondemo").mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<a href="fissiondemo/">fissiondemo</a>\n')
    (root / "simple" / "fissiondemo" / "index.html").write_text(
        f'<a href="../../files/{filename}#sha256={digest}">{filename}</a>\n'
    )
    before = set(derived_dir().iterdir())
    with serve(root) as port:
        yield f"http://127.0.0.1:{port}/simple/"
    for path in set(derived_dir().iterdir()) - before:  # this test's cached environment
        shutil.rmtree(path, ignore_errors=True)


def test_install_from_a_local_index_twice_second_from_the_snapshot(package_index: str) -> None:
    command = "python3 -c 'import fissiondemo; print(fissiondemo.VALUE)'; cat ~/.fission-install.log"
    args = ("install", "--lang", "python", "--packages", "fissiondemo", "--index-url", package_index,
            "--command", command)
    started = time.monotonic()
    first = fission_cli(*args, timeout=600)
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.splitlines() == [b"42", b"fissiondemo"]
    assert b"installed and cached" in first.stderr
    started = time.monotonic()
    second = fission_cli(*args, timeout=600)
    second_s = time.monotonic() - started
    assert second.returncode == 0, second.stderr.decode()
    # pip ran once: the log it appends to holds one line, restored from the snapshot
    assert second.stdout.splitlines() == [b"42", b"fissiondemo"]
    assert b"restored from the cache" in second.stderr
    print(f"fission install: first {first_s:.1f} s, cached {second_s:.1f} s")


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def git_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A git repository served over dumb HTTP from loopback: branch main passes, broken fails."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "test_math.py").write_text("def test_add():\n    assert 1 + 1 == 2\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "passing", cwd=work)
    git("checkout", "-q", "-b", "broken", cwd=work)
    (work / "test_math.py").write_text("def test_add():\n    assert 1 + 1 == 3\n")
    git("commit", "-q", "-am", "failing", cwd=work)
    git("checkout", "-q", "main", cwd=work)
    served = tmp_path / "served"
    served.mkdir()
    git("clone", "-q", "--bare", str(work), str(served / "repo.git"), cwd=tmp_path)
    git("update-server-info", cwd=served / "repo.git")
    with serve(served) as port:
        yield f"http://127.0.0.1:{port}/repo.git", work


def test_repo_over_http_passing_and_failing(git_site: tuple[str, Path]) -> None:
    url, _ = git_site
    passing = fission_cli("repo", url, "--lang", "python", "--command", "python3 -m pytest -q -p no:cacheprovider")
    assert passing.returncode == 0, passing.stdout.decode() + passing.stderr.decode()
    assert b"1 passed" in passing.stdout
    failing = fission_cli("repo", url, "--ref", "broken", "--command", "python3 -m pytest -q -p no:cacheprovider")
    assert failing.returncode == 1, failing.stdout.decode() + failing.stderr.decode()
    assert b"1 failed" in failing.stdout


def test_repo_from_a_local_directory(git_site: tuple[str, Path]) -> None:
    _, work = git_site
    proc = fission_cli("repo", str(work), "--ref", "broken", "--command", "python3 -m pytest -q -p no:cacheprovider")
    assert proc.returncode == 1, proc.stdout.decode() + proc.stderr.decode()
    assert b"1 failed" in proc.stdout


def test_sandbox_through_the_daemon_and_sdk(site: int) -> None:
    """A sandbox created with a policy reaches the allowed server and nothing else."""
    from fission.sdk import Sandbox
    from tests.integration.test_sdk import Daemon

    daemon = Daemon()
    daemon.start()
    try:
        with Sandbox(allow_hosts=[f"127.0.0.1:{site}"], url=daemon.url) as box:
            allowed = box.run(FETCH.replace("URL", repr(f"http://127.0.0.1:{site}/hello.txt")))
            refused = box.run(FETCH.replace("URL", repr(f"http://localhost:{site}/hello.txt")))
        assert b"hello from the host" in allowed.stdout
        assert b"failed: 403" in refused.stdout and b"hello" not in refused.stdout
        with Sandbox(url=daemon.url) as box:
            info = box.run("import os; print(sorted(os.environ))")
        assert b"HTTP_PROXY" not in info.stdout
    finally:
        daemon.stop()
        daemon.remove()


def npm_tarball(name: str, version: str) -> bytes:
    """A package tarball as npm packs it: package/package.json and package/index.js."""
    import tarfile

    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "package/index.js": b"module.exports = { value: 42 };\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def npm_registry(tmp_path: Path) -> Iterator[str]:
    """A static npm registry on loopback serving one package."""
    root = tmp_path / "registry"
    (root / "fissiondemo" / "-").mkdir(parents=True)
    data = npm_tarball("fissiondemo", "1.0.0")
    (root / "fissiondemo" / "-" / "fissiondemo-1.0.0.tgz").write_bytes(data)
    before = set(derived_dir().iterdir())
    routes: dict[str, bytes] = {}
    with serve(root, routes) as port:
        url = f"http://127.0.0.1:{port}/"
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        packument = {
            "name": "fissiondemo",
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {
                "name": "fissiondemo", "version": "1.0.0",
                "dist": {"tarball": f"{url}fissiondemo/-/fissiondemo-1.0.0.tgz",
                         "shasum": hashlib.sha1(data).hexdigest(), "integrity": integrity},
            }},
        }
        routes["/fissiondemo"] = json.dumps(packument).encode()
        yield url
    for path in set(derived_dir().iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


def test_install_node_package_from_a_local_registry(npm_registry: str) -> None:
    command = "cd ~/work && node -e 'console.log(require(\"fissiondemo\").value)'"
    args = ("install", "--lang", "node", "--packages", "fissiondemo", "--index-url", npm_registry,
            "--command", command)
    first = fission_cli(*args, timeout=600)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    assert first.stdout.splitlines()[-1] == b"42"
    second = fission_cli(*args, timeout=600)
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout.splitlines()[-1] == b"42"
    assert b"restored from the cache" in second.stderr
