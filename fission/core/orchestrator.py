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
from fission.core import snapshots
from fission.core.audit_events import audit_local_egress
from fission.core.languages import Language
from fission.core.machines import Machine, exec_request
from fission.core.spec import RunResult, RunSpec
from fission.core.transfers import Download, Upload, pull, push
from fission.errors import VMError
from fission.net.egress import attach
from fission.vmm.base import Driver, VirtualMachine, default_driver

KILL_GRACE = 2.0
TIMEOUT_EXIT_CODE = 124


async def boot(spec: RunSpec, *, warm: bool = True, driver: Driver | None = None) -> Machine:
    """A ready VM for ``spec``: a clone of the warm snapshot when it fits, else a cold boot."""
    driver = driver or default_driver()
    return await driver.start(await driver.configure(snapshots.vm_request(spec, warm=warm)))


async def run(
    spec: RunSpec,
    on_output: OutputSink | None = None,
    uploads: tuple[Upload, ...] = (),
    downloads: tuple[Download, ...] = (),
    driver: Driver | None = None,
) -> RunResult:
    """Run ``spec`` in a fresh microVM, streaming output to ``on_output`` as it arrives.

    ``uploads`` are copied in before the program starts, ``downloads`` out after it ended.
    Every connection the egress proxy allows or refuses goes to the audit log.
    """
    started = time.monotonic()
    vm, agent = await boot(spec, driver=driver)
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
    vm: VirtualMachine,
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


async def warm_clone(language: Language, driver: Driver | None = None) -> Machine:
    """A clone of the language's snapshot that has run its warm-up (for the pools).

    The warm-up translates the guest's hot paths in this QEMU process (its code cache starts
    empty) and uses up the fork server's first warm child; waiting for the next one means the
    user's run starts on a child that is already confined and waiting.
    """
    machine = await boot(RunSpec(language, language.warm_up), driver=driver)
    try:
        await snapshots.warm_up(machine.agent, language)
        await machine.agent.prepare_snapshot(snapshots.PREPARE_TIMEOUT)
    except BaseException:
        await machine.destroy()
        raise
    return machine
