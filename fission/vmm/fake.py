"""A fake VMM driver for tests of the control plane: no images, no QEMU, no KVM, no snapshots.

``FakeDriver`` makes ``FakeVM``\\s whose guest is a ``FakeGuest`` (``fake_guest``) task on the far
end of a socketpair. The host's real ``AgentClient`` speaks the real protocol to it, so
everything above the driver (pools, the memory budget, sandboxes, quotas, the Service and the
adapters) runs for real, in milliseconds. Programs run as host subprocesses without any
isolation: test code only, nothing in fission's own paths imports this module.

How the driver's operations map:

* ``configure``: nothing to find or build. A clone is a VM of the template's shape that boots
  like any other; a disk of its own is an empty placeholder file (``DISK_NAME``) in the
  directory given, since a fake VM keeps its files in its state;
* ``start``: the VM's private root (``<workdir>/root``, holding the agent's roots
  /home/sandbox, /tmp and /data) is made, or restored from ``config.incoming``;
* ``save_state``: the guest pauses and its files (the whole private root) go into a tar at the
  path; a VM whose ``incoming`` is that path gets them back;
* ``pause``/``resume``: the guest stops reading frames and its programs are SIGSTOPped;
* ``attach``: a detached VM (a sandbox's) keeps its guest when the host closes the channel;
  ``adopt`` finds it among the VMs made (``vms``) and hands the guest a new channel;
* ``destroy``: the guest's task is cancelled (its programs killed), the socket ends the VM still
  holds are closed and its directory removed; safe to call twice.

The driver remembers every VM it made (``vms``, ``live``), so tests can look inside one
(``FakeVM.home``, ``FakeVM.guest.execs``) and check that none is left running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fission.errors import VMError, VMStartFailed
from fission.guest import files
from fission.vmm.base import (
    DISK_NAME,
    Capabilities,
    Driver,
    Host,
    VirtualMachine,
    VMConfig,
    VMRequest,
    new_vm_id,
    vm_workdir,
)
from fission.vmm.fake_guest import FakeGuest
from fission.vmm.jailer import QCOW2_MAGIC

# A fake VM boots nothing: its kernel, initramfs and root disk are never opened.
NO_IMAGE = Path(os.devnull)
CHANNEL_LIMIT = 1 << 20  # the stream buffer of the agent channel, as for QEMU's socket


class FakeVM(VirtualMachine):
    """A VM whose guest is a ``FakeGuest`` task; its files live in its directory."""

    def __init__(self, config: VMConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.guest: FakeGuest | None = None
        self.destroyed = asyncio.Event()  # set once everything the VM made is released
        self._destroying = False
        self._clock = clock
        self._host_end: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel_taken = False
        self._file_work: set[asyncio.Task[None]] = set()

    @property
    def root(self) -> Path:
        """The host directory holding the guest's files (its roots: home/sandbox, tmp, data)."""
        return self.config.workdir / "root"

    @property
    def home(self) -> Path:
        """The host directory standing for the guest's /home/sandbox."""
        return self.root / "home" / "sandbox"

    @property
    def pid(self) -> int | None:
        """None: the guest is a task of this process, not a VMM process of its own."""
        return None

    def capabilities(self) -> Capabilities:
        """Snapshots work (they hold the guest's files); there is no accelerator."""
        return Capabilities(name="fake", accel="none", snapshots=True)

    async def start(self) -> None:
        """Make (or restore) the guest's files and start serving its end of the channel."""
        if self._destroying or self.guest is not None:
            raise VMStartFailed(f"fake VM {self.config.vm_id} cannot be started again")
        try:
            await self._in_thread(self._make_root)
        except (OSError, tarfile.TarError) as exc:
            raise VMStartFailed(f"restoring fake VM {self.config.vm_id} failed: {exc}") from exc
        self._host_end, guest_end = socket.socketpair()
        self.guest = FakeGuest(guest_end, self.root, self._clock, self.config.detached)
        self._task = asyncio.create_task(self.guest.serve(), name=f"fake-{self.config.vm_id}")

    def _make_root(self) -> None:
        self.config.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.config.incoming is not None:
            with tarfile.open(self.config.incoming) as tar:
                tar.extractall(self.root, filter="data")
        for root in files.ROOTS:
            (self.root / root.lstrip("/")).mkdir(parents=True, exist_ok=True)

    async def open_agent_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The host's end of the socketpair, once (the agent client then owns it)."""
        if self._host_end is None or self._channel_taken or self._destroying:
            raise VMError(f"fake VM {self.config.vm_id} has no agent channel to open")
        self._channel_taken = True
        return await asyncio.open_unix_connection(sock=self._host_end, limit=CHANNEL_LIMIT)

    def running(self) -> bool:
        """Whether the guest is being served (started and not destroyed)."""
        return self.guest is not None and not self._destroying

    def attachment(self) -> dict[str, Any]:
        """A fake VM has no process: the driver finds it again by its id."""
        return {"pid": None, "start_time": None}

    def reconnect(self) -> None:
        """Give the (detached) guest a fresh channel whose host end ``open_agent_channel``
        returns next: the last host closed its own."""
        guest = self._running_guest()
        self._host_end, guest_end = socket.socketpair()
        self._channel_taken = False
        guest.reconnect(guest_end)

    async def pause(self) -> None:
        """Freeze the guest: no frame is read and no program runs until ``resume``."""
        self._running_guest().pause()

    async def resume(self) -> None:
        """Let a paused guest run again."""
        self._running_guest().resume()

    async def save_state(self, path: Path) -> None:
        """Pause the guest and write its files to ``path`` (a tar)."""
        self._running_guest().pause()
        await self._in_thread(self._write_state, path)

    def _write_state(self, path: Path) -> None:
        with tarfile.open(path, "w") as tar:
            tar.add(self.root, arcname=".")

    async def _in_thread(self, work: Callable[..., None], *args: object) -> None:
        """Run file work in a thread that ``destroy`` waits for: a thread is not cancelled
        with the task awaiting it, and must not write into the directory being removed."""
        task = asyncio.ensure_future(asyncio.to_thread(work, *args))
        self._file_work.add(task)
        task.add_done_callback(self._file_work.discard)
        # Its failure is raised here, or, if the caller has gone, dropped with the VM.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(task)

    def _running_guest(self) -> FakeGuest:
        if self.guest is None or self._destroying:
            raise VMError(f"fake VM {self.config.vm_id} is not running")
        return self.guest

    async def destroy(self) -> None:
        """Kill the guest and its programs, close the sockets, remove the directory."""
        if self._destroying:
            await self.destroyed.wait()
            return
        self._destroying = True
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait([self._task])
            if self.guest is not None:
                self.guest.close()
            if self._host_end is not None and not self._channel_taken:
                self._host_end.close()
            if self._file_work:
                await asyncio.wait(self._file_work)
            await asyncio.to_thread(shutil.rmtree, self.config.workdir, True)
        finally:
            self.destroyed.set()

    def diagnostics(self) -> str:
        """What went wrong inside the fake guest, if anything."""
        lines = self.guest.log[-20:] if self.guest is not None else []
        return "\n".join([f"fake VM {self.config.vm_id}", *lines])


