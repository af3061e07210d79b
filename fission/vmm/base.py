"""The interface every VMM driver implements: QEMU (``qemu_driver``), the fake for tests (``fake``).

Core never names a VMM: it holds one ``Driver``, chosen once (``default_driver()`` is QEMU), and
asks it for VMs in its own terms:

* ``configure(VMRequest)``: a ``VMConfig`` for "image X shaped so" or "a clone of image X's warm
  template", optionally with a persistent disk in a directory (sandboxes). Whatever that needs
  (images, disks, building the warm template on first use) is the driver's business, so a
  driver without images or snapshot files (the fake) implements it trivially;
* ``start(config)``: the VM booted (or restored, when ``config.incoming`` names a saved state)
  and its agent's HELLO received, as a ``Machine``; nothing is left behind if that fails;
* ``restored(config, directory)``: the config of a VM that resumes what a pause saved there;
* ``attach(config, facts)``: a ``Machine`` for a VM another process started (``detached``, so it
  outlived that process): its control socket and agent re-opened, its process watched and
  killed by pid and start time. ``VirtualMachine.attachment()`` gives the facts to keep for it.

A ``VirtualMachine`` owns one VMM process and everything it made: the process, its control
socket (QMP for QEMU), the agent channel's far end and the VM's directory. Lifecycle:
``start()`` -> (``pause()``/``resume()``, ``save_state()``) -> ``destroy()``, which releases
everything and is safe to call twice.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fission.agent.client import AgentClient
from fission.config import runtime_dir
from fission.errors import BootTimeout, InvalidInput, VMError, VMStartFailed

# Guest RAM on top of the program's memory limit, for the guest kernel and the agent.
GUEST_OVERHEAD_MB = 96
# The shape of every warm template and so of every clone: runs whose limits fit it get a clone.
TEMPLATE_VCPUS = 1
TEMPLATE_CAPACITY_MB = 1024  # the largest program memory limit a clone serves
TEMPLATE_MEMORY_MB = TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB
TEMPLATE_DISK_MB = 512
TEMPLATE_SHAPE = (TEMPLATE_VCPUS, TEMPLATE_MEMORY_MB, TEMPLATE_DISK_MB)
# What a pause leaves in its directory: the VM's own disk and its saved state.
DISK_NAME = "disk.qcow2"
STATE_NAME = "state"
DEFAULT_BOOT_TIMEOUT = 60.0


@dataclass(frozen=True)
class VMConfig:
    """A validated description of one microVM; drivers receive this, never a request."""

    vm_id: str
    kernel: Path
    initramfs: Path
    rootfs: Path
    scratch: Path
    vcpus: int
    memory_mb: int
    workdir: Path
    kernel_args: tuple[str, ...] = field(default_factory=tuple)
    # Snapshots ("VM templating"): guest RAM lives in ``memory_file``. A template is booted
    # with ``memory_shared`` (its writes land in the file) and a writable scratch disk; each
    # clone maps the same file privately (copy-on-write, pages shared between clones) and
    # restores the device state saved in ``incoming``.
    memory_file: Path | None = None
    memory_shared: bool = False
    scratch_writable: bool = False
    incoming: Path | None = None
    # ``qcow2`` for a sandbox's own overlay (its writes persist across pause and resume).
    scratch_format: str = "raw"
    # The warm template a clone comes from (its directory), for caches built on top of it.
    template: Path | None = None
    # Restoring a whole migration stream saved from a clone: RAM is anonymous memory under the
    # template's backend id (``ram``) instead of the template's file mapped privately. The
    # stream overwrites every page anyway; anonymous RAM leaves its zero pages untouched and
    # maps no file, which halves a restored VM's PSS (550 -> 275 MiB measured).
    memory_anonymous: bool = False
    # A sandbox's VM: it does not die with the process that started it (no parent-death
    # signal, its jail's uid kept while it lives), so a restarted daemon can re-attach to it.
    detached: bool = False


PATH_FIELDS = ("kernel", "initramfs", "rootfs", "scratch", "workdir", "memory_file", "incoming")


def config_to_json(config: VMConfig) -> dict[str, Any]:
    """``config`` as JSON (paths as strings), for a catalog a later process re-attaches from."""
    data = dataclasses.asdict(config)
    for name in (*PATH_FIELDS, "template"):
        if data[name] is not None:
            data[name] = str(data[name])
    data["kernel_args"] = list(config.kernel_args)
    return data


def config_from_json(data: dict[str, Any]) -> VMConfig:
    """The config ``config_to_json`` wrote."""
    values = dict(data)
    for name in (*PATH_FIELDS, "template"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    values["kernel_args"] = tuple(values.get("kernel_args", ()))
    return VMConfig(**values)


class VMEnded(VMError):
    """The VM to re-attach to has ended (its process is gone)."""


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do on this host."""

    name: str
    accel: str
    snapshots: bool


