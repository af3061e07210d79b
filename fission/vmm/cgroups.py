"""Control groups for VMM processes, on cgroup v1, v2 or a hybrid of both.

Where each controller lives is read from ``/proc/self/mountinfo`` and ``/proc/self/cgroup``
(pure parsing, unit-tested); a controller is used on v1 when a v1 hierarchy carries it, else
on v2 when the unified tree offers it. A VM's cgroup is ``<parent>/fission/vm-<id>`` in each
hierarchy used, where ``<parent>`` is the cgroup fission itself runs in (so whatever limits and
accounting the host put on fission still cover its VMs):

* v1: one directory per hierarchy (``memory``, ``pids``, ``cpu``), each under this process's own
  cgroup of that hierarchy;
* v2: one directory. cgroup v2 lets a cgroup with processes have no children with controllers
  (the "no internal processes" rule), so the parent is this process's cgroup only when that is
  the root; otherwise it is the parent of this process's cgroup, when that delegates the
  controllers to its children (systemd's ``Delegate=yes`` with ``DelegateSubgroup=``).

The I/O here is deliberately small: make a cgroup and write its limits, list and kill its
processes, remove it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fission.waiting import WaitTimeout, wait_until

CONTROLLERS = ("memory", "pids", "cpu")
GROUP_DIR = "fission"
VM_PREFIX = "vm-"


@dataclass(frozen=True)
class Hierarchy:
    """A cgroup hierarchy fission uses: its version, the parent of ``fission/``, controllers."""

    version: int
    parent: Path
    controllers: tuple[str, ...]

    def vm_dir(self, vm_id: str) -> Path:
        """The cgroup directory of VM ``vm_id`` in this hierarchy."""
        return self.parent / GROUP_DIR / f"{VM_PREFIX}{vm_id}"


@dataclass(frozen=True)
class Layout:
    """Where the jail's controllers live on this host, and why any is missing."""

    hierarchies: tuple[Hierarchy, ...]
    missing: tuple[tuple[str, str], ...]  # (controller, reason)

    @property
    def version(self) -> str:
        """``v1``, ``v2``, ``hybrid`` (some of each) or ``none``."""
        versions = {h.version for h in self.hierarchies}
        if versions == {1, 2}:
            return "hybrid"
        return f"v{versions.pop()}" if versions else "none"

    def controller_versions(self) -> dict[str, int]:
        """Each usable controller and the cgroup version it is used on."""
        return {c: h.version for h in self.hierarchies for c in h.controllers}


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem from mountinfo."""

    version: int
    mountpoint: Path
    root: str  # the cgroup path mounted there (``/`` unless inside a container)
    options: frozenset[str]  # v1: the controllers it carries (and ``name=...``)


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in ``/proc/self/mountinfo`` text."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mountpoint = Path(fields[4].replace("\\040", " "))
        options = frozenset(tail[2].split(","))
        mounts.append(Mount(2 if tail[0] == "cgroup2" else 1, mountpoint, fields[3], options))
    return mounts


def parse_membership(proc_self_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 entry is under the key ``""``."""
    found: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            found[controller] = parts[2]
    return found


def _inside(mount: Mount, path: str) -> Path:
    """The directory of cgroup ``path`` under ``mount`` (which may mount a sub-tree)."""
    relative = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        relative = path[len(mount.root) :]
    return mount.mountpoint / relative.lstrip("/")


