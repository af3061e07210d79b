"""The VMM jail, planned by pure functions: exposure, ids, limits, cgroup layout, bwrap argv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fission.errors import InvalidInput, NotReady, VMStartFailed
from fission.vmm import cgroups, jail_plan, jailer
from fission.vmm.base import VMConfig
from fission.vmm.cgroups import CgroupLimits, Hierarchy, Layout
from fission.vmm.jail_plan import HostFacts, Placement
from fission.vmm.qemu_argv import TCG_TB_SIZE_MB, qemu_argv

QEMU = "/usr/bin/qemu-system-x86_64"
IMAGES = Path("/cache/fission/images")
SNAP = Path("/cache/fission/snapshots/python-abc")
V1 = Layout(
    (
        Hierarchy(1, Path("/sys/fs/cgroup/memory/session"), ("memory",)),
        Hierarchy(1, Path("/sys/fs/cgroup/pids"), ("pids",)),
        Hierarchy(1, Path("/sys/fs/cgroup/cpu,cpuacct"), ("cpu",)),
    ),
    (),
)
V2 = Layout((Hierarchy(2, Path("/sys/fs/cgroup"), ("memory", "pids", "cpu")),), ())


def facts(**changes: object) -> HostFacts:
    base: dict[str, object] = dict(
        euid=0,
        bwrap="/usr/bin/bwrap",
        setpriv="/usr/bin/setpriv",
        layout=V1,
        qemu_version="7.2.22",
        root_entries=(("/lib", "usr/lib"), ("/lib64", "usr/lib64"), ("/bin", "usr/bin")),
        kvm_mode=0o600,
        kvm_gid=0,
    )
    base.update(changes)
    return HostFacts(**base)  # type: ignore[arg-type]


def config(**changes: object) -> VMConfig:
    base: dict[str, object] = dict(
        vm_id="abc123",
        kernel=IMAGES / "kernel-1/vmlinuz",
        initramfs=IMAGES / "initramfs-1.cpio.gz",
        rootfs=IMAGES / "rootfs-python-1.ext4",
        scratch=IMAGES / "scratch-512.ext4",
        vcpus=1,
        memory_mb=352,
        workdir=Path("/run/fission/vm-abc123"),
    )
    base.update(changes)
    return VMConfig(**base)  # type: ignore[arg-type]


def clone(**changes: object) -> VMConfig:
    base: dict[str, object] = dict(
        scratch=SNAP / "scratch.ext4",
        memory_mb=1120,
        memory_file=SNAP / "memory",
        incoming=SNAP / "state",
    )
    base.update(changes)
    return config(**base)


def plan_of(
    cfg: VMConfig,
    accel: str = "tcg",
    slot: int = 7,
    place: Placement | None = None,
    **fact_changes: object,
) -> jail_plan.JailPlan:
    return jail_plan.plan_vm(
        cfg, QEMU, accel, facts(**fact_changes), slot, place or Placement(), TCG_TB_SIZE_MB
    )


def binds(plan: jail_plan.JailPlan) -> dict[Path, str]:
    return {bind.dest: bind.kind for bind in plan.binds}


# -- the setting and the decision ---------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [("", "auto"), ("ON", "on"), (" off ", "off")])
def test_jail_setting_reads_fission_jail(
    raw: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_JAIL", raw)
    assert jail_plan.jail_setting() == value


def test_jail_setting_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_JAIL", "maybe")
    with pytest.raises(InvalidInput, match="auto, on or off"):
        jail_plan.jail_setting()


def test_auto_jails_as_root_with_the_tools() -> None:
    assert jail_plan.decide("auto", facts()).enabled
    assert not jail_plan.decide("off", facts()).enabled


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"euid": 1000}, "not root"),
        ({"bwrap": None}, "apt-get install bubblewrap"),
        ({"setpriv": None}, "util-linux"),
    ],
)
def test_auto_runs_unjailed_and_says_why(changes: dict[str, object], reason: str) -> None:
    decision = jail_plan.decide("auto", facts(**changes))
    assert not decision.enabled and reason in decision.reason


def test_on_refuses_to_run_unjailed() -> None:
    with pytest.raises(NotReady, match="FISSION_JAIL=on"):
        jail_plan.decide("on", facts(euid=1000))


# -- ids ----------------------------------------------------------------------------------------


def test_each_slot_is_its_own_unprivileged_uid_and_gid() -> None:
    plan = plan_of(config(), slot=7)
    assert (plan.uid, plan.gid) == (jail_plan.JAIL_ID_BASE + 7, jail_plan.JAIL_ID_BASE + 7)
    assert plan.groups == ()  # a cold boot needs no group
    assert plan_of(config(), slot=8).uid != plan.uid
    with pytest.raises(ValueError):
        plan_of(config(), slot=jail_plan.JAIL_SLOTS)


# -- what the root holds ------------------------------------------------------------------------


def test_a_cold_boot_sees_its_images_read_only_and_its_directory_read_write() -> None:
    cfg = config()
    plan = plan_of(cfg)
    assert binds(plan) == {
        cfg.kernel: "ro",
        cfg.initramfs: "ro",
        cfg.rootfs: "ro",
        cfg.scratch: "ro",  # snapshot=on: the writes go to a temporary file in the workdir
        cfg.workdir: "rw",
    }
    assert plan.lend == (cfg.workdir,)
    assert plan.env == (("TMPDIR", str(cfg.workdir)),)
    assert plan.template_ram is None and plan.kvm_node is None


def test_a_clone_maps_the_template_ram_through_the_template_group() -> None:
    cfg = clone()
    plan = plan_of(cfg)  # QEMU 7.2 opens the RAM file read-write even for a private mapping
    assert binds(plan)[SNAP / "memory"] == "rw"
    assert binds(plan)[SNAP / "scratch.ext4"] == "ro"
    assert SNAP / "state" not in binds(plan)  # handed over as a descriptor, never opened by QEMU
    assert plan.groups == (jail_plan.TEMPLATE_RAM_GID,)
    assert plan.template_ram == SNAP / "memory" and not plan.readonly_ram
    assert SNAP / "memory" not in plan.lend  # never owned by a VM


def test_a_clone_on_qemu_8_2_maps_the_template_ram_read_only() -> None:
    plan = plan_of(clone(), qemu_version="8.2.2")
    assert binds(plan)[SNAP / "memory"] == "ro" and plan.readonly_ram
    argv = qemu_argv(QEMU, clone(), "tcg", readonly_ram=plan.readonly_ram)
    [ram] = [a for a in argv if a.startswith("memory-backend-file")]
    assert ram.endswith("share=off,readonly=on,rom=off")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("7.2.22", False),
        ("8.1.5", False),
        ("8.2.0", True),
        ("10.0", True),
        ("", False),
        ("garbage", False),
    ],
)
def test_private_readonly_ram_needs_qemu_8_2(version: str, expected: bool) -> None:
    assert jail_plan.private_readonly_ram(version) is expected


def test_a_template_writes_its_ram_and_disk_lent_to_its_uid() -> None:
    staging = Path("/cache/fission/snapshots/.python-abc-x")
    cfg = config(
        scratch=staging / "scratch.ext4",
        scratch_writable=True,
        memory_file=staging / "memory",
        memory_shared=True,
    )
    plan = plan_of(cfg)
    assert binds(plan)[staging / "memory"] == "rw" and binds(plan)[staging / "scratch.ext4"] == "rw"
    assert plan.create == (staging / "memory",)  # QEMU cannot create it inside the jail
    assert set(plan.lend) == {cfg.workdir, staging / "scratch.ext4", staging / "memory"}
    assert plan.groups == ()


def test_a_sandbox_overlay_is_read_write_and_its_backing_file_read_only() -> None:
    box = Path("/run/fission/daemon/sandboxes/sb1")
    cfg = clone(scratch=box / "disk.qcow2", scratch_format="qcow2", scratch_writable=True)
    plan = plan_of(cfg, place=Placement(backing=SNAP / "scratch.ext4"))
    assert binds(plan)[box / "disk.qcow2"] == "rw"
    assert binds(plan)[SNAP / "scratch.ext4"] == "ro"
    assert box / "disk.qcow2" in plan.lend and box not in binds(plan)  # only the file


def test_parent_directories_are_made_and_nothing_under_usr_is_bound_twice() -> None:
    plan = plan_of(config(), qemu_version="7.2")
    assert Path("/usr/bin/qemu-system-x86_64") not in binds(plan)
    assert plan.dirs[:2] == (Path("/cache"), Path("/run"))
    assert Path("/cache/fission/images") in plan.dirs and Path("/run/fission") in plan.dirs
    assert all(d not in binds(plan) for d in plan.dirs)
    other = jail_plan.plan_vm(config(), "/opt/qemu/bin/qemu", "tcg", facts(), 1, Placement(), 128)
    assert binds(other)[Path("/opt/qemu/bin/qemu")] == "ro"


def test_kvm_is_only_in_the_jail_under_kvm() -> None:
    assert Path("/dev/kvm") not in binds(plan_of(config(), "tcg"))
    world = plan_of(config(), "kvm", kvm_mode=0o666)
    assert binds(world)[Path("/dev/kvm")] == "dev" and world.groups == ()
    group = plan_of(config(), "kvm", kvm_mode=0o660, kvm_gid=108)
    assert group.groups == (108,)
    private = plan_of(config(), "kvm", kvm_mode=0o600)  # root-only: a node of its own
    assert private.kvm_node == config().workdir / "kvm" and private.kvm_node in private.lend
    assert [b.source for b in private.binds if b.dest == Path("/dev/kvm")] == [private.kvm_node]
    with pytest.raises(VMStartFailed, match="nodev"):
        plan_of(config(), "kvm", place=Placement(workdir_nodev=True))
    with pytest.raises(VMStartFailed, match="does not exist"):
        plan_of(config(), "kvm", kvm_mode=None)


# -- limits -------------------------------------------------------------------------------------


def test_memory_limit_is_guest_ram_plus_qemu_plus_the_tcg_buffer() -> None:
    tcg = jail_plan.cgroup_limits(352, 1, "tcg", 128)
    kvm = jail_plan.cgroup_limits(352, 1, "kvm", 128)
    assert tcg.memory_bytes == (352 + jail_plan.QEMU_BASE_MB + 128) * jail_plan.MIB
    assert kvm.memory_bytes == (352 + jail_plan.QEMU_BASE_MB) * jail_plan.MIB
    on_tmpfs = jail_plan.cgroup_limits(352, 1, "tcg", 128, tmpfs_disk_bytes=512 * jail_plan.MIB)
    assert on_tmpfs.memory_bytes == tcg.memory_bytes + 512 * jail_plan.MIB


def test_pids_and_cpu_follow_the_vcpus() -> None:
    one, four = (
        jail_plan.cgroup_limits(352, 1, "tcg", 128),
        jail_plan.cgroup_limits(352, 4, "tcg", 128),
    )
    assert four.pids - one.pids == 3 and one.pids >= 64 + 1 + 2  # I/O pool, vCPU, bwrap
    assert (one.cpu_quota_us, one.cpu_period_us) == (125_000, 100_000)
    assert four.cpu_quota_us == 425_000


def test_a_vm_on_tmpfs_gets_its_disk_in_its_memory_limit() -> None:
    plan = plan_of(config(), place=Placement(disk_on_tmpfs=True, disk_bytes=512 * jail_plan.MIB))
    assert plan.limits.memory_bytes == (352 + 64 + TCG_TB_SIZE_MB + 512) * jail_plan.MIB


def test_cgroup_settings_per_version() -> None:
    limits = CgroupLimits(1 << 30, 97, 125_000, 100_000)
    v1 = {s.name: s.value for s in cgroups.settings(1, ("memory", "pids", "cpu"), limits)}
    assert v1 == {
        "memory.limit_in_bytes": str(1 << 30),
        "memory.memsw.limit_in_bytes": str(1 << 30),
        "pids.max": "97",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "125000",
    }
    names = [s.name for s in cgroups.settings(1, ("memory",), limits)]
    assert names.index("memory.limit_in_bytes") < names.index("memory.memsw.limit_in_bytes")
    v2 = {s.name: s.value for s in cgroups.settings(2, ("memory", "pids", "cpu"), limits)}
    assert v2 == {
        "memory.max": str(1 << 30),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "97",
        "cpu.max": "125000 100000",
    }


def test_the_plan_names_one_cgroup_per_hierarchy() -> None:
    assert plan_of(config()).cgroup_dirs == (
        Path("/sys/fs/cgroup/memory/session/fission/vm-abc123"),
        Path("/sys/fs/cgroup/pids/fission/vm-abc123"),
        Path("/sys/fs/cgroup/cpu,cpuacct/fission/vm-abc123"),
    )
    assert plan_of(config(), layout=V2).cgroup_dirs == (Path("/sys/fs/cgroup/fission/vm-abc123"),)
    assert plan_of(config(), layout=Layout((), ())).cgroup_dirs == ()


# -- the command line ---------------------------------------------------------------------------


def test_jail_argv_unshares_drops_and_then_runs_qemu() -> None:
    cfg = clone()
    plan = plan_of(cfg)
    inner = qemu_argv(QEMU, cfg, "tcg")
    argv = jail_plan.jail_argv(plan, facts(), inner)
    split = argv.index("--")
    bwrap, setpriv = argv[:split], argv[split + 1 :]
    for flag in (
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in bwrap
    assert "--unshare-user" not in bwrap  # a user namespace would map the jail's uid to root
    assert bwrap[bwrap.index("--cap-drop") + 1] == "ALL"
    assert [bwrap[i + 1] for i, a in enumerate(bwrap) if a == "--cap-add"] == list(
        jail_plan.SETPRIV_CAPS
    )
    assert bwrap.index("--remount-ro") > max(i for i, a in enumerate(bwrap) if a == "--bind")
    assert setpriv[:8] == [
        "/usr/bin/setpriv",
        f"--reuid={plan.uid}",
        f"--regid={plan.gid}",
        f"--groups={jail_plan.TEMPLATE_RAM_GID}",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    assert setpriv[8:] == inner
    assert "-sandbox" in inner  # QEMU's own seccomp stays on inside the jail
    sym = [tuple(bwrap[i + 1 : i + 3]) for i, a in enumerate(bwrap) if a == "--symlink"]
    assert ("usr/lib", "/lib") in sym


def test_jail_argv_clears_groups_without_a_template() -> None:
    argv = jail_plan.jail_argv(plan_of(config()), facts(), ["qemu"])
    assert "--clear-groups" in argv


def test_jail_argv_needs_the_tools() -> None:
    with pytest.raises(NotReady):
        jail_plan.jail_argv(plan_of(config()), facts(bwrap=None), ["qemu"])


# -- cgroup layout from /proc -------------------------------------------------------------------

MOUNTINFO_HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
CGROUP_HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/session/abc
1:cpu,cpuacct:/
0::/
"""
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_hybrid_hosts_use_the_v1_controllers_under_this_process_own_cgroups() -> None:
    layout = cgroups.plan_layout(
        cgroups.parse_mounts(MOUNTINFO_HYBRID),
        cgroups.parse_membership(CGROUP_HYBRID),
        lambda _: set(),
    )
    assert layout.hierarchies == (
        Hierarchy(1, Path("/sys/fs/cgroup/memory/session/abc"), ("memory",)),
        Hierarchy(1, Path("/sys/fs/cgroup/pids"), ("pids",)),
        Hierarchy(1, Path("/sys/fs/cgroup/cpu,cpuacct"), ("cpu",)),
    )
    assert layout.missing == () and layout.version == "v1"


