"""Runs a program in a fresh microVM: pick images, boot, exec, collect, destroy.

Every VM is destroyed on every path out of ``run`` (result, error, cancellation), and the VM's
directory goes with it. Two deadlines bound a run: ``boot_timeout`` (VMM start to agent HELLO,
``FISSION_BOOT_TIMEOUT``) and the program's own ``timeout``; the guest agent enforces the latter
and the host enforces it again ``KILL_GRACE`` seconds later by destroying the VM, so a wedged
guest cannot outlive its run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fission.agent.client import AgentClient, ExecOutcome, OutputSink
from fission.config import runtime_dir
from fission.core import snapshots
from fission.core.audit_events import audit_local_egress
from fission.core.languages import Language
from fission.core.machines import (
    GUEST_OVERHEAD_MB,
    Host,
    Machine,
    detect_host,
    exec_request,
    new_vm_id,
    start_machine,
)
from fission.core.spec import RunResult, RunSpec
from fission.core.transfers import Download, Upload, pull, push
from fission.errors import VMError
from fission.images.scratch import scratch_disk
from fission.images.store import ImageSet, image_set
from fission.net.egress import attach
from fission.vmm.accel import tcg_kernel_args
from fission.vmm.base import VMConfig
from fission.vmm.qemu import QemuVM

KILL_GRACE = 2.0
TIMEOUT_EXIT_CODE = 124


async def cold_config(images: ImageSet, spec: RunSpec, accel: str) -> VMConfig:
    """A VM booted from scratch for ``spec``: its own CPUs, memory and disk size."""
    vm_id = new_vm_id()
    scratch = await asyncio.to_thread(scratch_disk, spec.limits.disk_mb)
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=scratch,
        vcpus=spec.limits.cpus,
        memory_mb=spec.limits.memory_mb + GUEST_OVERHEAD_MB,
        workdir=runtime_dir() / f"vm-{vm_id}",
        kernel_args=tcg_kernel_args() if accel == "tcg" else (),
    )


def clone_config(images: ImageSet, snapshot: snapshots.Snapshot) -> VMConfig:
    """A clone of ``snapshot``: the template's shape, private copy-on-write RAM and disk."""
    vm_id = new_vm_id()
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=snapshot.scratch,
        vcpus=snapshots.TEMPLATE_VCPUS,
        memory_mb=snapshots.TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB,
        workdir=runtime_dir() / f"vm-{vm_id}",
        kernel_args=snapshot.kernel_args,
        memory_file=None if snapshot.full else snapshot.memory,
        memory_shared=False,
        incoming=snapshot.state,
    )


async def ensure_snapshot(images: ImageSet, host: Host) -> snapshots.Snapshot:
    """The language's snapshot, built now (once, about ten seconds under TCG) if missing."""
    return await snapshots.build_snapshot(images, host.qemu, host.version, host.accel)


async def boot(spec: RunSpec, *, warm: bool = True) -> Machine:
    """A ready VM for ``spec``: a clone of the warm snapshot when it fits, else a cold boot."""
    images = image_set(spec.language.image)
    host = await detect_host(images)
    if warm and snapshots.fits(spec.limits):
        snapshot = await ensure_snapshot(images, host)
        return await start_machine(clone_config(images, snapshot), host)
    return await start_machine(await cold_config(images, spec, host.accel), host)


async def run(
    spec: RunSpec,
    on_output: OutputSink | None = None,
    uploads: tuple[Upload, ...] = (),
    downloads: tuple[Download, ...] = (),
) -> RunResult:
    """Run ``spec`` in a fresh microVM, streaming output to ``on_output`` as it arrives.

    ``uploads`` are copied in before the program starts, ``downloads`` out after it ended.
    Every connection the egress proxy allows or refuses goes to the audit log.
    """
    started = time.monotonic()
    vm, agent = await boot(spec)
    egress = None
    events: list[dict[str, Any]] = []
    try:
        egress = await attach(agent, spec.network, events.append)
        await push(agent, uploads)
        result = await run_in_vm(
            vm, agent, spec, on_output, boot_ms=(time.monotonic() - started) * 1000
        )
        await pull(agent, downloads)
        return result
    finally:
        if egress is not None:
            await egress.aclose()
        await agent.close()
        await vm.destroy()
        await audit_local_egress(spec, events, "run.egress")


async def run_in_vm(
    vm: QemuVM,
    agent: AgentClient,
    spec: RunSpec,
    on_output: OutputSink | None = None,
    boot_ms: float = 0.0,
) -> RunResult:
    """Run ``spec``'s program in a booted VM under its limits; the caller destroys the VM.

    If the guest has not reported an exit ``KILL_GRACE`` seconds after the program's timeout
    (a wedged or paused guest), the result is a timeout and the VM must not be reused.
    """
    started = time.monotonic()
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def sink(stream: str, data: bytes) -> None:
        chunks[stream].append(data)
        if on_output is not None:
            on_output(stream, data)

    try:
        async with asyncio.timeout(spec.limits.timeout + KILL_GRACE):
            outcome = await agent.exec(exec_request(spec), sink, spec.stdin)
    except TimeoutError:
        elapsed = (time.monotonic() - started) * 1000.0
        capped = (
            sum(map(len, chunks["stdout"] + chunks["stderr"])) >= spec.limits.output_limit_bytes
        )
        outcome = ExecOutcome(TIMEOUT_EXIT_CODE, 0, True, False, capped, elapsed)
    except VMError as exc:
        raise type(exc)(f"{exc}\n{vm.diagnostics()}".rstrip()) from exc
    return RunResult(
        exit_code=TIMEOUT_EXIT_CODE if outcome.timed_out else outcome.exit_code,
        stdout=b"".join(chunks["stdout"]),
        stderr=b"".join(chunks["stderr"]),
        timed_out=outcome.timed_out,
        oom=outcome.oom,
        truncated=outcome.output_truncated,
        signal=outcome.signal,
        duration_ms=outcome.duration_ms,
        boot_ms=boot_ms,
        total_ms=boot_ms + (time.monotonic() - started) * 1000.0,
    )


async def warm_clone(language: Language) -> Machine:
    """A clone of the language's snapshot that has run its warm-up (for the pools).

    The warm-up translates the guest's hot paths in this QEMU process (its code cache starts
    empty) and uses up the fork server's first warm child; waiting for the next one means the
    user's run starts on a child that is already confined and waiting.
    """
    machine = await boot(RunSpec(language, language.warm_up))
    try:
        await snapshots.warm_up(machine.agent, language)
        await machine.agent.prepare_snapshot(snapshots.PREPARE_TIMEOUT)
    except BaseException:
        await machine.destroy()
        raise
    return machine
