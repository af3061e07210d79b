"""QEMU's warm snapshots: one booted, warmed VM per image, saved once and restored per clone.

The recipe is QEMU's "VM templating" (also used by Kata Containers). The template VM is booted
with its RAM in a file (``memory-backend-file,share=on``) and its writable disk in a file of its
own; once the guest has warmed up (the ``WarmTemplate`` core hands over: for Python, numpy and
pandas imported in the fork server, a confined child forked and waiting) the VM is paused and
only its device state is migrated to ``state`` (``x-ignore-shared``: a few dozen KB). A clone
maps ``memory`` privately (``share=off``: copy-on-write, so clones share every page they do not
write), attaches the template's disk under a throwaway overlay (``snapshot=on``) and loads
``state``. Nothing is read in full, so a restore costs tens of milliseconds. ``full=True``
builds the classic alternative (RAM inside the state file, read in full at every restore), kept
for the benchmark.

Each clone must be indistinguishable from a fresh boot to the code inside it: at restore the
host sends the wall clock and a fresh seed (the agent mixes it in and reseeds the kernel's
CRNG), and the fork-server child reseeds Python's and numpy's generators before user code runs.

Snapshots live under ``cache_dir()/snapshots/<image>-<key>`` where the key hashes every input
(images, agent, QEMU version, accelerator, VM shape, kernel arguments), so a change rebuilds them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fission.config import cache_dir
from fission.errors import ImageBuildFailed
from fission.images.recipes import cache_key
from fission.images.scratch import scratch_disk
from fission.images.store import ImageSet
from fission.vmm.accel import tcg_kernel_args
from fission.vmm.base import (
    TEMPLATE_CAPACITY_MB,
    TEMPLATE_DISK_MB,
    TEMPLATE_MEMORY_MB,
    TEMPLATE_VCPUS,
    Driver,
    VMConfig,
    WarmTemplate,
    new_vm_id,
    vm_workdir,
)
from fission.vmm.qemu_argv import BASE_KERNEL_ARGS

TEMPLATE_FORMAT = "1"


@dataclass(frozen=True)
class Snapshot:
    """A saved, warmed VM of one image, ready to be cloned."""

    language: str
    directory: Path
    accel: str
    kernel_args: tuple[str, ...]
    full: bool = False

    @property
    def memory(self) -> Path:
        """The template's RAM (absent for a full snapshot)."""
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        """The saved device state (and RAM, for a full snapshot)."""
        return self.directory / "state"

    @property
    def scratch(self) -> Path:
        """The template's writable disk as it was when saved."""
        return self.directory / "scratch.ext4"


def snapshots_dir() -> Path:
    """Directory holding every snapshot."""
    path = cache_dir() / "snapshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def template_kernel_args(warm: WarmTemplate, accel: str) -> tuple[str, ...]:
    """Kernel arguments of a template: the accelerator's, then the image's own."""
    return (*(tcg_kernel_args() if accel == "tcg" else ()), *warm.kernel_args)


def snapshot_key(
    images: ImageSet, accel: str, qemu_version: str, kernel_args: tuple[str, ...], full: bool
) -> str:
    """Cache key of a snapshot: every input that changes what the saved VM holds."""
    return cache_key(
        TEMPLATE_FORMAT,
        str(images.kernel),
        str(images.initramfs),
        str(images.rootfs),
        accel,
        qemu_version,
        str(TEMPLATE_VCPUS),
        str(TEMPLATE_CAPACITY_MB),
        str(TEMPLATE_DISK_MB),
        " ".join((*BASE_KERNEL_ARGS, *kernel_args)),
        "full" if full else "template",
    )


def snapshot_path(
    images: ImageSet,
    accel: str,
    qemu_version: str,
    kernel_args: tuple[str, ...] = (),
    full: bool = False,
) -> Path:
    """Where the snapshot for these inputs lives (whether or not it exists)."""
    suffix = "-full" if full else ""
    key = snapshot_key(images, accel, qemu_version, kernel_args, full)
    return snapshots_dir() / f"{images.language}{suffix}-{key}"


