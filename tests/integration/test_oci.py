"""An OCI image archive written by the test itself (two layers, whiteouts) boots as a base."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from fission.images.store import images_dir
from fission.sdk import Sandbox
from tests.integration.conftest import fission_cli
from tests.integration.servers import TcpDaemon

NAME = "itest-oci"


def blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    """Store ``data`` as a blob of the layout; its descriptor."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def add_file(archive: tarfile.TarFile, name: str, data: bytes = b"") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def debian_layer(tree: Path) -> bytes:
    """Layer 1: a Debian tree with python3 (the bash image's), plus /srv/old/{a,b}.txt."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for entry in sorted(os.listdir(tree)):
            if entry not in ("proc", "sys", "dev", "run"):
                archive.add(tree / entry, arcname=entry)
        add_file(archive, "srv/old/a.txt", b"a")
        add_file(archive, "srv/old/b.txt", b"b")
    return buffer.getvalue()


def change_layer() -> bytes:
    """Layer 2: a whiteout (/etc/issue goes), an opaque /srv/old (only c.txt), a new file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add_file(archive, "etc/.wh.issue")
        add_file(archive, "srv/old/.wh..wh..opq")
        add_file(archive, "srv/old/c.txt", b"c")
        add_file(archive, "etc/oci-marker.txt", b"from layer two\n")
    return buffer.getvalue()


def oci_archive(tmp_path: Path, tree: Path) -> Path:
    """An OCI image layout of the two layers, as a tar (what `docker save` writes today)."""
    layout = tmp_path / "layout"
    layers = [
        blob(layout, debian_layer(tree), "application/vnd.oci.image.layer.v1.tar"),
        blob(layout, change_layer(), "application/vnd.oci.image.layer.v1.tar"),
    ]
    diff_ids = [str(layer["digest"]) for layer in layers]  # uncompressed: the same digests
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/false"]},  # ignored: fission runs its agent
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(
            layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": layers,
    }
    descriptor = blob(
        layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as archive:
        for entry in ("oci-layout", "index.json", "blobs"):
            archive.add(layout / entry, arcname=entry)
    return path


@pytest.fixture
def debian_tree() -> Path:
    trees = sorted(p for p in images_dir().glob("base-bash-*") if p.is_dir())
    if not trees:
        pytest.skip("no bash base tree in the image cache: run `fission images build bash`")
    return trees[0]


def test_an_oci_archive_made_here_boots_as_a_base(tmp_path: Path, debian_tree: Path) -> None:
    archive = oci_archive(tmp_path, debian_tree)
    toml = tmp_path / "oci.toml"
    toml.write_text(f'name = "{NAME}"\nbase = "oci:image.tar"\nlanguage = "python"\n')
    started = time.monotonic()
    built = fission_cli("template", "build", str(toml), timeout=900)
    build_s = time.monotonic() - started
    try:
        assert built.returncode == 0, built.stderr.decode()
        program = (
            "import os\n"
            "print(open('/etc/oci-marker.txt').read().strip())\n"
            "print(os.path.exists('/etc/issue'))\n"
            "print(sorted(os.listdir('/srv/old')))\n"
            "print(os.getuid())\n"
        )
        run = fission_cli("run", "--no-daemon", "--template", NAME, program)
        assert run.returncode == 0, run.stderr.decode()
        expected = ["from layer two", "False", "['c.txt']", "1000"]
        assert run.stdout.decode().splitlines() == expected
        # A sandbox on it, through the SDK and the daemon's REST API.
        daemon = TcpDaemon()
        try:
            daemon.start()
            key = daemon.create_key("oci")
            with Sandbox(template=NAME, url=daemon.url, api_key=key) as box:
                result = box.run(program)
                assert result.stdout.decode().splitlines() == expected
                assert box.info().language == "python"
        finally:
            daemon.stop()
        print(f"OCI image ({archive.stat().st_size >> 20} MB) built into a base in {build_s:.1f} s")
    finally:
        fission_cli("template", "rm", NAME)


def test_an_oci_image_without_python_fails_clearly(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add_file(archive, "bin/hello", b"#!/bin/sh\n")
    layer = blob(layout, buffer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(
            layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": [layer],
    }
    descriptor = blob(
        layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    toml = tmp_path / "t.toml"
    toml.write_text('name = "itest-nopython"\nbase = "oci:layout"\n')
    proc = fission_cli("template", "build", str(toml), timeout=300)
    assert proc.returncode != 0
    assert b"has no python3" in proc.stderr
