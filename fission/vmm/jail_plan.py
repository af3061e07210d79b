"""The jail around each VMM process, planned by pure functions (applied by ``jailer``).

Like Firecracker's jailer, every QEMU process gets, on top of QEMU's own seccomp sandbox:

* its own **uid and gid**, ``900000 + slot``: one pair per running VM, taken from a reserved
  range of ``JAIL_SLOTS`` ids that owns nothing else on the host (``fission doctor`` checks
  that no user, group or subordinate-id range overlaps it). One id per VM rather than one
  shared ``fission-vmm`` user, because a uid is the last wall when the others fall: a QEMU that
  escaped its mount namespace still could not open another VM's directory (sockets, disk
  overlay, logs: each owned by that VM's uid, mode 0700) nor signal or trace its process;
* new **mount, pid, ipc, uts, network and cgroup namespaces** (bubblewrap, a well-kept tool,
  does the unsharing and the ``pivot_root``), with ``--die-with-parent`` (except a sandbox's
  detached VM, which outlives its daemon) and a new session;
* a **minimal root**: a read-only tmpfs holding ``/usr`` (and the merged-/usr links), the
  loader cache, a fresh ``/dev`` (null, zero, urandom, ...; ``/dev/kvm`` only under KVM) and
  ``/proc``, plus only this VM's files, at the same paths as on the host so the QEMU command
  line needs no rewriting: kernel, initramfs and root disk read-only, the scratch disk
  read-only (``snapshot=on`` writes go to a temporary file in the VM's directory) or read-write
  when it is the VM's own (a template's disk, a sandbox's qcow2 overlay, whose raw backing file
  stays read-only), and the VM directory read-write (QEMU creates its sockets and console log
  there). Files a VM writes are lent to its uid while it runs and handed back on destroy;
* **no capabilities** and ``no_new_privs``: bubblewrap keeps only what ``setpriv`` (util-linux)
  needs to switch to the VM's uid/gid, and setpriv clears the bounding and inheritable sets;
* a **cgroup** with memory, pids and CPU limits sized from the VM (see ``cgroup_limits``);
* a **clean environment** (only ``TMPDIR``) and **only stdin, stdout and stderr** inherited
  (a sandbox's detached VM also holds its uid slot's lock, opened read-only, so the uid stays
  its own after the daemon exits).

A clone maps its template's RAM file privately. QEMU before 8.2 opens that file read-write even
then (8.2 added ``readonly=on,rom=off`` for exactly this), so on such QEMU the file is bound
read-write and made writable by one supplementary group, ``TEMPLATE_RAM_GID``, that clones get:
a VM that takes over its QEMU could then change the RAM later clones start from. ``jailer``
detects that afterwards (the file's ctime is recorded when it is opened up to clones, and
checked before each clone), and ``fission doctor`` reports it.

``FISSION_JAIL=auto|on|off`` chooses: ``auto`` (default) jails when fission runs as root and
bwrap and setpriv exist, else runs unjailed and says why; ``on`` refuses to start a VM unjailed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fission.errors import InvalidInput, NotReady, VMStartFailed
from fission.vmm.base import VMConfig
from fission.vmm.cgroups import CgroupLimits, Hierarchy, Layout

SETTINGS = ("auto", "on", "off")
JAIL_ID_BASE = 900_000
JAIL_SLOTS = 1024
TEMPLATE_RAM_GID = JAIL_ID_BASE - 1
HOSTNAME = "fission"
MIB = 1024 * 1024
# QEMU's own memory besides guest RAM, measured here (7.2, microvm): about 37 MiB resident
# when idle (15 anonymous), more with block I/O buffers and the migration stream; under TCG
# add the translation buffer (``tb-size``), which fills up to its size as the guest runs code.
QEMU_BASE_MB = 64
# Threads: main loop, RCU, one per vCPU, and a block I/O pool of up to 64 workers; plus the
# two bubblewrap processes (outside and init). QEMU aborts if it cannot make a thread.
PIDS_BASE = 96
CPU_PERIOD_US = 100_000
CPU_IO_SHARE = 0.25  # a quarter CPU on top of the vCPUs for QEMU's main loop and I/O
SETPRIV_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
PRIVATE_READONLY_RAM_QEMU = (8, 2)


def jail_setting() -> str:
    """``FISSION_JAIL`` (``auto`` when unset)."""
    value = os.environ.get("FISSION_JAIL", "").strip().lower() or "auto"
    if value not in SETTINGS:
        raise InvalidInput(f"FISSION_JAIL={value!r} is not valid: use auto, on or off")
    return value


@dataclass(frozen=True)
class HostFacts:
    """What the jail depends on, read once from this host (see ``jailer.host_facts``)."""

    euid: int
    bwrap: str | None
    setpriv: str | None
    layout: Layout
    qemu_version: str = ""
    # Top-level entries besides /usr the loader needs: (path, symlink target or None for a dir).
    root_entries: tuple[tuple[str, str | None], ...] = ()
    ld_cache: bool = True
    kvm_mode: int | None = None
    kvm_gid: int | None = None

    def problems(self) -> list[str]:
        """Why the jail cannot be used here (empty when it can), each with its fix."""
        found = []
        if self.euid != 0:
            found.append(
                f"fission runs as uid {self.euid}, not root: only root can give each VM its own "
                "uid and namespaces (run the daemon as root)"
            )
        if not self.bwrap:
            found.append("bwrap is not installed (apt-get install bubblewrap)")
        if not self.setpriv:
            found.append("setpriv is not installed (apt-get install util-linux)")
        return found


@dataclass(frozen=True)
class Decision:
    """Whether VMs are jailed, and why."""

    enabled: bool
    reason: str


def decide(setting: str, facts: HostFacts) -> Decision:
    """Jail or not under ``setting``; NotReady when ``on`` cannot be honoured."""
    if setting == "off":
        return Decision(False, "FISSION_JAIL=off")
    problems = facts.problems()
    if problems and setting == "on":
        raise NotReady("FISSION_JAIL=on but the jail cannot be used: " + "; ".join(problems))
    if problems:
        return Decision(False, "; ".join(problems))
    return Decision(True, f"FISSION_JAIL={setting}: root, bwrap and setpriv are present")


def private_readonly_ram(qemu_version: str) -> bool:
    """True when this QEMU maps a read-only RAM file privately (``readonly=on,rom=off``)."""
    match = re.match(r"(\d+)\.(\d+)", qemu_version)
    if match is None:
        return False
    return (int(match[1]), int(match[2])) >= PRIVATE_READONLY_RAM_QEMU


@dataclass(frozen=True)
class Placement:
    """Facts about where one VM's files are."""

    workdir_nodev: bool = False  # the VM directory's filesystem forbids device nodes
    disk_on_tmpfs: bool = False  # the VM's disk writes land in RAM (tmpfs)
    disk_bytes: int = 0  # the size of its writable disk
    backing: Path | None = None  # the raw file under a qcow2 overlay
    # Further down the chain: a sandbox started from a snapshot has an overlay on the
    # snapshot's qcow2 disk, itself an overlay on the template's raw disk.
    deeper: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Exposure:
    """The host files one VM's root holds, beside the system ones."""

    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()  # lent to the VM's uid while it runs
    create: tuple[Path, ...] = ()  # made empty (when missing) and lent before start
    template_ram: Path | None = None  # a template's RAM that this clone maps privately


