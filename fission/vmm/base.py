"""The interface every VMM driver implements (QEMU now, Firecracker next).

A driver owns one VMM process and everything it made: the process, its control socket (QMP
for QEMU, the REST API socket for Firecracker), the agent channel and the VM's directory.
Lifecycle: ``start()`` boots (or, later, restores) the VM; ``open_agent_channel()`` gives a byte
stream to the guest agent; ``destroy()`` releases everything and is safe to call twice.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do on this host."""

    name: str
    accel: str
    snapshots: bool


class VirtualMachine(abc.ABC):
    """One microVM and its VMM process."""

    config: VMConfig

    @abc.abstractmethod
    async def start(self) -> None:
        """Spawn the VMM and boot the guest; return once the agent channel can be opened."""

    @abc.abstractmethod
    async def open_agent_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the guest agent."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Stop the VMM and remove everything the VM owned; safe to call more than once."""

    @abc.abstractmethod
    async def save_state(self, path: Path) -> None:
        """Pause the VM and write its device state (RAM excluded when file-backed) to ``path``."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this VM's driver supports."""

    @abc.abstractmethod
    def diagnostics(self) -> str:
        """The tail of the VMM's and the guest console's logs, for error messages."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM process id, or None once it is gone."""
