"""Starting microVMs and reaching their agents: the one place a VM comes to life.

Used by the orchestrator (cold boots and clones of snapshots) and by the snapshot builder
(templates). Every path that fails after the VMM was spawned destroys the VM before raising.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import NamedTuple

from fission.agent.client import AgentClient, ExecRequest
from fission.core.limits import MB
from fission.core.spec import RunSpec
from fission.errors import BootTimeout, InvalidInput, VMError, VMStartFailed
from fission.images.store import ImageSet
from fission.net.egress import proxy_env
from fission.vmm.accel import detect_accel
from fission.vmm.base import VMConfig
from fission.vmm.binary import qemu_binary, qemu_version
from fission.vmm.qemu import QemuVM

# Guest RAM on top of the program's memory limit, for the guest kernel and the agent.
GUEST_OVERHEAD_MB = 96
DEFAULT_BOOT_TIMEOUT = 60.0


class Machine(NamedTuple):
    """A running VM and the client of its agent."""

    vm: QemuVM
    agent: AgentClient

    async def destroy(self) -> None:
        """Close the agent channel and destroy the VM (safe to call twice)."""
        await self.agent.close()
        await self.vm.destroy()


class Host(NamedTuple):
    """The VMM binary, its version and the accelerator chosen for this host."""

    qemu: str
    version: str
    accel: str


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


def new_vm_id() -> str:
    """A fresh random VM id (also the name of its directory)."""
    return secrets.token_hex(6)


async def detect_host(images: ImageSet) -> Host:
    """The QEMU to use, its version and the accelerator (probed once per host, cached)."""
    qemu = qemu_binary()
    version = qemu_version(qemu)
    accel = await detect_accel(qemu, version, images.kernel, images.initramfs)
    return Host(qemu, version, accel)


def exec_request(spec: RunSpec) -> ExecRequest:
    """The agent request that runs ``spec``'s program under its limits."""
    language, limits = spec.language, spec.limits
    return ExecRequest(
        argv=list(language.argv),
        env=language.env | proxy_env(spec.network) | spec.env,
        timeout=limits.timeout,
        memory_bytes=limits.memory_mb * MB,
        pids_max=limits.pids,
        output_limit=limits.output_limit_bytes,
        script=spec.code,
        script_name=language.script_name,
        mode=language.mode,
    )


async def start_machine(config: VMConfig, host: Host) -> Machine:
    """Start the VM of ``config`` and wait for its agent's HELLO; nothing is left on failure."""
    vm = QemuVM(config, host.qemu, host.accel)
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
                f"(raise FISSION_BOOT_TIMEOUT on slow hosts)\n{vm.diagnostics()}"
            ) from exc
        except (VMError, OSError) as exc:
            raise VMStartFailed(f"the VM stopped while booting: {exc}\n{vm.diagnostics()}") from exc
        return Machine(vm, agent)
    except BaseException:
        if agent is not None:
            await agent.close()
        await vm.destroy()
        raise
