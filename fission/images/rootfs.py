"""A language's read-only root disk: a Debian tree from mmdebstrap, plus the guest agent.

Two cached stages, so a change to the agent does not download and unpack Debian again:
``base-<language>-<key>/`` (mmdebstrap output, keyed by packages and apt sources) and
``rootfs-<language>-<key>.ext4`` (that tree plus /opt/fission, keyed by base and agent).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from fission.cache_keys import cache_key
from fission.errors import ImageBuildFailed
from fission.images.recipes import (
    CUSTOMIZE_COMMANDS,
    DPKG_EXCLUDES,
    SUITE,
    Recipe,
    recipe_key,
)
from fission.images.store import agent_key, agent_sources, images_dir
from fission.images.tools import run_logged
from fission.tools import require_tool

ROOT_LABEL = "fission-root"
DEFAULT_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)


def apt_sources() -> Path:
    """The host's Debian apt sources, which the image build uses (``FISSION_APT_SOURCES``)."""
    override = os.environ.get("FISSION_APT_SOURCES")
    candidates = (Path(override),) if override else DEFAULT_SOURCES
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise ImageBuildFailed(
        "no Debian apt sources found (looked at "
        + ", ".join(str(c) for c in candidates)
        + "): set FISSION_APT_SOURCES to a sources.list or deb822 .sources file"
    )


def mmdebstrap_argv(recipe: Recipe, target: Path, sources: Path) -> list[str]:
    """The mmdebstrap command line that builds ``recipe``'s tree into ``target``."""
    argv = [
        require_tool("mmdebstrap"),
        "--variant=minbase",
        "--mode=auto",
        "--include=" + ",".join(recipe.packages),
    ]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES]
    argv += [f'--customize-hook=chroot "$1" {command}' for command in CUSTOMIZE_COMMANDS]
    argv += [SUITE, str(target), str(sources)]
    return argv


def tree_size(root: Path) -> int:
    """Bytes used by the regular files under ``root`` (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def ext4_size_mb(content_bytes: int) -> int:
    """Size of a root disk that holds ``content_bytes`` with room for metadata."""
    return int(content_bytes * 1.25 / (1024 * 1024)) + 96


def build_base(recipe: Recipe, log: Path) -> tuple[str, Path]:
    """Build (or reuse) the mmdebstrap tree for ``recipe``; return (key, directory)."""
    sources = apt_sources()
    key = recipe_key(recipe, sources.read_bytes())
    target = images_dir() / f"base-{recipe.name}-{key}"
    marker = target.with_name(target.name + ".complete")
    if marker.is_file() and target.is_dir():
        return key, target
    if os.geteuid() != 0:
        raise ImageBuildFailed(
            "building root images needs root (mmdebstrap writes a tree "
            "owned by root): run `sudo fission images build` or `make setup`"
        )
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    run_logged(
        mmdebstrap_argv(recipe, staging, sources),
        log,
        timeout=1800,
        what=f"mmdebstrap of the {recipe.name} image",
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    marker.write_text(key + "\n")
    for stale in images_dir().glob(f"base-{recipe.name}-*"):
        if stale in (target, marker):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return key, target


def build_rootfs(recipe: Recipe, log: Path) -> dict[str, Any]:
    """Build (or reuse) the root disk for ``recipe``; return its manifest entry."""
    base_key, base = build_base(recipe, log)
    agent = agent_key()
    key = cache_key(base_key, agent, ROOT_LABEL)
    path = images_dir() / f"rootfs-{recipe.name}-{key}.ext4"
    entry = {"key": key, "path": str(path), "agent_key": agent, "packages": list(recipe.packages)}
    if path.is_file():
        return entry
    opt = base / "opt" / "fission"
    opt.mkdir(parents=True, exist_ok=True)
    for name, data in agent_sources().items():
        (opt / name).write_bytes(data)
        (opt / name).chmod(0o644)
    make_ext4(base, path, log, what=f"mkfs.ext4 of the {recipe.name} root disk")
    for stale in images_dir().glob(f"rootfs-{recipe.name}-*.ext4"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return entry


def make_ext4(tree: Path, path: Path, log: Path, *, what: str) -> None:
    """Write the read-only root disk ``path`` holding ``tree`` (atomically: all or nothing)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    size_mb = ext4_size_mb(tree_size(tree))
    with open(tmp, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        run_logged(
            [
                require_tool("mkfs.ext4"),
                "-q",
                "-F",
                "-L",
                ROOT_LABEL,
                "-m",
                "0",
                "-d",
                str(tree),
                str(tmp),
            ],
            log,
            timeout=900,
            what=what,
        )
        tmp.chmod(0o444)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
