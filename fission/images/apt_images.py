"""Language images with extra Debian packages, for templates (``apt = [...]``).

A template that asks for Debian packages gets a root disk of its own: its language's recipe
plus those packages, built by mmdebstrap like the languages' (``rootfs.build_rootfs``) and
recorded in the manifest as ``LANGUAGE@apt-KEY``, so runs, sandboxes and warm snapshots use it
as they use the language's (the part before ``@`` names the language). The key is the sorted
package list, so two templates with the same packages share one disk.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fission.cache_keys import cache_key
from fission.errors import InvalidInput
from fission.images.recipes import RECIPES, Recipe
from fission.images.rootfs import build_rootfs
from fission.images.store import load_manifest, save_manifest

APT_FORMAT = "apt-1"
APT_CHECK_SECONDS = 30.0


def image_name(language: str, packages: tuple[str, ...]) -> str:
    """The image of ``language`` with ``packages`` added: ``LANGUAGE@apt-KEY``."""
    return f"{language}@apt-{cache_key(APT_FORMAT, *sorted(set(packages)))}"


def unknown_packages(packages: tuple[str, ...]) -> list[str]:
    """Those of ``packages`` the host's apt does not know (its lists: Debian's, as the images'
    suite); none when the host has no apt-cache, and the build then says what is missing."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        return []
    missing = []
    for package in packages:
        found = subprocess.run(
            [apt_cache, "show", "--no-all-versions", package],
            capture_output=True,
            timeout=APT_CHECK_SECONDS,
            check=False,
        )
        if found.returncode != 0 or not found.stdout.strip():
            missing.append(package)
    return missing


def check_packages(template: str, packages: tuple[str, ...]) -> None:
    """InvalidInput naming every package Debian does not have, before anything is built."""
    missing = unknown_packages(packages)
    if missing:
        raise InvalidInput(
            f"template {template}: Debian has no package {', '.join(missing)} "
            "(check the name with `apt-cache search`)"
        )


def build_apt_rootfs(language: str, packages: tuple[str, ...], log: Path) -> str:
    """Build (or reuse) the root disk of ``language`` plus ``packages``; return its image name,
    recorded in the manifest like a language's (blocking: mmdebstrap runs a minute or more)."""
    name = image_name(language, packages)
    base = RECIPES[language]
    extra = tuple(sorted(set(packages) - set(base.packages)))
    recipe = Recipe(name, (*base.packages, *extra), f"{base.description}, and {', '.join(extra)}")
    entry = build_rootfs(recipe, log)
    manifest = load_manifest()
    rootfs = manifest.setdefault("rootfs", {})
    if rootfs.get(name) != entry:
        rootfs[name] = entry
        save_manifest(manifest)
    return name
