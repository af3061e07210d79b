"""The jail around each QEMU process, checked from the host through /proc and the cgroup files.

Every VM of the integration suite is jailed when the suite runs as root with bwrap (the default
``FISSION_JAIL=auto``), so the language, limit and warm-start tests also run jailed; this module
checks the jail itself: who QEMU runs as, what it sees, what it holds open, its cgroup, and that
nothing is left when a VM is gone, for runs, clones, templates, sandboxes and the KVM probe.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fission.core import sandbox_vm, snapshots
from fission.core.execution import execute
from fission.core.journal import Journal
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import Machine, exec_request
from fission.core.orchestrator import boot
from fission.core.spec import RunSpec
from fission.images.store import image_set
from fission.vmm import cgroups, jail_plan, jailer, qemu_snapshots
from fission.vmm.base import VirtualMachine, default_driver
from fission.vmm.binary import qemu_binary
from fission.vmm.qemu import QemuVM
from fission.vmm.qemu_argv import TCG_TB_SIZE_MB
from fission.vmm.qemu_driver import clone_config, detect_host
from tests.integration.conftest import fission_cli

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not jailer.decision().enabled, reason=f"VMs are not jailed here: {jailer.decision().reason}"
    ),
]
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def the_jail(vm: VirtualMachine) -> jailer.Jail:
    assert isinstance(vm, QemuVM)
    assert vm.jail is not None, "FISSION_JAIL=auto as root with bwrap must jail every VM"
    return vm.jail


def vmm_pid(vm: VirtualMachine) -> int:
    assert isinstance(vm, QemuVM)
    pid = vm.vmm_pid
    assert pid is not None and pid != vm.pid, "QEMU runs under bubblewrap, not as its child"
    return pid


def assert_gone(box: jailer.Jail) -> None:
    """After destroy: no cgroup, no process of the VM's uid, the uid slot free again."""
    assert box.released
    assert [d for d in box.plan.cgroup_dirs if d.exists()] == []
    assert box.vmm_pid() is None
    assert box.lease.fd is None


@pytest.fixture
async def clone() -> AsyncIterator[Machine]:
    machine = await boot(RunSpec(resolve_language("python"), "pass"))
    try:
        yield machine
    finally:
        await machine.destroy()


async def test_qemu_runs_as_an_unprivileged_uid_without_capabilities(clone: Machine) -> None:
    box = the_jail(clone.vm)
    facts = status(vmm_pid(clone.vm))
    uid = str(box.plan.uid)
    assert facts["Uid"].split() == [uid] * 4 and facts["Gid"].split() == [uid] * 4
    assert int(uid) >= jail_plan.JAIL_ID_BASE
    assert facts["Groups"].split() == [str(jail_plan.TEMPLATE_RAM_GID)]  # a clone maps template RAM
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(facts[caps], 16) == 0, caps
    assert facts["NoNewPrivs"] == "1"
    assert facts["Seccomp"] == "2"  # QEMU's own -sandbox is still on


async def test_qemu_has_its_own_namespaces(clone: Machine) -> None:
    pid = vmm_pid(clone.vm)
    for name in NAMESPACES:
        ours = os.readlink(f"/proc/self/ns/{name}")
        assert os.readlink(f"/proc/{pid}/ns/{name}") != ours, name
    assert Path(f"/proc/{pid}/root/proc/1/cmdline").read_bytes().startswith(b"/usr/bin/bwrap\0")
    assert len([p for p in os.listdir(f"/proc/{pid}/root/proc") if p.isdigit()]) == 2


def jail_tree(pid: int, plan: jail_plan.JailPlan) -> tuple[set[Path], set[Path]]:
    """Directories and files of a jailed process's root, not descending into /usr, /proc,
    /dev or bound directories."""
    root = Path(f"/proc/{pid}/root")
    stop = {Path("/usr"), Path("/proc"), Path("/dev")} | {b.dest for b in plan.binds}
    dirs, files = set(), set()
    for here, subdirs, names in os.walk(root):
        inside = Path("/") / Path(here).relative_to(root)
        if inside in stop:
            subdirs[:] = []
            continue
        dirs.update(inside / d for d in subdirs)
        files.update(inside / n for n in names)
    return dirs, files


async def test_qemu_sees_only_its_own_files(clone: Machine) -> None:
    other = await boot(RunSpec(resolve_language("bash"), "true"))
    try:
        pid, plan = vmm_pid(clone.vm), the_jail(clone.vm).plan
        dirs, files = jail_tree(pid, plan)
        system = {
            Path(p)
            for p in (
                "/usr",
                "/proc",
                "/dev",
                "/etc",
                "/bin",
                "/sbin",
                "/lib",
                "/lib32",
                "/lib64",
                "/libx32",
            )
        }
        bound = {b.dest for b in plan.binds}
        assert dirs <= system | set(plan.dirs) | bound, dirs - system - set(plan.dirs) - bound
        assert files <= bound | {Path("/etc/ld.so.cache")}, files - bound
        assert Path("/home") not in dirs and Path("/etc/shadow") not in files
        assert other.vm.config.workdir not in dirs | bound
        assert clone.vm.config.incoming not in files  # the state arrives as a descriptor
        root = Path(f"/proc/{pid}/root")
        assert (root / str(clone.vm.config.rootfs).lstrip("/")).exists()
        assert "agent.sock" in os.listdir(root / str(clone.vm.config.workdir).lstrip("/"))
        assert not (root / str(other.vm.config.workdir).lstrip("/")).exists()
        with pytest.raises(OSError):  # the new root itself is read-only
            (root / "x").write_text("x")
    finally:
        await other.destroy()


