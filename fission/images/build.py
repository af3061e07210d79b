"""Building the kernel, initramfs and root disks that are missing or stale.

Each step is reported through ``step(description)``, a context manager around the step's work
(``fission images build`` draws it as a progress line). The warm snapshots made from these
images are the core's job (``fission.core.snapshots.build_warm_snapshot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from fission.errors import UnknownLanguage
from fission.images.initramfs import build_initramfs
from fission.images.kernel import build_kernel
from fission.images.recipes import RECIPES
from fission.images.rootfs import build_rootfs
from fission.images.store import images_dir, load_manifest, save_manifest

# Wraps one build step: entered before it starts, exited when it ends (with its error, if any).
StepReporter = Callable[[str], AbstractContextManager[object]]


def resolve_targets(names: list[str]) -> list[str]:
    """Turn `python`, `node`, `bash` or `all` into recipe names, in recipe order."""
    if not names or "all" in names:
        return list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise UnknownLanguage(
            f"no image recipe for {', '.join(unknown)}: choose from {', '.join(RECIPES)} or all"
        )
    return [n for n in RECIPES if n in names]


def _silent(_description: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


def build_images(names: list[str], step: StepReporter = _silent) -> dict[str, Any]:
    """Build every requested image that is missing or stale; return the saved manifest."""
    targets = resolve_targets(names)
    logs = images_dir() / "logs"
    manifest = load_manifest()
    with step("kernel (Debian linux-image-cloud-amd64)"):
        kernel = build_kernel(logs / "kernel.log")
    with step("initramfs (busybox + virtio modules)"):
        initramfs = build_initramfs(kernel)
    manifest["kernel"], manifest["initramfs"] = kernel, initramfs
    rootfs = manifest.setdefault("rootfs", {})
    for name in targets:
        recipe = RECIPES[name]
        with step(f"{name} root disk ({recipe.description})"):
            rootfs[name] = build_rootfs(recipe, logs / f"rootfs-{name}.log")
        save_manifest(manifest)
    save_manifest(manifest)
    return manifest