def exposure(
    config: VMConfig, backing: Path | None = None, deeper: tuple[Path, ...] = ()
) -> Exposure:
    """What the VM of ``config`` needs to see (``backing``: its qcow2 overlay's base, and
    ``deeper`` the bases of that base)."""
    read_only = [config.kernel, config.initramfs, config.rootfs]
    read_write = [config.workdir]
    create: list[Path] = []
    (read_write if config.scratch_writable else read_only).append(config.scratch)
    if backing is not None:
        read_only.append(backing)
    read_only.extend(deeper)
    template_ram = None
    if config.memory_file is not None and config.memory_shared:
        create.append(config.memory_file)  # a template writes its RAM into this file
        read_write.append(config.memory_file)
    elif config.memory_file is not None:
        template_ram = config.memory_file
    return Exposure(tuple(read_only), tuple(read_write), tuple(create), template_ram)


@dataclass(frozen=True)
class Bind:
    """One host path shown inside the jail at the same path."""

    source: Path
    dest: Path
    kind: str  # "ro", "rw" or "dev"


@dataclass(frozen=True)
class JailPlan:
    """Everything needed to jail one VMM process; ``jailer.Jail`` applies it."""

    vm_id: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    binds: tuple[Bind, ...]
    dirs: tuple[Path, ...]  # directories made (0755, root) in the new root before binding
    lend: tuple[Path, ...]  # chowned to uid:gid while the VM runs
    create: tuple[Path, ...]
    limits: CgroupLimits
    hierarchies: tuple[Hierarchy, ...]
    env: tuple[tuple[str, str], ...] = ()
    template_ram: Path | None = None
    readonly_ram: bool = False  # QEMU maps the template RAM with readonly=on,rom=off
    kvm_node: Path | None = None  # a private /dev/kvm node made in the VM directory
    cgroup_dirs: tuple[Path, ...] = field(default=())


