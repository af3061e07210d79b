"""Root disks from OCI images: an OCI layout (a directory, or a tar of one such as modern
``docker save`` and ``skopeo copy ... oci-archive:`` write) or a legacy ``docker save`` tar.

The layers are applied by ``umoci raw unpack`` (Debian's umoci, made for exactly this: layer
order, ``.wh.`` whiteouts and opaque directories, hard links, ownership); a legacy docker archive
is first turned into an OCI layout by ``skopeo``. Then what the guest agent needs is added:
fission's agent under /opt/fission, the ``sandbox`` user (uid 1000) and its home, the mount
points init uses and an empty resolv.conf. The image must hold ``python3`` (the agent is a
Python program): ``/usr/bin/python3``, or ``/usr/local/bin/python3`` (linked there).

Not supported (docs/templates.md): the image's entrypoint, cmd, user, workdir, env, exposed
ports and volumes (programs run as fission runs them); multi-platform indexes (save one
platform); architectures other than the host's; images without python3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fission.cache_keys import cache_key
from fission.errors import ImageBuildFailed, InvalidInput
from fission.images.rootfs import make_ext4
from fission.images.store import agent_key, agent_sources, images_dir, load_manifest, save_manifest
from fission.images.tools import run_logged
from fission.tools import require_tool

OCI_FORMAT = "oci-1"
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
REF_NAME = "org.opencontainers.image.ref.name"
TAG = "fission"
MOUNT_POINTS = ("dev", "proc", "sys", "run", "tmp", "opt/fission", "home/sandbox", "etc")


def source_digest(source: Path) -> str:
    """A digest of the image: the archive's bytes, or a layout's index (blobs are addressed
    by content, so the index names them all)."""
    if source.is_dir():
        index = source / "index.json"
        if not index.is_file():
            raise InvalidInput(f"{source} is not an OCI image layout (no index.json)")
        return hashlib.sha256(index.read_bytes()).hexdigest()
    if not source.is_file():
        raise InvalidInput(f"OCI image {source}: no such file or directory")
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_name(language: str, source: Path) -> str:
    """The image name of ``source`` run as ``language``: ``LANGUAGE@oci-KEY``."""
    return f"{language}@oci-{cache_key(OCI_FORMAT, source_digest(source))}"


def _layout(source: Path, work: Path, log: Path) -> Path:
    """An OCI layout of ``source`` under ``work`` that may be changed (a copy or extraction)."""
    layout = work / "layout"
    if source.is_dir():
        shutil.copytree(source, layout, symlinks=True)
    else:
        try:
            with tarfile.open(source) as archive:
                archive.extractall(layout, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise InvalidInput(f"OCI image {source} is not a readable tar archive: {exc}") from exc
    if (layout / "oci-layout").is_file():
        return layout
    if (layout / "manifest.json").is_file():  # a legacy `docker save`: skopeo converts it
        converted = work / "converted"
        run_logged(
            [
                require_tool("skopeo"),
                "copy",
                "--quiet",
                f"docker-archive:{source}",
                f"oci:{converted}:{TAG}",
            ],
            log,
            timeout=600,
            what=f"skopeo conversion of {source}",
        )
        return converted
    raise InvalidInput(
        f"{source} is neither an OCI image layout (oci-layout, index.json) nor a `docker save` "
        "archive (manifest.json)"
    )


def _tag_single_manifest(layout: Path, source: Path) -> str:
    """The tag of the layout's one image manifest (added when it has none)."""
    path = layout / "index.json"
    index: dict[str, Any] = json.loads(path.read_text())
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise InvalidInput(
            f"OCI image {source} holds {len(manifests)} manifests: save exactly one image"
        )
    manifest = manifests[0]
    if manifest.get("mediaType") in INDEX_MEDIA_TYPES:
        raise InvalidInput(
            f"OCI image {source} is a multi-platform index: save one platform "
            "(e.g. `docker save --platform linux/amd64`)"
        )
    annotations = manifest.setdefault("annotations", {})
    if not annotations.get(REF_NAME):
        annotations[REF_NAME] = TAG
        path.write_text(json.dumps(index))
    return str(annotations[REF_NAME])


def _add_line(path: Path, name: str, line: str) -> None:
    """Append ``line`` to a passwd-style file unless an entry called ``name`` is there."""
    text = path.read_text() if path.is_file() else ""
    if any(entry.split(":", 1)[0] == name for entry in text.splitlines()):
        return
    path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")


def adapt_for_agent(root: Path, source: Path) -> None:
    """Add what the guest agent needs to an unpacked image at ``root``."""
    python = root / "usr/bin/python3"
    if not python.exists() and not python.is_symlink():
        local = root / "usr/local/bin/python3"
        if not local.exists() and not local.is_symlink():
            raise ImageBuildFailed(
                f"OCI image {source} has no python3 (looked for /usr/bin/python3 and "
                "/usr/local/bin/python3): fission's guest agent is a Python program, so use an "
                "image with Python 3 (e.g. python:3-slim, or debian with python3 installed)"
            )
        python.parent.mkdir(parents=True, exist_ok=True)
        python.symlink_to("/usr/local/bin/python3")
    for directory in MOUNT_POINTS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    etc = root / "etc"
    _add_line(etc / "passwd", "sandbox", "sandbox:x:1000:1000::/home/sandbox:/bin/sh")
    _add_line(etc / "group", "sandbox", "sandbox:x:1000:")
    os.chown(root / "home/sandbox", 1000, 1000)
    resolv = etc / "resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text("")  # no DNS in the guest: names go to the host's egress proxy
    for name, data in agent_sources().items():
        (root / "opt/fission" / name).write_bytes(data)
        (root / "opt/fission" / name).chmod(0o644)


def build_oci_rootfs(source: Path, language: str, log: Path) -> str:
    """Build (or reuse) the root disk of the OCI image at ``source``; return its image name,
    recorded in the manifest like a language's."""
    source = source.resolve()
    name = image_name(language, source)
    key = cache_key(name, agent_key())
    path = images_dir() / f"rootfs-oci-{key}.ext4"
    manifest = load_manifest()
    rootfs = manifest.setdefault("rootfs", {})
    entry = {"key": key, "path": str(path), "agent_key": agent_key(), "packages": []}
    if path.is_file() and rootfs.get(name) == entry:
        return name
    if os.geteuid() != 0:
        raise ImageBuildFailed("unpacking OCI images needs root (the tree keeps its owners)")
    umoci = require_tool("umoci")
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=images_dir()) as tmp:
        work = Path(tmp)
        layout = _layout(source, work, log)
        tag = _tag_single_manifest(layout, source)
        root = work / "rootfs"
        run_logged(
            [umoci, "raw", "unpack", "--image", f"{layout}:{tag}", str(root)],
            log,
            timeout=900,
            what=f"umoci unpack of {source}",
        )
        adapt_for_agent(root, source)
        make_ext4(root, path, log, what=f"mkfs.ext4 of the root disk of {source}")
    rootfs[name] = entry
    save_manifest(manifest)
    return name