def plan_layout(
    mounts: list[Mount],
    membership: dict[str, str],
    read_controllers: Callable[[Path], set[str]],
    wanted: Iterable[str] = CONTROLLERS,
) -> Layout:
    """Decide the hierarchy of each wanted controller; ``read_controllers(dir)`` lists the v2
    controllers a directory's children may use (its ``cgroup.subtree_control``, or
    ``cgroup.controllers`` for the root, which can always enable what it has)."""
    v1: dict[str, Hierarchy] = {}
    v2_wanted: list[str] = []
    missing: list[tuple[str, str]] = []
    unified = next((m for m in mounts if m.version == 2), None)
    v2_parent: Path | None = None
    v2_offered: set[str] = set()
    if unified is not None and "" in membership:
        own = membership[""]
        if own in ("/", unified.root):
            v2_parent = _inside(unified, own)
        else:
            v2_parent = _inside(unified, own).parent
        v2_offered = read_controllers(v2_parent)
    for controller in wanted:
        mount = next((m for m in mounts if m.version == 1 and controller in m.options), None)
        if mount is not None:
            if controller not in membership:
                missing.append((controller, f"this process is not in a v1 {controller} cgroup"))
                continue
            parent = _inside(mount, membership[controller])
            hierarchy = v1.get(str(mount.mountpoint))
            controllers = (*hierarchy.controllers, controller) if hierarchy else (controller,)
            v1[str(mount.mountpoint)] = Hierarchy(1, parent, controllers)
        elif v2_parent is not None and controller in v2_offered:
            v2_wanted.append(controller)
        elif v2_parent is not None:
            missing.append(
                (
                    controller,
                    f"cgroup v2 does not offer {controller} to the children of {v2_parent} "
                    "(fission's cgroup holds processes, so its VMs' cgroups go beside it: "
                    "run fission in a delegated cgroup, e.g. a systemd unit with Delegate=yes "
                    "and DelegateSubgroup=daemon)",
                )
            )
        else:
            missing.append((controller, f"no cgroup hierarchy carries {controller}"))
    hierarchies = list(v1.values())
    if v2_wanted and v2_parent is not None:
        hierarchies.append(Hierarchy(2, v2_parent, tuple(v2_wanted)))
    return Layout(tuple(hierarchies), tuple(missing))


def _v2_offered(directory: Path) -> set[str]:
    """The v2 controllers the children of ``directory`` may use."""
    name = "cgroup.subtree_control"
    if not (directory / "cgroup.type").exists():
        name = "cgroup.controllers"  # the root (no cgroup.type) may enable all it has
    try:
        return set((directory / name).read_text().split())
    except OSError:
        return set()


def detect_layout() -> Layout:
    """Where this host's memory, pids and cpu controllers are, for VMs of this process."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        membership = Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        reason = f"cannot read /proc: {exc}"
        return Layout((), tuple((c, reason) for c in CONTROLLERS))
    return plan_layout(parse_mounts(mountinfo), parse_membership(membership), _v2_offered)


@dataclass(frozen=True)
class CgroupLimits:
    """Limits of one VM's cgroup."""

    memory_bytes: int
    pids: int
    cpu_quota_us: int
    cpu_period_us: int


@dataclass(frozen=True)
class Setting:
    """One value to write into a cgroup file; ``optional`` files may be absent on this host."""

    name: str
    value: str
    optional: bool = False


def settings(version: int, controllers: Iterable[str], limits: CgroupLimits) -> list[Setting]:
    """The files to write, in order, to put ``limits`` on a cgroup of ``version``."""
    out: list[Setting] = []
    for controller in controllers:
        if controller == "memory" and version == 1:
            out.append(Setting("memory.limit_in_bytes", str(limits.memory_bytes)))
            # memory + swap: no swap beyond the memory limit (absent without swap accounting)
            out.append(Setting("memory.memsw.limit_in_bytes", str(limits.memory_bytes), True))
        elif controller == "memory":
            out.append(Setting("memory.max", str(limits.memory_bytes)))
            out.append(Setting("memory.swap.max", "0", True))
            out.append(Setting("memory.oom.group", "1", True))
        elif controller == "pids":
            out.append(Setting("pids.max", str(limits.pids)))
        elif controller == "cpu" and version == 1:
            out.append(Setting("cpu.cfs_period_us", str(limits.cpu_period_us)))
            out.append(Setting("cpu.cfs_quota_us", str(limits.cpu_quota_us)))
        elif controller == "cpu":
            out.append(Setting("cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}"))
    return out


# -- I/O --------------------------------------------------------------------------------------


def _enable_v2(directory: Path, controllers: Iterable[str]) -> None:
    """Let the children of ``directory`` use ``controllers`` (v2 ``subtree_control``)."""
    try:
        enabled = set((directory / "cgroup.subtree_control").read_text().split())
    except OSError:
        enabled = set()
    wanted = [c for c in controllers if c not in enabled]
    if wanted:
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))


