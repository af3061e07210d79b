"""Templates on real VMs: a TOML with a pip package and a file, built, then run warm."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import fission_cli
from tests.integration.test_network import serve, tiny_wheel

NAME = "itest-demo"


@pytest.fixture
def template_file(tmp_path: Path) -> Iterator[Path]:
    """A template on python with one pip package (from a loopback index) and one file."""
    root = tmp_path / "index"
    filename, data = tiny_wheel("fissiondemo", "1.0")
    (root / "files").mkdir(parents=True)
    (root / "files" / filename).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / "simple" / "fissiondemo").mkdir(parents=True)
    (root / "simple" / "fissiondemo" / "index.html").write_text(
        f'<a href="../../files/{filename}#sha256={digest}">{filename}</a>\n'
    )
    (tmp_path / "greeting.txt").write_text("hello from the template\n")
    with serve(root) as port:
        path = tmp_path / "demo.toml"
        path.write_text(
            f'name = "{NAME}"\nbase = "python"\npip = ["fissiondemo"]\n'
            f'index_url = "http://127.0.0.1:{port}/simple/"\n'
            'start = "echo started > /home/sandbox/started.txt"\n'
            '[files]\n"/home/sandbox/greeting.txt" = "greeting.txt"\n'
            '[env]\nDEMO_MODE = "on"\n'
        )
        yield path
    fission_cli("template", "rm", NAME)


def test_a_template_builds_then_runs_from_its_snapshot(template_file: Path) -> None:
    started = time.monotonic()
    built = fission_cli("template", "build", str(template_file), timeout=900)
    build_s = time.monotonic() - started
    assert built.returncode == 0, built.stderr.decode()
    assert f"template {NAME} built".encode() in built.stderr
    listed = json.loads(fission_cli("template", "list", "--json").stdout)
    assert [(t["name"], t["language"], t["ready"]) for t in listed if t["name"] == NAME] == [
        (NAME, "python", True)
    ]
    program = (
        "import fissiondemo, os\n"
        "print(fissiondemo.VALUE, os.environ['DEMO_MODE'])\n"
        "print(open('/home/sandbox/greeting.txt').read().strip())\n"
        "print(open('/home/sandbox/started.txt').read().strip())\n"
    )
    expected = b"42 on\nhello from the template\nstarted\n"
    times = []
    for _ in range(2):
        started = time.monotonic()
        run = fission_cli("run", "--no-daemon", "--template", NAME, program)
        times.append(time.monotonic() - started)
        assert run.returncode == 0, run.stderr.decode()
        assert run.stdout == expected
    again = fission_cli("template", "build", str(template_file), timeout=300)
    assert again.returncode == 0 and b"already built (cached)" in again.stderr
    print(
        f"template build {build_s:.1f} s; runs from its snapshot {times[0]:.1f} s, {times[1]:.1f} s"
    )


def test_a_bad_template_fails_before_any_vm(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('base = "python"\n[files]\n"/x" = "absent.txt"\n')
    started = time.monotonic()
    proc = fission_cli("template", "build", str(path), timeout=60)
    assert proc.returncode != 0
    assert b"absent.txt is not a file" in proc.stderr
    assert time.monotonic() - started < 30


def test_a_template_with_a_debian_package_gets_an_image_of_its_own(tmp_path: Path) -> None:
    """`apt = ["jq"]` builds bash's recipe plus jq with mmdebstrap (from the Debian mirror the
    images come from, as `make setup` does), then runs with jq there and bash's own image
    without it."""
    name = "itest-apt"
    path = tmp_path / "apt.toml"
    path.write_text(f'name = "{name}"\nbase = "bash"\napt = ["jq"]\n')
    try:
        built = fission_cli("template", "build", str(path), timeout=1200)
        assert built.returncode == 0, built.stderr.decode()
        run = fission_cli("run", "--no-daemon", "--template", name, "echo '{\"a\": 7}' | jq .a")
        assert (run.returncode, run.stdout) == (0, b"7\n"), run.stderr.decode()
        plain = fission_cli("run", "--no-daemon", "--lang", "bash", "command -v jq || echo none")
        assert plain.stdout == b"none\n"
    finally:
        fission_cli("template", "rm", name)