async def test_qemu_holds_no_descriptor_it_did_not_open() -> None:
    with tempfile.NamedTemporaryFile(prefix="fission-sentinel-") as sentinel:
        os.set_inheritable(sentinel.fileno(), True)  # would leak into a child that keeps fds
        machine = await boot(RunSpec(resolve_language("python"), "pass"))
        try:
            pid = vmm_pid(machine.vm)
            config = machine.vm.config
            allowed = {"/dev/null", "/dev/urandom", str(config.rootfs), str(config.scratch)}
            allowed.add(str(config.memory_file))
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert sentinel.name not in targets
            for target in targets:
                if target.startswith("/"):
                    inside = target.startswith(str(config.workdir) + "/")
                    assert inside or target in allowed, target
                else:
                    assert target.split(":")[0] in ("socket", "pipe", "anon_inode"), target
            stdio = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)]
            assert stdio == [
                "/dev/null",
                str(machine.vm.paths.qemu_log),
                str(machine.vm.paths.qemu_log),
            ]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert sorted(e for e in environ if e) == [
                b"PWD=/",
                f"TMPDIR={config.workdir}".encode(),
            ]
        finally:
            await machine.destroy()


def cgroup_value(directories: tuple[Path, ...], *names: str) -> str:
    for directory in directories:
        for name in names:
            if (directory / name).exists():
                return (directory / name).read_text().strip()
    raise AssertionError(f"none of {names} in {directories}")


async def test_qemu_sits_in_a_cgroup_sized_from_the_vm(clone: Machine) -> None:
    box = the_jail(clone.vm)
    dirs = box.plan.cgroup_dirs
    assert dirs, "this host's cgroups must carry memory, pids and cpu"
    pid = vmm_pid(clone.vm)
    for directory in dirs:
        members = cgroups.pids(directory)
        assert pid in members and clone.vm.pid in members  # bwrap too: joined before exec
    guest = clone.vm.config.memory_mb
    expected = (guest + jail_plan.QEMU_BASE_MB + TCG_TB_SIZE_MB) * jail_plan.MIB
    assert box.plan.limits.memory_bytes == expected
    assert int(cgroup_value(dirs, "memory.max", "memory.limit_in_bytes")) == expected
    assert int(cgroup_value(dirs, "pids.max")) == jail_plan.PIDS_BASE + 1
    quota = cgroup_value(dirs, "cpu.max", "cpu.cfs_quota_us").split()[0]
    assert int(quota) == 125_000
    assert Path(f"/proc/{pid}/cgroup").read_text().count(f"vm-{clone.vm.config.vm_id}") == len(dirs)


async def test_a_run_a_clone_and_a_cold_boot_leave_nothing_behind() -> None:
    boxes = []
    for limits in (Limits(), Limits(cpus=2)):  # a clone, then a cold boot (2 vCPUs do not fit)
        spec = RunSpec(resolve_language("python"), "import os; print(os.getuid())", limits)
        machine = await boot(spec)
        box = the_jail(machine.vm)
        boxes.append(box)
        result = (
            await execute(machine.agent, exec_request(spec), diagnostics=machine.vm.diagnostics)
        ).result
        assert result.exit_code == 0 and result.stdout == b"1000\n"
        await machine.destroy()
        await machine.destroy()  # safe twice
        assert_gone(box)
    assert boxes[1].plan.groups == ()  # a cold boot maps no template RAM


async def test_a_template_is_built_jailed_and_cloned(tmp_path: Path) -> None:
    images = image_set("bash")
    host = await detect_host(images)
    staging = tmp_path / "snap"
    staging.mkdir(mode=0o700)
    driver = default_driver()
    warm = snapshots.warm_template("bash")
    args = await qemu_snapshots.build_snapshot_into(
        driver, staging, images, host.accel, warm, False
    )
    for name in ("memory", "scratch.ext4", "state"):
        st = (staging / name).stat()
        assert (st.st_uid, st.st_gid) == (0, 0), f"{name} was not given back by the template's uid"
    qemu_snapshots.finish_snapshot(staging, tmp_path / "bash-test", args)
    snap = qemu_snapshots.Snapshot("bash", tmp_path / "bash-test", host.accel, args)
    machine = await driver.start(clone_config(images, snap))
    try:
        assert await exec_bash(machine, "echo cloned") == b"cloned\n"
    finally:
        await machine.destroy()
    assert (snap.memory.stat().st_gid, snap.memory.stat().st_mode & 0o777) == (
        jail_plan.TEMPLATE_RAM_GID,
        0o640 if jail_plan.private_readonly_ram(the_jail(machine.vm).facts.qemu_version) else 0o660,
    )


