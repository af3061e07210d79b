"""Runs a program in a fresh microVM: pick images, boot, exec, collect, destroy.

Every VM is destroyed on every path out of ``run`` (result, error, cancellation), and the VM's
directory goes with it. Two deadlines bound a run: ``boot_timeout`` (VMM start to agent HELLO,
``FISSION_BOOT_TIMEOUT``) and the program's own ``timeout``; the guest agent enforces the latter
and the host enforces it again ``KILL_GRACE`` seconds later by destroying the VM, so a wedged
guest cannot outlive its run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time

from fission.agent.client import AgentClient, ExecOutcome, ExecRequest, OutputSink
from fission.config import runtime_dir
from fission.core.limits import MB
from fission.core.spec import RunResult, RunSpec
from fission.errors import BootTimeout, InvalidInput, VMError, VMStartFailed
from fission.images.scratch import scratch_disk
from fission.images.store import ImageSet, image_set
from fission.vmm.accel import detect_accel, tcg_kernel_args
from fission.vmm.base import VMConfig
from fission.vmm.qemu import QemuVM, qemu_binary, qemu_version

# Guest RAM on top of the program's memory limit, for the guest kernel and the agent.
GUEST_OVERHEAD_MB = 96
KILL_GRACE = 2.0
TIMEOUT_EXIT_CODE = 124
DEFAULT_BOOT_TIMEOUT = 60.0


def boot_timeout() -> float:
    """Seconds a VM may take from VMM start to the agent's HELLO (``FISSION_BOOT_TIMEOUT``)."""
    raw = os.environ.get("FISSION_BOOT_TIMEOUT")
    if not raw:
        return DEFAULT_BOOT_TIMEOUT
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidInput(f"FISSION_BOOT_TIMEOUT={raw!r} is not a number of seconds") from exc
    if not 1 <= value <= 600:
        raise InvalidInput(f"FISSION_BOOT_TIMEOUT={raw} is out of range: use 1 to 600 seconds")
    return value


@functools.cache
def _cached_qemu_version(qemu: str) -> str:
    return qemu_version(qemu)


def exec_request(spec: RunSpec) -> ExecRequest:
    """The agent request that runs ``spec``'s program under its limits."""
    language, limits = spec.language, spec.limits
    return ExecRequest(
        argv=list(language.argv),
        env=language.env | spec.env,
        timeout=limits.timeout,
        memory_bytes=limits.memory_mb * MB,
        pids_max=limits.pids,
        output_limit=limits.output_limit_bytes,
        script=spec.code,
        script_name=language.script_name,
    )


async def vm_config(images: ImageSet, spec: RunSpec, accel: str) -> VMConfig:
    """The VM description for ``spec``: its images, scratch disk, CPUs and memory."""
    vm_id = secrets.token_hex(6)
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


async def boot(spec: RunSpec) -> tuple[QemuVM, AgentClient]:
    """Start a VM for ``spec`` and return it with a ready agent; nothing is left on failure."""
    images = image_set(spec.language.image)
    qemu = qemu_binary()
    version = _cached_qemu_version(qemu)
    accel = await detect_accel(qemu, version, images.kernel, images.initramfs)
    vm = QemuVM(await vm_config(images, spec, accel), qemu, accel)
    agent: AgentClient | None = None
    try:
        await vm.start()
        deadline = boot_timeout()
        try:
            async with asyncio.timeout(deadline):
                agent = AgentClient(*await vm.open_agent_channel())
                await agent.handshake(deadline)
        except TimeoutError as exc:
            raise BootTimeout(
                f"the guest agent did not answer within {deadline:.0f} s "
                f"(raise FISSION_BOOT_TIMEOUT on slow hosts)\n"
                f"{vm.diagnostics()}"
            ) from exc
        except VMError as exc:
            raise VMStartFailed(f"the VM stopped while booting: {exc}\n{vm.diagnostics()}") from exc
        return vm, agent
    except BaseException:
        if agent is not None:
            await agent.close()
        await vm.destroy()
        raise


async def run(spec: RunSpec, on_output: OutputSink | None = None) -> RunResult:
    """Run ``spec`` in a fresh microVM, streaming output to ``on_output`` as it arrives."""
    started = time.monotonic()
    vm, agent = await boot(spec)
    try:
        return await run_in_vm(
            vm, agent, spec, on_output, boot_ms=(time.monotonic() - started) * 1000
        )
    finally:
        await agent.close()
        await vm.destroy()


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
        outcome = ExecOutcome(TIMEOUT_EXIT_CODE, 0, True, False, False, elapsed)
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
