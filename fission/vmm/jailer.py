"""Applying a jail plan (``jail``): host facts, uid slots, lent files, cgroups, the template RAM.

A ``Jail`` owns everything it set up for one VMM process and releases it once, in
``release()``: the processes left in its cgroups are killed and the cgroups removed, the files
lent to the VM's uid are given back to their owners, and its uid slot is freed. Uid slots are
``flock``s on files under ``SLOT_DIR``, so every fission process on the host (daemon, embedded
``fission run``, tests) picks distinct uids, and a crashed process's slots free themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.errors import Busy, VMStartFailed
from fission.vmm import cgroups, jail_plan
from fission.vmm.base import VMConfig
from fission.vmm.binary import qemu_version
from fission.vmm.jail_plan import Decision, HostFacts, JailPlan, Placement
from fission.waiting import WaitTimeout, wait_until

log = logging.getLogger("fission.jail")
SLOT_DIR = Path("/run/fission/jail")
ROOT_ENTRIES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 64  # backing files followed below a VM's disk (forks of forks of ...)
RAM_STAMP_SUFFIX = ".jail-ctime"
PROBE_MEMORY_MB = 128


@functools.cache
def host_facts(qemu: str | None = None) -> HostFacts:
    """The facts the jail depends on (read once per process)."""
    entries: list[tuple[str, str | None]] = []
    for name in ROOT_ENTRIES:
        if os.path.islink(name):
            entries.append((name, os.readlink(name)))
        elif os.path.isdir(name):
            entries.append((name, None))
    kvm_mode = kvm_gid = None
    with contextlib.suppress(OSError):
        st = os.stat("/dev/kvm")
        kvm_mode, kvm_gid = stat.S_IMODE(st.st_mode), st.st_gid
    return HostFacts(
        euid=os.geteuid(),
        bwrap=shutil.which("bwrap"),
        setpriv=shutil.which("setpriv"),
        layout=cgroups.detect_layout(),
        qemu_version=qemu_version(qemu) if qemu else "",
        root_entries=tuple(entries),
        ld_cache=os.path.exists("/etc/ld.so.cache"),
        kvm_mode=kvm_mode,
        kvm_gid=kvm_gid,
    )


def decision() -> Decision:
    """Whether this process jails its VMs (``FISSION_JAIL`` and the host), logged once."""
    result = jail_plan.decide(jail_plan.jail_setting(), host_facts())
    _log_once(result)
    return result


@functools.cache
def _log_once(result: Decision) -> None:
    log.info("VMM jail %s: %s", "on" if result.enabled else "off", result.reason)


def mount_of(path: Path) -> tuple[str, set[str]]:
    """The filesystem type and mount options of the mount holding ``path``."""
    best, found = -1, ("", set[str]())
    target = str(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 6 or not tail:
                continue
            point = fields[4].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) > best:
                best, found = len(point), (tail[0], set(fields[5].split(",")))
    return found


def qcow2_backing(path: Path) -> Path | None:
    """The backing file named in a qcow2 header (relative names are relative to ``path``)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode()
    except (OSError, UnicodeDecodeError):
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def placement(config: VMConfig) -> Placement:
    """Where the VM of ``config`` keeps its files (device nodes allowed, disk in RAM or not)."""
    _, options = mount_of(config.workdir)
    backing = qcow2_backing(config.scratch) if config.scratch_format == "qcow2" else None
    deeper: list[Path] = []
    below = qcow2_backing(backing) if backing is not None else None
    while below is not None and below not in deeper and len(deeper) < MAX_CHAIN:
        deeper.append(below)
        below = qcow2_backing(below)
    disk_writes = config.scratch if config.scratch_writable else config.workdir
    fstype, _ = mount_of(disk_writes)
    try:
        disk_bytes = (backing or config.scratch).stat().st_size
    except OSError:
        disk_bytes = 0
    return Placement(
        workdir_nodev="nodev" in options,
        disk_on_tmpfs=fstype == "tmpfs",
        disk_bytes=disk_bytes,
        backing=backing,
        deeper=tuple(deeper),
    )