def test_v2_at_the_root_uses_the_root() -> None:
    offered = {Path("/sys/fs/cgroup"): {"cpu", "memory", "pids", "io"}}
    layout = cgroups.plan_layout(
        cgroups.parse_mounts(MOUNTINFO_V2), {"": "/"}, lambda d: offered.get(d, set())
    )
    assert layout.hierarchies == (Hierarchy(2, Path("/sys/fs/cgroup"), ("memory", "pids", "cpu")),)
    assert layout.version == "v2"


def test_v2_in_a_service_puts_vms_beside_it_when_delegated_else_says_why() -> None:
    membership = {"": "/system.slice/fission.service/daemon"}
    parent = Path("/sys/fs/cgroup/system.slice/fission.service")
    delegated = cgroups.plan_layout(
        cgroups.parse_mounts(MOUNTINFO_V2),
        membership,
        lambda d: {"memory", "pids", "cpu"} if d == parent else set(),
    )
    assert delegated.hierarchies == (Hierarchy(2, parent, ("memory", "pids", "cpu")),)
    bare = cgroups.plan_layout(cgroups.parse_mounts(MOUNTINFO_V2), membership, lambda d: {"pids"})
    assert bare.controller_versions() == {"pids": 2}
    assert [c for c, _ in bare.missing] == ["memory", "cpu"]
    assert "Delegate=yes" in bare.missing[0][1]


