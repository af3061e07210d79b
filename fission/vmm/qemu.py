"""The QEMU driver: one ``qemu-system-x86_64 -M microvm`` process per VM.

The command line is built by a pure function (``qemu_argv``, in its own module) and
unit-tested; ``QemuVM`` only spawns, watches and kills. What each VM gets:

* no NIC at all (``-nic none``, and ``-nodefaults`` so no other device appears);
* the language's root disk read-only, and a writable scratch disk attached with
  ``snapshot=on``: QEMU writes to a temporary copy-on-write overlay in the VM's directory, so the
  cached disk never changes and the writes vanish with the VM. The scratch disk's size is the
  run's disk cap;
* the agent on a virtio-serial port backed by a Unix socket, QMP on another;
* virtio-rng fed from the host's /dev/urandom;
* QEMU's seccomp sandbox (no obsolete syscalls, no privilege changes, no spawning, no
  resource-control calls), and SIGKILL if the process that started it dies, unless the VM is
  ``detached`` (a sandbox's, which outlives its daemon: it keeps its jail's uid slot by
  inheriting the slot's lock, and a later daemon re-attaches with ``QemuVM.adopt``);
* when fission runs as root, a jail (``jail``, ``jailer``): its own uid, namespaces, a minimal
  root, no capabilities and a cgroup (``FISSION_JAIL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from fission.errors import VMError, VMStartFailed
from fission.vmm import jailer
from fission.vmm.base import Capabilities, VirtualMachine, VMConfig
from fission.vmm.processes import kill_group, process_start_time, same_process
from fission.vmm.qemu_argv import TCG_TB_SIZE_MB, QemuPaths, qemu_argv
from fission.waiting import WaitTimeout, refused, retry, wait_for

log = logging.getLogger("fission.qemu")
MIGRATION_BANDWIDTH = 16 * 1024**3  # bytes per second: no throttle in practice
SOCKET_WAIT_SECONDS = 10.0
SAVE_STATE_SECONDS = 120.0
POLL_SECONDS = 0.005  # how often a start-up wait looks again
MIGRATION_POLL_SECONDS = 0.01
PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent(parent: int | None = None) -> None:
    """In the child before exec: SIGKILL this process when its parent dies.

    A parent that died between the fork and the prctl would never send the signal, so the
    child checks that its parent is still ``parent`` and exits otherwise.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _jailed_child(jail: jailer.Jail, parent: int | None) -> None:
    """In the child before exec: die with the parent (unless detached: ``parent`` None), and
    enter the VM's cgroups."""
    if parent is not None:
        _die_with_parent(parent)
    jail.join_cgroups()


def _detached_child() -> None:
    """In the child before exec of a detached, unjailed VMM: nothing to set up."""