class Host(NamedTuple):
    """The VMM binary, its version and the accelerator chosen for this host."""

    vmm: str
    version: str
    accel: str


@dataclass(frozen=True)
class WarmTemplate:
    """How an image's warm template is made, in terms any driver understands.

    ``kernel_args`` go to the template's guest (e.g. the fork server's preloads); ``warm_up``
    runs in the booted template before it is saved: it warms the guest's caches and asks the
    agent to get ready for the snapshot.
    """

    kernel_args: tuple[str, ...]
    warm_up: Callable[[AgentClient], Awaitable[None]] = field(compare=False)


@dataclass(frozen=True)
class VMRequest:
    """A VM core asks for: ``image`` booted cold in this shape, or (``warm``) a clone of the
    image's warm template, which always has the template's shape.

    ``memory_mb`` is the guest's RAM (the program's limit plus ``GUEST_OVERHEAD_MB``). With
    ``disk_dir`` the VM gets a disk of its own there (``DISK_NAME``) whose writes survive a pause;
    otherwise its writes vanish with it.
    """

    image: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    warm: WarmTemplate | None = None
    disk_dir: Path | None = None

    def __post_init__(self) -> None:
        shape = (self.vcpus, self.memory_mb, self.disk_mb)
        if self.warm is not None and shape != TEMPLATE_SHAPE:
            raise ValueError(f"a clone has the template's shape, not {shape}")

    @classmethod
    def clone(cls, image: str, warm: WarmTemplate, disk_dir: Path | None = None) -> VMRequest:
        """A clone of ``image``'s warm template (built on first use)."""
        return cls(image, *TEMPLATE_SHAPE, warm, disk_dir)


class VirtualMachine(abc.ABC):
    """One microVM and its VMM process."""

    config: VMConfig

    @abc.abstractmethod
    async def start(self) -> None:
        """Spawn the VMM and boot the guest, or restore ``config.incoming`` into it; return once
        the agent channel can be opened."""

    @abc.abstractmethod
    async def open_agent_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the guest agent."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the guest's vCPUs where they are (QMP ``stop``); it costs no CPU until resumed."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Let a paused guest run again (QMP ``cont``)."""

    @abc.abstractmethod
    async def save_state(self, path: Path) -> None:
        """Write the guest's state (RAM excluded when file-backed) to ``path``; the VM is
        paused when this returns, and a VM whose ``incoming`` is ``path`` resumes it."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Stop the VMM and remove everything the VM owned; safe to call more than once."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this VM's driver supports."""

    @abc.abstractmethod
    def diagnostics(self) -> str:
        """The tail of the VMM's and the guest console's logs, for error messages."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM process id, or None once it is gone (or when there is no process)."""

    def running(self) -> bool:
        """Whether the VMM still runs."""
        return self.pid is not None

    def attachment(self) -> dict[str, Any]:
        """What a later process needs to re-attach to this VM (``Driver.attach``), as JSON:
        at least ``pid`` and ``start_time`` of the VMM process (None without a process)."""
        return {"pid": self.pid, "start_time": None}

    def cpu_seconds(self) -> float | None:
        """CPU time the VMM has used so far (user and system), or None when the driver cannot
        tell; idle VMs are stopped only while this stays low."""
        return None


class Machine(NamedTuple):
    """A running VM and the client of its agent."""

    vm: VirtualMachine
    agent: AgentClient

    async def destroy(self) -> None:
        """Close the agent channel and destroy the VM (safe to call twice)."""
        await self.agent.close()
        await self.vm.destroy()


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


