"""`fission images build`: kernel, initramfs and root disks, with a progress display."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fission.errors import UnknownLanguage
from fission.images.initramfs import build_initramfs
from fission.images.kernel import build_kernel
from fission.images.recipes import RECIPES
from fission.images.rootfs import build_rootfs
from fission.images.store import images_dir, load_manifest, save_manifest


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


@contextmanager
def _step(progress: Progress, description: str) -> Iterator[None]:
    task = progress.add_task(description, total=None)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        progress.update(task, total=1, completed=1, description=f"{description} [red]failed")
        raise
    elapsed = time.monotonic() - started
    progress.update(task, total=1, completed=1, description=f"{description} [green]{elapsed:.1f}s")


def build_images(
    names: list[str], console: Console | None = None, snapshots: bool = True
) -> dict[str, Any]:
    """Build every requested image (and its warm snapshot) that is missing or stale."""
    targets = resolve_targets(names)
    logs = images_dir() / "logs"
    manifest = load_manifest()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        with _step(progress, "kernel (Debian linux-image-cloud-amd64)"):
            kernel = build_kernel(logs / "kernel.log")
        with _step(progress, "initramfs (busybox + virtio modules)"):
            initramfs = build_initramfs(kernel)
        manifest["kernel"], manifest["initramfs"] = kernel, initramfs
        rootfs = manifest.setdefault("rootfs", {})
        for name in targets:
            recipe = RECIPES[name]
            with _step(progress, f"{name} root disk ({recipe.description})"):
                rootfs[name] = build_rootfs(recipe, logs / f"rootfs-{name}.log")
            save_manifest(manifest)
        save_manifest(manifest)
        if snapshots:
            for name in targets:
                with _step(progress, f"{name} warm snapshot (booted, warmed, saved)"):
                    asyncio.run(build_warm_snapshot(name))
    return manifest


async def build_warm_snapshot(language: str) -> None:
    """Build the language's warm snapshot (see fission.core.snapshots) unless current."""
    from fission.core.snapshots import ensure_template
    from fission.vmm.base import default_driver

    await ensure_template(default_driver(), language)
