"""Go on real VMs: `fission run --lang go` compiles in the VM, prints, and passes exit codes."""

from __future__ import annotations

import time

import pytest

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
