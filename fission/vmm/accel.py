"""Choosing the CPU accelerator: KVM when a probe boot proves it works here, else TCG.

``/dev/kvm`` existing is not enough: on nested hosts with a paravirtual KVM, stock guest
kernels hang. So the first time, fission boots the real guest kernel and initramfs under KVM
with ``fission.probe=1`` (the initramfs prints a marker and powers off) and caches the answer,
keyed by the host kernel, QEMU and the guest kernel. ``FISSION_ACCEL=kvm|tcg`` overrides. The
probe runs in the same jail as every VM (when VMs are jailed), so it proves KVM works there.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from fission.cache_keys import cache_key
from fission.config import cache_dir, runtime_dir
from fission.errors import InvalidInput
from fission.vmm import jailer

ACCELS = ("kvm", "tcg")
PROBE_MARKER = b"FISSION-PROBE-OK"
PROBE_TIMEOUT = 20.0


def accel_override() -> str | None:
    """The accelerator forced by ``FISSION_ACCEL``, if any."""
    value = os.environ.get("FISSION_ACCEL", "").strip().lower()
    if not value:
        return None
    if value not in ACCELS:
        raise InvalidInput(f"FISSION_ACCEL={value!r} is not valid: use kvm or tcg (or unset it)")
    return value


def kvm_device_usable(path: str = "/dev/kvm") -> bool:
    """True when ``/dev/kvm`` exists and this user may open it read-write."""
    return os.path.exists(path) and os.access(path, os.R_OK | os.W_OK)


def tsc_khz(cpuinfo: str) -> int | None:
    """The host TSC frequency in kHz from /proc/cpuinfo text (TCG's guest TSC runs at it)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                return None
    return None


def tcg_kernel_args() -> tuple[str, ...]:
    """Kernel arguments a TCG guest needs.

    Under TCG the guest's TSC calibration against the PIT fails at random (emulation jitter),
    and the kernel then hangs; telling it the TSC frequency skips the calibration. The same
    jitter makes the clocksource watchdog drop the TSC in a template booted on a busy host,
    leaving every clone of it on jiffies, where the agent's timers misfire (a run's timeout
    then fires only at the host's deadline). TCG's TSC follows the host's monotonic clock, so
    it is trusted (``tsc=reliable``).

    User-space address randomisation stays on, although TCG finds its translated code by
    virtual address and a randomised exec retranslates its loader and libc (``sh -c 'echo 42'``
    measured 30 ms, 6 ms with ``norandmaps``): the guest's root processes (agent, fork servers)
    keep that layer against code that attacks them from inside, and runs keep their own layouts.
    """
    try:
        khz = tsc_khz(Path("/proc/cpuinfo").read_text())
    except OSError:
        khz = None
    return (f"tsc_early_khz={khz}", "tsc=reliable") if khz else ()


def _cache_file() -> Path:
    return cache_dir() / "accel.json"


async def probe_kvm(qemu: str, kernel: Path, initramfs: Path) -> bool:
    """Boot the guest kernel under KVM and report whether the initramfs answered in time."""
    argv = [
        qemu,
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 quiet panic=-1 reboot=t fission.probe=1",
    ]
    if not jailer.decision().enabled:
        return await _run_probe(argv, None)
    workdir = Path(tempfile.mkdtemp(prefix="probe-", dir=runtime_dir()))
    jail = None
    try:
        jail = await asyncio.to_thread(jailer.Jail.for_probe, qemu, kernel, initramfs, workdir)
        return await _run_probe(jail.wrap(argv), jail)
    finally:
        if jail is not None:
            await asyncio.to_thread(jail.release)
        shutil.rmtree(workdir, ignore_errors=True)


async def _run_probe(argv: list[str], jail: jailer.Jail | None) -> bool:
    """Run the probe VM of ``argv`` and report whether the marker came out in time."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=jail.join_cgroups if jail is not None else None,
    )
    seen = b""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            assert proc.stdout is not None
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return PROBE_MARKER in seen


async def detect_accel(qemu: str, qemu_version: str, kernel: Path, initramfs: Path) -> str:
    """``kvm`` or ``tcg`` for this host, probing once and caching the answer."""
    forced = accel_override()
    if forced:
        return forced
    if not kvm_device_usable():
        return "tcg"
    key = cache_key(platform.release(), qemu_version, str(kernel), str(initramfs))
    try:
        cached = json.loads(_cache_file().read_text())
        if cached.get("key") == key and cached.get("accel") in ACCELS:
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    accel = "kvm" if await probe_kvm(qemu, kernel, initramfs) else "tcg"
    _cache_file().parent.mkdir(parents=True, exist_ok=True)
    _cache_file().write_text(json.dumps({"key": key, "accel": accel}))
    return accel