@dataclass
class SlotLease:
    """One id slot of the reserved range, held (``flock``) until ``release``."""

    slot: int
    fd: int | None

    @classmethod
    def acquire(cls, directory: Path = SLOT_DIR, slots: int = jail_plan.JAIL_SLOTS) -> SlotLease:
        """Take a free slot (starting at a random one); Busy when all are taken.

        The lock is opened read-only: a detached VMM inherits it (it holds its slot after its
        daemon exits) and must not be able to write the file. A VMM could still unlock it, so
        a slot whose uid still runs a process is skipped as well."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = secrets.randbelow(slots)
        for index in range(slots):
            slot = (start + index) % slots
            fd = os.open(directory / f"{slot}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if uid_runs(jail_plan.JAIL_ID_BASE + slot):
                os.close(fd)
                continue
            return cls(slot, fd)
        raise Busy(f"all {slots} jail uids are in use: destroy some VMs first")

    def release(self) -> None:
        """Free the slot (safe twice)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def uid_runs(uid: int) -> bool:
    """Whether any process runs as ``uid`` (a scan of /proc)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
    return False


def open_template_ram(memory: Path, readonly: bool) -> None:
    """Let clones (group ``TEMPLATE_RAM_GID``) open a template's RAM file, and check that no
    VM changed it since: QEMU before 8.2 opens it read-write, so its ctime (which nobody but
    root can set back) is recorded the first time and compared every time after."""
    mode = 0o640 if readonly else 0o660
    stamp = memory.with_name(memory.name + RAM_STAMP_SUFFIX)
    fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one process opens it up at a time
        st = os.fstat(fd)
        if st.st_gid != jail_plan.TEMPLATE_RAM_GID or stat.S_IMODE(st.st_mode) != mode:
            os.fchown(fd, -1, jail_plan.TEMPLATE_RAM_GID)
            os.fchmod(fd, mode)
            stamp.unlink(missing_ok=True)
            st = os.fstat(fd)
        try:
            recorded = int(stamp.read_text())
        except (OSError, ValueError):
            tmp = stamp.with_name(stamp.name + f".{os.getpid()}")
            tmp.write_text(str(st.st_ctime_ns))
            os.replace(tmp, stamp)
            return
        if recorded != st.st_ctime_ns:
            raise VMStartFailed(
                f"the snapshot RAM {memory} changed after clones were allowed to map it (a VM "
                f"may have written it): remove {memory.parent} so the snapshot is rebuilt"
            )
    finally:
        os.close(fd)


@dataclass
class Jail:
    """What was set up for one jailed VMM process; ``release`` undoes it."""

    plan: JailPlan
    lease: SlotLease
    facts: HostFacts
    lent: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    cgroup_dirs: list[Path] = field(default_factory=list)
    released: bool = False

    @classmethod
    def for_vm(cls, config: VMConfig, qemu: str, accel: str, tb_size_mb: int) -> Jail:
        """Plan and set up the jail of the VM of ``config``; nothing is left if it fails."""
        facts = host_facts(qemu)
        lease = SlotLease.acquire()
        try:
            place = placement(config)
            plan = jail_plan.plan_vm(config, qemu, accel, facts, lease.slot, place, tb_size_mb)
        except BaseException:
            lease.release()
            raise
        return cls.set_up(plan, lease, facts)

    @classmethod
    def for_probe(cls, qemu: str, kernel: Path, initramfs: Path, workdir: Path) -> Jail:
        """The jail of the KVM probe: a VM of ``kernel`` and ``initramfs`` only."""
        facts = host_facts(qemu)
        lease = SlotLease.acquire()
        try:
            seen = jail_plan.Exposure(read_only=(kernel, initramfs), read_write=(workdir,))
            _, options = mount_of(workdir)
            place = Placement(workdir_nodev="nodev" in options)
            vm_id = f"probe-{secrets.token_hex(4)}"
            plan = jail_plan.plan(
                vm_id, qemu, seen, workdir, "kvm", PROBE_MEMORY_MB, 1, facts, lease.slot, place, 0
            )
        except BaseException:
            lease.release()
            raise
        return cls.set_up(plan, lease, facts)

    @classmethod
    def set_up(cls, plan: JailPlan, lease: SlotLease, facts: HostFacts) -> Jail:
        """Apply ``plan`` (files, device node, cgroups); release everything if a step fails."""
        self = cls(plan, lease, facts)
        try:
            self._prepare()
        except BaseException:
            self.release()
            raise
        return self

    def _prepare(self) -> None:
        plan = self.plan
        for path in plan.create:
            if not path.exists():
                path.touch(mode=0o600)
        if plan.kvm_node is not None:
            plan.kvm_node.unlink(missing_ok=True)
            os.mknod(plan.kvm_node, stat.S_IFCHR | 0o600, os.makedev(10, 232))
        for bind in plan.binds:
            if bind.kind == "ro" and bind.source != plan.template_ram:
                self._check_readable(bind.source)
        if plan.template_ram is not None:
            open_template_ram(plan.template_ram, plan.readonly_ram)
        for path in plan.lend:
            self.lent.append((path, os.lstat(path)))
            os.chown(path, plan.uid, plan.gid, follow_symlinks=False)
        for hierarchy in plan.hierarchies:
            self.cgroup_dirs.append(cgroups.create(hierarchy, plan.vm_id, plan.limits))

    def _check_readable(self, path: Path) -> None:
        """A read-only file must be world-readable: the VM's uid owns nothing."""
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise VMStartFailed(f"{path} is missing: {exc}") from exc
        need = 0o005 if stat.S_ISDIR(mode) else 0o004
        if mode & need != need:
            raise VMStartFailed(
                f"{path} is not readable by others (mode {stat.S_IMODE(mode):o}); the jailed "
                f"VMM runs as an unprivileged uid: chmod o+r {path}, or FISSION_JAIL=off"
            )

    def wrap(self, argv: list[str], die_with_parent: bool = True) -> list[str]:
        """The jailed command line for QEMU's ``argv``."""
        return jail_plan.jail_argv(self.plan, self.facts, argv, die_with_parent)

    def to_json(self) -> dict[str, Any]:
        """What a later process needs to release this jail (``AdoptedJail``), as JSON."""
        return AdoptedJail(self.plan.vm_id, self.plan.uid, self.cgroup_dirs, self.lent).to_json()

    def join_cgroups(self) -> None:
        """In the child before exec: enter the VM's cgroups (so no instant runs outside them)."""
        cgroups.join(self.cgroup_dirs)

    def vmm_pid(self) -> int | None:
        """The QEMU process: the one running as this VM's uid (its cgroup's, else any)."""
        candidates: list[int | str] = []
        if self.cgroup_dirs:
            candidates += cgroups.pids(self.cgroup_dirs[0])
        else:
            candidates += [e for e in os.listdir("/proc") if e.isdigit()]
        for pid in candidates:
            try:
                if os.stat(f"/proc/{pid}").st_uid == self.plan.uid:
                    return int(pid)
            except OSError:
                continue
        return None

    def release(self) -> None:
        """Kill what is left, remove the cgroups, give back lent files, free the uid (once)."""
        if self.released:
            return
        self.released = True
        gone = all([cgroups.remove(directory) for directory in self.cgroup_dirs])
        if not self.cgroup_dirs:
            gone = self._wait_uid_gone()
        for path, before in reversed(self.lent):
            give_back(path, before)
        if gone:
            self.lease.release()
        else:  # a process of this uid may live on: never hand the uid to another VM
            log.warning(
                "VM %s left processes behind; keeping uid %d reserved",
                self.plan.vm_id,
                self.plan.uid,
            )

    def _wait_uid_gone(self, deadline_s: float = 5.0) -> bool:
        """Without cgroups: kill and wait until no process runs as this VM's uid."""

        def gone() -> bool:
            pid = self.vmm_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            return pid is None

        try:
            wait_until(
                gone,
                timeout=deadline_s,
                interval=0.005,
                what=f"the processes of uid {self.plan.uid} to die",
                setting="Jail._wait_uid_gone(deadline_s)",
            )
        except WaitTimeout:
            return False
        return True