def vmm_overhead_mb(accel: str, tb_size_mb: int) -> int:
    """Memory QEMU needs besides guest RAM under ``accel``."""
    return QEMU_BASE_MB + (tb_size_mb if accel == "tcg" else 0)


def cgroup_limits(
    memory_mb: int, vcpus: int, accel: str, tb_size_mb: int, tmpfs_disk_bytes: int = 0
) -> CgroupLimits:
    """Limits of a VM with ``memory_mb`` of guest RAM and ``vcpus``.

    ``tmpfs_disk_bytes``: disk writes that land in a tmpfs are RAM charged to the VM's cgroup,
    so a VM whose directory is on tmpfs gets its disk size on top.
    """
    memory = (memory_mb + vmm_overhead_mb(accel, tb_size_mb)) * MIB + tmpfs_disk_bytes
    quota = int((vcpus + CPU_IO_SHARE) * CPU_PERIOD_US)
    return CgroupLimits(memory, PIDS_BASE + vcpus, quota, CPU_PERIOD_US)


def _kvm_binds(facts: HostFacts, workdir: Path, place: Placement) -> tuple[Bind, int | None]:
    """How the jail's ``/dev/kvm`` is provided, and the group it needs (if any)."""
    dev = Path("/dev/kvm")
    if facts.kvm_mode is None:
        raise VMStartFailed("KVM was chosen but /dev/kvm does not exist (FISSION_ACCEL=tcg)")
    if facts.kvm_mode & 0o006 == 0o006:
        return Bind(dev, dev, "dev"), None
    if facts.kvm_gid and facts.kvm_mode & 0o060 == 0o060:
        return Bind(dev, dev, "dev"), facts.kvm_gid
    if not place.workdir_nodev:
        return Bind(workdir / "kvm", dev, "dev"), None
    raise VMStartFailed(
        "the jail cannot give the VM /dev/kvm: it is root-only and the VM directory's "
        "filesystem is mounted nodev; give /dev/kvm to a group (chgrp kvm /dev/kvm; "
        "chmod 660 /dev/kvm), or set FISSION_ACCEL=tcg or FISSION_JAIL=off"
    )


def _covered(path: Path, trees: list[Path]) -> bool:
    return any(path == tree or tree in path.parents for tree in trees)