async def test_a_sandbox_pauses_and_resumes_jailed(tmp_path: Path) -> None:
    directory = tmp_path / "box"
    directory.mkdir(mode=0o700)
    spec = RunSpec(resolve_language("bash"), "true")
    driver = default_driver()
    machine, config = await sandbox_vm.start_sandbox_vm(driver, spec, directory)
    disk = directory / sandbox_vm.DISK_NAME
    try:
        box = the_jail(machine.vm)
        assert disk.stat().st_uid == box.plan.uid  # lent while the VM runs
        backing = jailer.qcow2_backing(disk)
        assert backing is not None and {b.kind for b in box.plan.binds if b.dest == backing} == {
            "ro"
        }
        await exec_bash(machine, "echo kept > /home/sandbox/f; sync")
        await sandbox_vm.pause_vm(machine, directory)
        assert disk.stat().st_uid == 0 and box.released
        machine, config = await sandbox_vm.resume_vm(driver, config, directory)
        assert disk.stat().st_uid == the_jail(machine.vm).plan.uid
        out = await exec_bash(machine, "cat /home/sandbox/f")
        assert out == b"kept\n"
    finally:
        await machine.destroy()
    assert disk.stat().st_uid == 0


async def exec_bash(machine: Machine, code: str) -> bytes:
    chunks: list[bytes] = []
    outcome = await machine.agent.exec(
        exec_request(RunSpec(resolve_language("bash"), code)),
        lambda stream, data: chunks.append(data) if stream == "stdout" else None,
    )
    assert outcome.exit_code == 0
    return b"".join(chunks)


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
async def test_the_kvm_probe_jail_can_open_kvm() -> None:
    """The probe's jail gives QEMU a working /dev/kvm (a VM file descriptor appears)."""
    images = image_set("bash")
    workdir = Path(tempfile.mkdtemp(prefix="probe-", dir=os.environ["FISSION_RUNTIME_DIR"]))
    qemu = qemu_binary()
    box = jailer.Jail.for_probe(qemu, images.kernel, images.initramfs, workdir)
    argv = [
        qemu,
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        str(images.kernel),
        "-initrd",
        str(images.initramfs),
        "-S",
    ]
    proc = await asyncio.create_subprocess_exec(
        *box.wrap(argv),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=box.join_cgroups,
    )
    try:
        async with asyncio.timeout(20):
            while True:
                pid = box.vmm_pid()
                fds = []
                if pid is not None:
                    fds = [
                        os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                    ]
                if "anon_inode:kvm-vm" in fds:
                    break
                assert proc.returncode is None, (
                    (await proc.stderr.read()).decode() if proc.stderr else ""
                )
                await asyncio.sleep(0.05)
        assert int(status(pid)["Uid"].split()[0]) == box.plan.uid
    finally:
        proc.kill()
        await proc.wait()
        box.release()
        shutil.rmtree(workdir, ignore_errors=True)
    assert_gone(box)


def test_reconcile_removes_the_cgroups_a_crash_left(tmp_path: Path) -> None:
    layout = cgroups.detect_layout()
    if not layout.hierarchies:
        pytest.skip("no cgroup controllers here")
    limits = jail_plan.cgroup_limits(64, 1, "tcg", 128)
    dirs = [cgroups.create(h, "deadbeef0001", limits) for h in layout.hierarchies]
    code = "import sys, time; sys.stdout.write('in'); sys.stdout.flush(); time.sleep(60)"
    orphan = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, preexec_fn=lambda: cgroups.join(dirs)
    )
    try:
        assert orphan.stdout is not None and orphan.stdout.read(2) == b"in"
        journal = Journal(tmp_path)
        (journal.directory / "deadbeef0001.json").write_text(json.dumps({"pid": None}))
        result = journal.reconcile()
        assert result["cgroups"] >= len(dirs)
        assert orphan.wait(timeout=10) == -9  # killed through its cgroup
        assert [d for d in dirs if d.exists()] == []
    finally:
        orphan.kill()
        orphan.wait()
        for directory in dirs:
            cgroups.remove(directory)


def test_jail_off_runs_qemu_as_this_user() -> None:
    proc = fission_cli(
        "run", "--lang", "bash", "--no-daemon", "--json", "echo hi", env={"FISSION_JAIL": "off"}
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["stdout"] == "hi\n"


def test_doctor_reports_every_layer() -> None:
    proc = fission_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    layers = {layer["name"]: layer for layer in json.loads(proc.stdout)["layers"]}
    for name in (
        "running as root",
        "jail (FISSION_JAIL)",
        "QEMU seccomp sandbox",
        "unprivileged uid, no capabilities",
        "minimal root (pivot_root)",
        "cgroup limits",
    ):
        assert layers[name]["ok"], layers[name]
    assert any(name.startswith("namespaces") and layer["ok"] for name, layer in layers.items())
    assert all(layer["ok"] or layer["fix"] for layer in layers.values())
    text = fission_cli("doctor")
    assert text.returncode == 0 and b"OK       running as root" in text.stdout