def test_a_host_without_cgroups_misses_every_controller() -> None:
    layout = cgroups.plan_layout([], {}, lambda _: set())
    assert layout.hierarchies == () and layout.version == "none"
    assert [c for c, _ in layout.missing] == list(cgroups.CONTROLLERS)


def test_a_mount_of_a_subtree_is_followed() -> None:
    mounts = cgroups.parse_mounts(
        "35 31 0:32 /docker/ctr /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    layout = cgroups.plan_layout(
        mounts, {"memory": "/docker/ctr/inner"}, lambda _: set(), wanted=("memory",)
    )
    assert layout.hierarchies == (Hierarchy(1, Path("/sys/fs/cgroup/memory/inner"), ("memory",)),)


# -- small I/O helpers --------------------------------------------------------------------------


def test_qcow2_backing_reads_the_header(tmp_path: Path) -> None:
    overlay = tmp_path / "disk.qcow2"
    name = b"/cache/base.ext4"
    header = (
        b"QFI\xfb" + (3).to_bytes(4, "big") + (72).to_bytes(8, "big") + len(name).to_bytes(4, "big")
    )
    overlay.write_bytes(header.ljust(72, b"\0") + name)
    assert jailer.qcow2_backing(overlay) == Path("/cache/base.ext4")
    (tmp_path / "raw").write_bytes(b"\0" * 100)
    assert jailer.qcow2_backing(tmp_path / "raw") is None
    assert jailer.qcow2_backing(tmp_path / "missing") is None


