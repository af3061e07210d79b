"""The image cache on disk: where built artefacts live and the manifest that names them.

Layout under ``cache_dir()/images``::

    manifest.json                     what `fission images build` last produced
    kernel-<key>/vmlinuz, modules/    from Debian's cloud kernel package
    initramfs-<key>.cpio.gz           busybox, the virtio modules and /init
    base-<language>-<key>/            the mmdebstrap tree (kept so agent changes rebuild fast)
    rootfs-<language>-<key>.ext4      the read-only root disk, agent included
    scratch-<MB>.ext4                 empty writable disks, one per size, copied-on-write per VM
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fission.cache_keys import cache_key
from fission.config import cache_dir
from fission.errors import ImagesNotBuilt
from fission.images.recipes import RECIPES

AGENT_FILES = (
    "agent.py",
    "runs.py",
    "warm.py",
    "protocol.py",
    "confine.py",
    "zygote.py",
    "context.py",
    "files.py",
    "tunnel.py",
    "terminal.py",
    "watch.py",
)


def images_dir() -> Path:
    """Directory holding every built image."""
    path = cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def agent_sources() -> dict[str, bytes]:
    """The guest agent's files as shipped in this fission install."""
    package = Path(__file__).resolve().parent.parent / "guest"
    return {name: (package / name).read_bytes() for name in AGENT_FILES}


def agent_key() -> str:
    """Cache key of the guest agent; a change rebuilds the root images."""
    sources = agent_sources()
    return cache_key(*(part for name in AGENT_FILES for part in (name, sources[name])))


@dataclass(frozen=True)
class ImageSet:
    """Everything needed to boot one language's VM."""

    language: str
    kernel: Path
    initramfs: Path
    rootfs: Path
    kernel_release: str


def manifest_path() -> Path:
    """Path of the manifest file."""
    return images_dir() / "manifest.json"


def load_manifest() -> dict[str, Any]:
    """The manifest as a dict (empty when nothing was built yet)."""
    try:
        data = json.loads(manifest_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_manifest(manifest: dict[str, Any]) -> None:
    """Write the manifest atomically."""
    path = manifest_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def image_set(language: str) -> ImageSet:
    """The built images for ``language``; ImagesNotBuilt names the command that builds them."""
    how = f"build them with `fission images build {language}` (or `make setup`)"
    manifest = load_manifest()
    rootfs_table = manifest.get("rootfs")
    kernel, initramfs = manifest.get("kernel"), manifest.get("initramfs")
    rootfs = rootfs_table.get(language) if isinstance(rootfs_table, dict) else None
    if not kernel or not initramfs or not rootfs:
        raise ImagesNotBuilt(f"the {language} image is not built: {how}")
    try:
        if rootfs.get("agent_key") != agent_key():
            raise ImagesNotBuilt(f"the {language} image holds an older guest agent: {how}")
        paths = (Path(kernel["path"]), Path(initramfs["path"]), Path(rootfs["path"]))
        release = str(kernel["release"])
    except (AttributeError, KeyError, TypeError) as exc:
        raise ImagesNotBuilt(f"the image manifest {manifest_path()} is damaged: {how}") from exc
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ImagesNotBuilt(f"image files are missing ({', '.join(missing)}): {how}")
    return ImageSet(language, paths[0], paths[1], paths[2], release)


def built_languages() -> list[str]:
    """Languages with a root image in the manifest, in recipe order."""
    rootfs = load_manifest().get("rootfs", {})
    return [name for name in RECIPES if name in rootfs]