def tail(path: Path, lines: int = 60, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log file, or an empty string.

    The VM's directory belongs to the jailed VMM's uid, which could swap a log for a symlink,
    a FIFO or a huge file: only a regular file is read (no symlink followed, never blocking),
    and only its last ``max_bytes``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode):
            return ""
        f.seek(max(0, size.st_size - max_bytes))
        text = f.read(max_bytes).decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class QemuVM(VirtualMachine):
    """One QEMU microVM process and the directory it owns."""

    def __init__(self, config: VMConfig, qemu: str, accel: str) -> None:
        self.config = config
        self.qemu = qemu
        self.accel = accel
        self.paths = QemuPaths(config.workdir)
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._jail: jailer.Jail | jailer.AdoptedJail | None = None
        self._vmm_pid: int | None = None
        self._destroyed = False
        # A VMM another process started (``adopt``): its pid and that process's start time.
        self._adopted: tuple[int, int | None] | None = None

    @classmethod
    def adopt(cls, config: VMConfig, qemu: str, accel: str, attachment: dict[str, Any]) -> QemuVM:
        """The detached VM of ``config`` whose VMM ``attachment`` names (``attachment()`` of
        the process that started it); ``running()`` is False once that process has ended."""
        vm = cls(config, qemu, accel)
        pid = attachment.get("pid")
        vm._adopted = (int(pid) if pid else 0, attachment.get("start_time"))
        jail = attachment.get("jail")
        if isinstance(jail, dict):
            vm._jail = jailer.AdoptedJail.from_json(jail)
        return vm

    @property
    def pid(self) -> int | None:
        """The QEMU process id while it runs."""
        if self._adopted is not None:
            pid, start = self._adopted
            return pid if same_process(pid, start) else None
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    def attachment(self) -> dict[str, Any]:
        """The VMM's pid and start time, and its jail's cgroups and lent files."""
        pid = self.pid
        facts: dict[str, Any] = {
            "pid": pid,
            "start_time": process_start_time(pid) if pid else None,
        }
        if self._jail is not None:  # kept across restarts: destroy needs its cgroups
            facts["jail"] = self._jail.to_json()
        return facts

    @property
    def jail(self) -> jailer.Jail | jailer.AdoptedJail | None:
        """The jail around QEMU, or None when VMs run unjailed (``FISSION_JAIL``)."""
        return self._jail

    @property
    def vmm_pid(self) -> int | None:
        """QEMU's own process id (``pid`` is bubblewrap's when jailed)."""
        if self._jail is None or self.pid is None:
            return self.pid
        if self._vmm_pid is None:
            self._vmm_pid = self._jail.vmm_pid()
        return self._vmm_pid

    def cpu_seconds(self) -> float | None:
        """QEMU's CPU time so far (its utime and stime from /proc), None once it is gone."""
        pid = self.vmm_pid
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def capabilities(self) -> Capabilities:
        """QEMU supports snapshots (used from the warm-start work on)."""
        return Capabilities(name="qemu", accel=self.accel, snapshots=True)

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``): an idle guest then costs no CPU."""
        await self.qmp("stop")

    async def resume(self) -> None:
        """Let the vCPUs run again (QMP ``cont``, about a millisecond)."""
        await self.qmp("cont")

    async def start(self) -> None:
        """Spawn QEMU; return once its sockets listen (the guest then boots on its own)."""
        self.config.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(self.config.workdir)}
        argv = qemu_argv(self.qemu, self.config, self.accel)
        detached = self.config.detached
        child_setup: Callable[[], None] = functools.partial(_die_with_parent, os.getpid())
        if detached:
            child_setup = _detached_child
        inherit: tuple[int, ...] = ()
        if jailer.decision().enabled:
            jail = await asyncio.to_thread(
                jailer.Jail.for_vm, self.config, self.qemu, self.accel, TCG_TB_SIZE_MB
            )
            self._jail = jail
            readonly = jail.plan.readonly_ram
            argv = jail.wrap(qemu_argv(self.qemu, self.config, self.accel, readonly), not detached)
            child_setup = functools.partial(_jailed_child, jail, None if detached else os.getpid())
            if detached and jail.lease.fd is not None:
                # The VMM holds its uid slot's lock too, so the uid stays its own after the
                # daemon exits (the lock frees itself when the last holder is gone).
                inherit = (jail.lease.fd,)
        try:
            with self.paths.qemu_log.open("wb") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                    preexec_fn=child_setup,
                    pass_fds=inherit,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            raise VMStartFailed(f"cannot start {self.qemu}: {exc}") from exc
        try:
            await wait_for(
                self._sockets_bound,
                timeout=SOCKET_WAIT_SECONDS,
                interval=POLL_SECONDS,
                what="QEMU to open its sockets",
                setting="qemu.SOCKET_WAIT_SECONDS",
            )
        except WaitTimeout as exc:
            raise VMStartFailed(
                f"QEMU did not open its sockets within "
                f"{SOCKET_WAIT_SECONDS:.0f} s:\n{tail(self.paths.qemu_log)}"
            ) from exc
        if self.config.incoming is not None:
            await self._restore(self.config.incoming)

    async def _sockets_bound(self) -> bool:
        """Whether QEMU has bound both its sockets; VMStartFailed once it has exited."""
        assert self._proc is not None
        if self._proc.returncode is not None:
            raise VMStartFailed(
                f"QEMU exited with code {self._proc.returncode} while "
                f"starting:\n{tail(self.paths.qemu_log)}"
            )
        return self.paths.agent_socket.exists() and self.paths.qmp_socket.exists()

    def _refused_while_running(self, exc: Exception) -> bool:
        """Whether to connect again: QEMU runs and has bound the socket but does not listen yet."""
        return self.running() and refused(exc)

    async def continue_if_stopped(self) -> None:
        """Let the vCPUs run if they were stopped (an idle sandbox's, at re-attach)."""
        status = await self.qmp("query-status")
        if isinstance(status, dict) and status.get("status") == "paused":
            await self.qmp("cont")

    async def _ignore_shared_memory(self) -> None:
        """RAM in a file is not part of the migration stream (templates and their clones).

        A VM restoring a clone's stream sets it too: both ends must agree on the format.
        """
        if self.config.memory_file is not None or self.config.memory_anonymous:
            capability = {"capability": "x-ignore-shared", "state": True}
            await self.qmp("migrate-set-capabilities", capabilities=[capability])

    async def _pass_fd(self, path: Path, flags: int, name: str) -> None:
        """Open ``path`` here and give QEMU the descriptor as ``name`` (QMP getfd).

        QEMU's seccomp sandbox forbids it to spawn ``exec:`` helpers, so files for
        migration are opened by the host side and handed over with SCM_RIGHTS.
        """
        client = await self._qmp_client()
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            client.send_fd_scm(fd)
            await self.qmp("getfd", fdname=name)
        finally:
            os.close(fd)

    async def _restore(self, state: Path) -> None:
        """Load the saved state into this (``-incoming defer``) VM; it then runs by itself."""
        try:
            await self._ignore_shared_memory()
            await self._pass_fd(state, os.O_RDONLY, "fission-state")
            await self.qmp("migrate-incoming", uri="fd:fission-state")
        except Exception as exc:
            raise VMStartFailed(
                f"restoring the VM state failed: {exc}\n{self.diagnostics()}"
            ) from exc

    async def open_agent_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the agent's virtio-serial socket (retrying while QEMU is not listening)."""
        return await retry(
            lambda: asyncio.open_unix_connection(str(self.paths.agent_socket), limit=1 << 20),
            retry_on=self._refused_while_running,
            timeout=SOCKET_WAIT_SECONDS,
            interval=POLL_SECONDS,
            what="QEMU's agent socket to accept a connection",
            setting="qemu.SOCKET_WAIT_SECONDS",
        )

    async def _qmp_client(self) -> QMPClient:
        if self._destroyed:
            raise VMError(f"VM {self.config.vm_id} is destroyed")
        if self._qmp is None:
            self._qmp = await retry(
                self._connect_qmp,
                retry_on=self._refused_while_running,
                timeout=SOCKET_WAIT_SECONDS,
                interval=POLL_SECONDS,
                what="QEMU's QMP socket to accept a connection",
                setting="qemu.SOCKET_WAIT_SECONDS",
            )
        return self._qmp

    async def _connect_qmp(self) -> QMPClient:
        """One attempt to connect to QMP (qemu.qmp wraps a refusal in its ConnectError)."""
        client = QMPClient(f"fission-{self.config.vm_id}")
        await client.connect(str(self.paths.qmp_socket))
        return client

    async def qmp(self, command: str, **arguments: object) -> object:
        """Run one QMP command (e.g. ``query-status``) and return its result."""
        client = await self._qmp_client()
        async with asyncio.timeout(SOCKET_WAIT_SECONDS):
            return await client.execute(command, dict(arguments) or None)

    async def save_state(self, path: Path) -> None:
        """Migrate the running guest's state into ``path``; QEMU pauses it when done.

        The guest is not stopped first, so the saved state says "running" and a clone resumes
        by itself as soon as it has loaded it (no extra QMP round trip on the hot path).
        """
        await self._ignore_shared_memory()
        # QEMU throttles migration (to 128 MiB/s by default), meant for a live network link;
        # into a local file the faster the better: the guest is paused at the end anyway.
        await self.qmp("migrate-set-parameters", **{"max-bandwidth": MIGRATION_BANDWIDTH})
        await self._pass_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "fission-state")
        await self.qmp("migrate", uri="fd:fission-state")
        # Polled rather than awaited as a MIGRATION event: the event needs the ``events``
        # capability, and a QEMU that dies mid-save never sends it, whereas ``query-migrate``
        # on a closed QMP socket fails at once.
        try:
            await wait_for(
                self._migration_done,
                timeout=SAVE_STATE_SECONDS,
                interval=MIGRATION_POLL_SECONDS,
                what="QEMU to finish saving the VM state",
                setting="qemu.SAVE_STATE_SECONDS",
            )
        except WaitTimeout as exc:
            raise VMError(f"saving the VM state failed: {exc}") from exc

    async def _migration_done(self) -> bool:
        """Whether the outgoing migration has completed; VMError once it failed."""
        info = await self.qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status) if isinstance(info, dict) else info
            raise VMError(f"saving the VM state failed: {detail}")
        return status == "completed"

    def diagnostics(self) -> str:
        """Recent QEMU and guest console output."""
        parts = []
        qemu_tail, console_tail = tail(self.paths.qemu_log), tail(self.paths.console_log)
        if qemu_tail:
            parts.append("QEMU: " + qemu_tail)
        if console_tail:
            parts.append("guest console:\n" + console_tail)
        return "\n".join(parts)

    async def destroy(self) -> None:
        """Kill QEMU (the VM is disposable: no orderly shutdown) and remove its directory."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._qmp is not None:
            client, self._qmp = self._qmp, None
            try:
                async with asyncio.timeout(1.0):
                    await client.disconnect()
            except Exception:
                pass
        proc = self._proc
        if self._adopted is not None:
            await self._kill_adopted(*self._adopted)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(10.0):
                    await proc.wait()
            except TimeoutError:  # pragma: no cover - SIGKILL does not time out in practice
                pass
        if self._jail is not None:
            await asyncio.to_thread(self._jail.release)
        shutil.rmtree(self.config.workdir, ignore_errors=True)

    @staticmethod
    async def _kill_adopted(pid: int, start_time: int | None) -> None:
        """Kill a VMM this process did not start (not its child: it cannot be waited for, so
        its end is polled for, by pid and start time)."""
        if not kill_group(pid, start_time):
            return

        async def ended() -> bool:
            return not same_process(pid, start_time)

        try:
            await wait_for(
                ended,
                timeout=10.0,
                interval=MIGRATION_POLL_SECONDS,
                what=f"QEMU (pid {pid}) to end",
                setting="qemu.QemuVM._kill_adopted",
            )
        except WaitTimeout:  # pragma: no cover - SIGKILL does not time out in practice
            log.warning("QEMU pid %d did not end after SIGKILL", pid)
