"""Go on real VMs: `fission run --lang go` compiles in the VM, prints, and passes exit codes."""

from __future__ import annotations

import contextlib
import http.server
import io
import shutil
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from fission.core.derived import derived_dir
from fission.errors import FissionError
from fission.images.store import image_set
from tests.integration.conftest import fission_cli

HELLO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello from", "go") }\n'
EXIT_3 = (
    'package main\n\nimport "os"\n\nfunc main() { os.Stderr.WriteString("bye\\n"); os.Exit(3) }\n'
)


@pytest.fixture(scope="module", autouse=True)
def go_image() -> None:
    try:
        image_set("go")
    except FissionError as exc:
        pytest.skip(f"the go image is not built ({exc}): run `fission images build go`")


def test_go_prints_from_fmt_and_its_exit_code_passes_through() -> None:
    started = time.monotonic()
    hello = fission_cli("run", "--no-daemon", "--lang", "go", "--timeout", "120", HELLO)
    hello_s = time.monotonic() - started
    assert hello.returncode == 0, hello.stderr.decode()
    assert hello.stdout == b"hello from go\n"
    failing = fission_cli("run", "--no-daemon", "--lang", "go", "--timeout", "120", EXIT_3)
    assert failing.returncode == 3, failing.stderr.decode()
    assert b"bye" in failing.stderr
    broken = fission_cli("run", "--no-daemon", "--lang", "go", "package main\nfunc main() {")
    assert broken.returncode != 0  # the compiler's error is the result
    assert b"main.go:2" in broken.stderr and b"syntax error" in broken.stderr
    print(f"go run of fmt from the warm snapshot: {hello_s:.1f} s (CLI included)")


def host_address() -> str:
    """A non-loopback address of this host (Go sends no loopback request through a proxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this host")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this host")
    return address


def module_proxy(root: Path) -> None:
    """A GOPROXY tree serving example.com/greet v1.0.0."""
    files = {
        "go.mod": b"module example.com/greet\n\ngo 1.19\n",
        "greet.go": b'package greet\n\nfunc Hello() string { return "hello from a module" }\n',
    }
    versions = root / "example.com" / "greet" / "@v"
    versions.mkdir(parents=True)
    (versions / "list").write_text("v1.0.0\n")
    (versions / "v1.0.0.info").write_text('{"Version": "v1.0.0", "Time": "2024-01-01T00:00:00Z"}')
    (versions / "v1.0.0.mod").write_bytes(files["go.mod"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"example.com/greet@v1.0.0/{name}", data)
    (versions / "v1.0.0.zip").write_bytes(buffer.getvalue())


@contextlib.contextmanager
def serve_on(address: str, root: Path) -> Iterator[int]:
    """A static HTTP server for ``root`` on ``address`` (an ephemeral port), in a thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_go_install_gets_a_module_from_a_private_goproxy(tmp_path: Path) -> None:
    address = host_address()
    module_proxy(tmp_path / "proxy")
    program = (
        'package main\\n\\nimport (\\n\\t"fmt"\\n\\t"example.com/greet"\\n)\\n\\n'
        "func main() { fmt.Println(greet.Hello()) }\\n"
    )
    command = f"cd ~/work && printf '{program}' > main.go && go build -o /tmp/m . && /tmp/m"
    before = set(derived_dir().iterdir())
    try:
        with serve_on(address, tmp_path / "proxy") as port:
            proc = fission_cli(
                "install",
                "--no-daemon",
                "--lang",
                "go",
                "--packages",
                "example.com/greet@v1.0.0",
                "--index-url",
                f"http://{address}:{port}/",
                "--timeout",
                "180",
                "--command",
                command,
                timeout=900,
            )
    finally:
        for path in set(derived_dir().iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"hello from a module\n"