def test_slot_leases_are_exclusive_and_freed(tmp_path: Path) -> None:
    first = jailer.SlotLease.acquire(tmp_path, slots=2)
    second = jailer.SlotLease.acquire(tmp_path, slots=2)
    assert {first.slot, second.slot} == {0, 1}
    with pytest.raises(Exception, match="jail uids are in use"):
        jailer.SlotLease.acquire(tmp_path, slots=2)
    first.release()
    first.release()  # safe twice
    third = jailer.SlotLease.acquire(tmp_path, slots=2)
    assert third.slot == first.slot
    second.release()
    third.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="changes a file's group: needs root")
def test_template_ram_is_opened_to_the_group_once_and_then_checked(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    memory.write_bytes(b"ram")
    jailer.open_template_ram(memory, readonly=False)
    st = memory.stat()
    assert (st.st_gid, st.st_mode & 0o777) == (jail_plan.TEMPLATE_RAM_GID, 0o660)
    jailer.open_template_ram(memory, readonly=False)  # unchanged: fine
    with memory.open("r+b") as f:  # a VM writes the template's RAM
        f.write(b"RAM")
    with pytest.raises(VMStartFailed, match="changed after clones"):
        jailer.open_template_ram(memory, readonly=False)


def test_kill_all_kills_and_reports_processes_that_stay_listed(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A plain directory stands in for the cgroup: its cgroup.procs goes on listing the
        # victim after it dies, so the wait runs to its deadline and reports failure.
        (tmp_path / "cgroup.procs").write_text(f"{victim.pid}\n")
        started = time.monotonic()
        assert cgroups.kill_all(tmp_path, deadline_s=0.1) is False
        assert time.monotonic() - started < 2.0
        assert victim.wait(timeout=5) == -9
        (tmp_path / "cgroup.procs").write_text("")
        assert cgroups.kill_all(tmp_path, deadline_s=0.1) is True
    finally:
        victim.kill()
        victim.wait()


def test_remove_gives_up_on_a_cgroup_that_stays_busy(tmp_path: Path) -> None:
    busy = tmp_path / "fission" / "vm-busy"
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("")  # a plain directory with a file is never removable
    assert cgroups.remove(busy, deadline_s=0.05) is False
    assert busy.exists()
    (busy / "cgroup.procs").unlink()
    assert cgroups.remove(busy, deadline_s=0.05) is True
    assert not (tmp_path / "fission").exists()  # the emptied parent goes too
    assert cgroups.remove(busy) is True  # already gone