@dataclass
class AdoptedJail:
    """The jail of a detached VMM another process started; ``release`` undoes it.

    Its uid slot's lock is held by the VMM itself (it inherited the descriptor), so the slot
    frees itself when the VMM is gone; nothing here holds it.
    """

    vm_id: str
    uid: int
    cgroup_dirs: list[Path]
    lent: list[tuple[Path, os.stat_result]]
    released: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdoptedJail:
        """The jail ``Jail.to_json`` described."""
        lent = [
            (Path(path), os.stat_result((mode, 0, 0, 0, uid, gid, 0, 0, 0, 0)))
            for path, mode, uid, gid in data.get("lent", [])
        ]
        dirs = [Path(d) for d in data.get("cgroup_dirs", [])]
        return cls(str(data["vm_id"]), int(data["uid"]), dirs, lent)

    def to_json(self) -> dict[str, Any]:
        """The same facts ``Jail.to_json`` gave, for the next process to re-attach."""
        return {
            "vm_id": self.vm_id,
            "uid": self.uid,
            "cgroup_dirs": [str(d) for d in self.cgroup_dirs],
            "lent": [[str(p), b.st_mode, b.st_uid, b.st_gid] for p, b in self.lent],
        }

    def vmm_pid(self) -> int | None:
        """The QEMU process: the one in its cgroup running as this VM's uid."""
        for pid in cgroups.pids(self.cgroup_dirs[0]) if self.cgroup_dirs else []:
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid == self.uid:
                    return pid
        return None

    def release(self) -> None:
        """Kill what is left in its cgroups, remove them, give back lent files (once)."""
        if self.released:
            return
        self.released = True
        gone = all([cgroups.remove(directory) for directory in self.cgroup_dirs])
        for path, before in reversed(self.lent):
            give_back(path, before)
        if not gone:
            log.warning("VM %s left processes behind in its cgroups", self.vm_id)


def give_back(path: Path, before: os.stat_result) -> None:
    """Return a lent file to its owner and mode, through a descriptor: the VM's uid may have
    replaced what lies in its own directory with a symlink, which is then left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, or a symlink now
        return
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) == stat.S_IFMT(before.st_mode):
            os.fchown(fd, before.st_uid, before.st_gid)
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
    finally:
        os.close(fd)


def remove_stale_cgroups(owned_ids: list[str]) -> int:
    """Remove the ``fission/vm-*`` cgroups a crashed fission left (see ``cgroups.remove_stale``)."""
    return cgroups.remove_stale(cgroups.detect_layout(), owned_ids)