def find_snapshot(
    images: ImageSet,
    accel: str,
    qemu_version: str,
    kernel_args: tuple[str, ...] = (),
    full: bool = False,
) -> Snapshot | None:
    """The current snapshot for these inputs, or None if it is missing or stale."""
    directory = snapshot_path(images, accel, qemu_version, kernel_args, full)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return Snapshot(images.language, directory, accel, tuple(meta["kernel_args"]), full)


def sparse_copy(source: Path, target: Path) -> None:
    """Copy a disk image keeping its holes (the scratch disk is mostly empty)."""
    proc = subprocess.run(
        ["cp", "--sparse=always", str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageBuildFailed(f"copying {source} failed: {proc.stderr.strip()}")
    target.chmod(0o644)


def finish_snapshot(staging: Path, final: Path, kernel_args: tuple[str, ...]) -> None:
    """Seal a built snapshot and move it into place; older ones of the image go away."""
    (staging / "scratch.ext4").chmod(0o444)
    (staging / "meta.json").write_text(json.dumps({"kernel_args": list(kernel_args)}))
    try:
        staging.rename(final)
    except OSError:  # another process finished the same snapshot first
        shutil.rmtree(staging, ignore_errors=True)
    prefix = final.name.rsplit("-", 1)[0] + "-"
    for old in final.parent.iterdir():
        if old != final and old.name.startswith(prefix) and old.name[len(prefix) :].isalnum():
            shutil.rmtree(old, ignore_errors=True)


def template_config(
    staging: Path, images: ImageSet, kernel_args: tuple[str, ...], full: bool
) -> VMConfig:
    """The template VM: RAM in ``staging/memory`` (shared, unless full), its own writable disk."""
    vm_id = new_vm_id()
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=staging / "scratch.ext4",
        vcpus=TEMPLATE_VCPUS,
        memory_mb=TEMPLATE_MEMORY_MB,
        workdir=vm_workdir(vm_id),
        kernel_args=kernel_args,
        memory_file=None if full else staging / "memory",
        memory_shared=not full,
        scratch_writable=True,
    )


async def build_snapshot_into(
    driver: Driver, staging: Path, images: ImageSet, accel: str, warm: WarmTemplate, full: bool
) -> tuple[str, ...]:
    """Boot a template VM into ``staging``, warm it and save it; return its kernel args."""
    kernel_args = template_kernel_args(warm, accel)
    scratch = staging / "scratch.ext4"
    await asyncio.to_thread(sparse_copy, scratch_disk(TEMPLATE_DISK_MB), scratch)
    machine = await driver.start(template_config(staging, images, kernel_args, full))
    try:
        await warm.warm_up(machine.agent)
        await machine.vm.save_state(staging / "state")
    except Exception as exc:
        raise ImageBuildFailed(
            f"building the {images.language} snapshot failed: {exc}\n{machine.vm.diagnostics()}"
        ) from exc
    finally:
        await machine.destroy()
    return kernel_args


async def build_snapshot(
    driver: Driver,
    images: ImageSet,
    accel: str,
    qemu_version: str,
    warm: WarmTemplate,
    full: bool = False,
) -> Snapshot:
    """Build the snapshot for these inputs unless it exists; return it."""
    kernel_args = template_kernel_args(warm, accel)
    existing = find_snapshot(images, accel, qemu_version, kernel_args, full)
    if existing is not None:
        return existing
    final = snapshot_path(images, accel, qemu_version, kernel_args, full)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        await build_snapshot_into(driver, staging, images, accel, warm, full)
        finish_snapshot(staging, final, kernel_args)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    snapshot = find_snapshot(images, accel, qemu_version, kernel_args, full)
    if snapshot is None:
        raise ImageBuildFailed(f"the {images.language} snapshot vanished after it was built")
    return snapshot


def remove_stale_staging(max_age_s: float = 3600.0) -> None:
    """Remove half-built snapshot directories left by a crashed build."""
    for entry in snapshots_dir().iterdir():
        if entry.name.startswith(".") and time.time() - entry.stat().st_mtime > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)