def plan(
    vm_id: str,
    qemu: str,
    seen: Exposure,
    workdir: Path,
    accel: str,
    memory_mb: int,
    vcpus: int,
    facts: HostFacts,
    slot: int,
    place: Placement,
    tb_size_mb: int,
) -> JailPlan:
    """The jail of one VMM process (``slot``: its index in the reserved id range)."""
    if not 0 <= slot < JAIL_SLOTS:
        raise ValueError(f"jail slot {slot} is outside 0..{JAIL_SLOTS - 1}")
    uid = gid = JAIL_ID_BASE + slot
    groups: list[int] = []
    binds: list[Bind] = []
    trees = [Path("/usr")]
    for path in (Path(qemu), *seen.read_only):
        if not _covered(path, trees):
            binds.append(Bind(path, path, "ro"))
    for path in seen.read_write:
        binds.append(Bind(path, path, "rw"))
    readonly_ram = False
    if seen.template_ram is not None:
        readonly_ram = private_readonly_ram(facts.qemu_version)
        binds.append(Bind(seen.template_ram, seen.template_ram, "ro" if readonly_ram else "rw"))
        groups.append(TEMPLATE_RAM_GID)
    kvm_node = None
    if accel == "kvm":
        kvm, kvm_group = _kvm_binds(facts, workdir, place)
        binds.append(kvm)
        kvm_node = kvm.source if kvm.source != kvm.dest else None
        if kvm_group is not None:
            groups.append(kvm_group)
    dirs: set[Path] = set()
    for bind in binds:
        if bind.kind != "dev":
            dirs.update(p for p in bind.dest.parents if p != Path("/"))
    bound = [b.dest for b in binds]
    dirs = {d for d in dirs if not _covered(d, trees) and not any(d == b for b in bound)}
    tmpfs_disk = place.disk_bytes if place.disk_on_tmpfs else 0
    limits = cgroup_limits(memory_mb, vcpus, accel, tb_size_mb, tmpfs_disk)
    hierarchies = facts.layout.hierarchies
    return JailPlan(
        vm_id=vm_id,
        uid=uid,
        gid=gid,
        groups=tuple(groups),
        binds=tuple(binds),
        dirs=tuple(sorted(dirs, key=lambda p: (len(p.parts), str(p)))),
        lend=tuple(seen.read_write) + ((kvm_node,) if kvm_node else ()),
        create=seen.create,
        limits=limits,
        hierarchies=hierarchies,
        env=(("TMPDIR", str(workdir)),),  # where QEMU puts snapshot=on overlays
        template_ram=seen.template_ram,
        readonly_ram=readonly_ram,
        kvm_node=kvm_node,
        cgroup_dirs=tuple(h.vm_dir(vm_id) for h in hierarchies),
    )


def plan_vm(
    config: VMConfig,
    qemu: str,
    accel: str,
    facts: HostFacts,
    slot: int,
    place: Placement,
    tb_size_mb: int,
) -> JailPlan:
    """The jail of the VM of ``config``."""
    return plan(
        config.vm_id,
        qemu,
        exposure(config, place.backing, place.deeper),
        config.workdir,
        accel,
        config.memory_mb,
        config.vcpus,
        facts,
        slot,
        place,
        tb_size_mb,
    )


def jail_argv(
    plan: JailPlan, facts: HostFacts, argv: list[str], die_with_parent: bool = True
) -> list[str]:
    """``argv`` (a QEMU command line) wrapped in bubblewrap and setpriv per ``plan``; without
    ``die_with_parent`` (a detached sandbox VM) it outlives the process that started it."""
    if not facts.bwrap or not facts.setpriv:
        raise NotReady("the jail needs bwrap and setpriv: " + "; ".join(facts.problems()))
    args = [
        facts.bwrap,
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        HOSTNAME,
        *(["--die-with-parent"] if die_with_parent else []),
        "--new-session",
        "--clearenv",
    ]
    for key, value in plan.env:
        args += ["--setenv", key, value]
    args += ["--ro-bind", "/usr", "/usr"]
    for path, target in facts.root_entries:
        args += ["--symlink", target, path] if target else ["--ro-bind", path, path]
    if facts.ld_cache:
        args += ["--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--dev", "/dev", "--proc", "/proc"]
    for directory in plan.dirs:
        args += ["--dir", str(directory)]
    flags = {"ro": "--ro-bind", "rw": "--bind", "dev": "--dev-bind"}
    for bind in plan.binds:
        args += [flags[bind.kind], str(bind.source), str(bind.dest)]
    args += ["--remount-ro", "/", "--chdir", "/", "--cap-drop", "ALL"]
    for cap in SETPRIV_CAPS:
        args += ["--cap-add", cap]
    groups = f"--groups={','.join(map(str, plan.groups))}" if plan.groups else "--clear-groups"
    args += [
        "--",
        facts.setpriv,
        f"--reuid={plan.uid}",
        f"--regid={plan.gid}",
        groups,
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]
    return args