def create(hierarchy: Hierarchy, vm_id: str, limits: CgroupLimits, attempts: int = 5) -> Path:
    """Make VM ``vm_id``'s cgroup in ``hierarchy`` and write its limits; return its directory.

    ``fission/`` is removed when its last VM goes (``remove``), possibly by another process
    between our two mkdirs: then it is made again.
    """
    group = hierarchy.parent / GROUP_DIR
    directory = hierarchy.vm_dir(vm_id)
    for attempt in range(attempts):
        try:
            group.mkdir(exist_ok=True)
            if hierarchy.version == 2:
                _enable_v2(hierarchy.parent, hierarchy.controllers)
                _enable_v2(group, hierarchy.controllers)
            directory.mkdir()
            break
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    try:
        for setting in settings(hierarchy.version, hierarchy.controllers, limits):
            path = directory / setting.name
            if setting.optional and not path.exists():
                continue
            path.write_text(setting.value)
    except BaseException:
        with contextlib.suppress(OSError):
            directory.rmdir()
        raise
    return directory


def join(directories: Iterable[Path]) -> None:
    """Move the calling process into each cgroup (run in the child before it execs)."""
    pid = str(os.getpid())
    for directory in directories:
        with open(directory / "cgroup.procs", "w") as f:
            f.write(pid)


def pids(directory: Path) -> list[int]:
    """The processes in a cgroup (none when it is gone)."""
    try:
        return [int(line) for line in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_all(directory: Path, deadline_s: float = 5.0) -> bool:
    """SIGKILL every process in the cgroup until it is empty; False if some outlive it."""

    def emptied() -> bool:
        members = pids(directory)
        if members:
            _kill(directory, members)
        return not members

    try:
        wait_until(
            emptied,
            timeout=deadline_s,
            interval=0.002,
            what=f"the processes of cgroup {directory} to die",
            setting="cgroups.kill_all(deadline_s)",
        )
    except WaitTimeout:
        return False
    return True


def _kill(directory: Path, members: list[int]) -> None:
    """SIGKILL the cgroup's processes: all at once where the kernel offers ``cgroup.kill``."""
    if (directory / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            (directory / "cgroup.kill").write_text("1")
    else:
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def remove(directory: Path, deadline_s: float = 5.0) -> bool:
    """Kill what is left in the cgroup and remove it, and ``fission/`` if it is now empty
    (nothing of fission stays behind in a cgroup it does not own); True once it is gone."""
    if not directory.exists():
        return True
    kill_all(directory, deadline_s)

    def removed() -> bool:
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY: exiting tasks are still being reaped
            return False
        return True

    try:
        wait_until(
            removed,
            timeout=deadline_s,
            interval=0.005,
            what=f"cgroup {directory} to be removable",
            setting="cgroups.remove(deadline_s)",
        )
    except WaitTimeout:
        return False
    with contextlib.suppress(OSError):  # other VMs' cgroups still in it
        directory.parent.rmdir()
    return True


def vm_cgroups(layout: Layout) -> list[Path]:
    """Every ``fission/vm-*`` cgroup under this host's parents, whoever made it."""
    found = []
    for hierarchy in layout.hierarchies:
        group = hierarchy.parent / GROUP_DIR
        with contextlib.suppress(OSError):
            found += [p for p in group.iterdir() if p.is_dir() and p.name.startswith(VM_PREFIX)]
    return found


def remove_stale(layout: Layout, owned_ids: Iterable[str], min_age_s: float = 60.0) -> int:
    """Remove the cgroups a crashed fission left: those of ``owned_ids`` (their processes are
    killed), and any other ``vm-*`` cgroup that is empty and older than ``min_age_s`` (younger
    ones may belong to a VM another fission process is starting right now). Returns how many."""
    owned = {f"{VM_PREFIX}{vm_id}" for vm_id in owned_ids}
    removed = 0
    now = time.time()
    for directory in vm_cgroups(layout):
        if directory.name in owned:
            removed += remove(directory)
            continue
        try:
            age = now - directory.stat().st_mtime
        except OSError:
            continue
        if age >= min_age_s and not pids(directory):
            with contextlib.suppress(OSError):
                directory.rmdir()
                removed += 1
                directory.parent.rmdir()
    return removed