class FakeDriver(Driver):
    """Makes fake VMs and remembers each; ``clock`` times the runs (``duration_ms``)."""

    name = "fake"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.vms: list[FakeVM] = []

    @property
    def live(self) -> list[FakeVM]:
        """The VMs made and not yet destroyed."""
        return [vm for vm in self.vms if not vm.destroyed.is_set()]

    async def host(self) -> Host:
        """No VMM binary and no accelerator."""
        return Host(vmm="fake", version="1", accel="none")

    async def configure(self, request: VMRequest) -> VMConfig:
        """A config of the request's shape; a disk of its own is a placeholder file."""
        vm_id = new_vm_id()
        scratch = NO_IMAGE
        if request.disk_dir is not None:
            scratch = request.disk_dir / DISK_NAME
            scratch.touch()
        return VMConfig(
            vm_id=vm_id,
            kernel=NO_IMAGE,
            initramfs=NO_IMAGE,
            rootfs=NO_IMAGE,
            scratch=scratch,
            vcpus=request.vcpus,
            memory_mb=request.memory_mb,
            workdir=vm_workdir(vm_id),
            scratch_writable=request.disk_dir is not None,
            scratch_format="raw" if request.disk_dir is None else "qcow2",
        )

    async def create(self, config: VMConfig) -> FakeVM:
        """A fake VM for ``config``, remembered in ``vms``."""
        vm = FakeVM(config, self.clock)
        self.vms.append(vm)
        return vm

    def layer_disk(self, base: Path, target: Path) -> None:
        """A placeholder disk whose header names ``base`` as its backing file, as qcow2 does."""
        name = str(base).encode()
        header = QCOW2_MAGIC + struct.pack(">IQI", 3, 20, len(name))
        target.write_bytes(header + name)

    async def adopt(self, config: VMConfig, attachment: dict[str, Any]) -> FakeVM:
        """The VM of ``config`` if it still runs (with a fresh channel), else a stand-in that
        is not running and whose ``destroy`` removes what is left of it."""
        for vm in self.live:
            if vm.config.vm_id == config.vm_id and vm.running():
                vm.reconnect()
                if vm.guest is not None and vm.guest.paused:  # stopped for idleness
                    vm.guest.resume()
                return vm
        return await self.create(config)

    def release_stale(self, vm_ids: list[str]) -> int:
        """Nothing: a fake VM leaves nothing on the host but its directory."""
        return 0

    async def wait_all_destroyed(self, timeout: float) -> None:
        """Return once every VM made is destroyed; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self.live:
                await self.live[0].destroyed.wait()