def vm_workdir(vm_id: str) -> Path:
    """The directory of VM ``vm_id`` under this process's runtime dir."""
    return runtime_dir() / f"vm-{vm_id}"


class Driver(abc.ABC):
    """One VMM on this host, chosen once per process: it makes VMs and knows the host's facts."""

    name: str

    @abc.abstractmethod
    async def host(self) -> Host:
        """The VMM binary, its version and the accelerator this host uses."""

    @abc.abstractmethod
    async def configure(self, request: VMRequest) -> VMConfig:
        """The config of a new VM for ``request``, with everything it needs made ready."""

    @abc.abstractmethod
    async def create(self, config: VMConfig) -> VirtualMachine:
        """A VM for ``config``, not started yet."""

    @abc.abstractmethod
    def release_stale(self, vm_ids: list[str]) -> int:
        """Remove what VMs of a crashed process left on the host besides their directories
        (e.g. cgroups); ``vm_ids`` were that process's. Returns how many things went."""

    def layer_disk(self, base: Path, target: Path) -> None:
        """Create ``target``, a disk of a VM's own whose unwritten blocks read from the saved
        disk ``base`` (a snapshot's), so VMs started from one snapshot write independently."""
        raise NotImplementedError(f"the {self.name} driver cannot start VMs from snapshots")

    async def adopt(self, config: VMConfig, attachment: dict[str, Any]) -> VirtualMachine:
        """A VM object for the running VMM ``attachment`` describes (started by another
        process); VMError if that process has ended. Its ``destroy`` removes everything."""
        raise VMError(f"the {self.name} driver cannot re-attach to a running VM")

    async def attach(self, config: VMConfig, attachment: dict[str, Any]) -> Machine:
        """Re-attach to a running VM another process started: control socket, agent channel,
        a handshake that sets its clock (no reseed: it is the same VM). VMError if it has
        ended or its agent does not answer; what is left of it is then destroyed."""
        vm = await self.adopt(config, attachment)
        agent: AgentClient | None = None
        try:
            if not vm.running():
                raise VMEnded(f"VM {config.vm_id} (pid {attachment.get('pid')}) has ended")
            deadline = boot_timeout()
            try:
                async with asyncio.timeout(deadline):
                    agent = AgentClient(*await vm.open_agent_channel())
                    await agent.reattach(deadline)
            except TimeoutError as exc:
                raise VMError(f"its agent did not answer within {deadline:.0f} s") from exc
            except OSError as exc:
                raise VMError(f"its agent channel cannot be opened: {exc}") from exc
            return Machine(vm, agent)
        except BaseException:
            if agent is not None:
                await agent.close()
            await vm.destroy()
            raise

    def restored(self, config: VMConfig, directory: Path, *, keep_writes: bool) -> VMConfig:
        """A new VM shaped like ``config`` that resumes the state a pause saved in ``directory``,
        on the disk there: its writes kept (a sandbox) or thrown away with it (a cache)."""
        vm_id = new_vm_id()
        return dataclasses.replace(
            config,
            vm_id=vm_id,
            workdir=config.workdir.parent / f"vm-{vm_id}",
            memory_file=None,
            memory_shared=False,
            memory_anonymous=config.memory_file is not None or config.memory_anonymous,
            scratch=directory / DISK_NAME,
            scratch_format="qcow2",
            scratch_writable=keep_writes,
            incoming=directory / STATE_NAME,
        )

    async def start(self, config: VMConfig) -> Machine:
        """Start a VM for ``config`` and wait for its agent's HELLO; nothing is left on failure."""
        vm = await self.create(config)
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
                raise VMStartFailed(
                    f"the VM stopped while booting: {exc}\n{vm.diagnostics()}"
                ) from exc
            return Machine(vm, agent)
        except BaseException:
            if agent is not None:
                await agent.close()
            await vm.destroy()
            raise


@functools.cache
def default_driver() -> Driver:
    """The driver of this process when none is given: QEMU."""
    from fission.vmm.qemu_driver import QemuDriver  # imported late: it pulls in QEMU's modules

    return QemuDriver()
