"""`fission doctor`: which layers of defence around each VM are active on this host, and why not.

Each check returns a ``Layer``: its name, whether it is active, what was found and, when it is
missing, the fix. The jail checks run the real jail once (a shell instead of QEMU) and read
what the jailed process sees, so "OK" means it worked here, not that a tool is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fission.config import cache_dir, runtime_dir
from fission.errors import FissionError
from fission.vmm import accel, cgroups, jail_plan, jailer
from fission.vmm.binary import qemu_binary, qemu_version
from fission.vmm.qemu_argv import SANDBOX_OPTS, TCG_TB_SIZE_MB
from fission.waiting import WaitTimeout, wait_until

NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
PROBE_SCRIPT = (
    "cat /proc/self/status; "
    "for n in " + " ".join(NAMESPACES) + "; do echo ns $n $(readlink /proc/self/ns/$n); done; "
    "echo root $(ls -A /)"
)
SECCOMP_WAIT = 10.0


@dataclass(frozen=True)
class Layer:
    """One layer of defence: active or not, what was found, and the fix when it is missing."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_root() -> Layer:
    """Root is what lets fission give each VM its own uid, namespaces and cgroup."""
    euid = os.geteuid()
    if euid == 0:
        return Layer("running as root", True, "uid 0: VMs can be jailed")
    return Layer(
        "running as root",
        False,
        f"uid {euid}: VMs run as this user, unjailed",
        "run the fission daemon as root",
    )


def check_kvm() -> Layer:
    """KVM (hardware virtualisation) or TCG (software emulation, slower, larger attack surface)."""
    forced = os.environ.get("FISSION_ACCEL", "").strip().lower()
    if not accel.kvm_device_usable():
        why = "/dev/kvm is missing" if not os.path.exists("/dev/kvm") else "/dev/kvm is not usable"
        return Layer(
            "KVM",
            False,
            f"{why}: VMs run under TCG (software emulation)",
            "enable virtualisation (VT-x/AMD-V, or nested) and load the kvm module",
        )
    try:
        cached = json.loads((cache_dir() / "accel.json").read_text()).get("accel")
    except (OSError, ValueError):
        cached = None
    if forced:
        return Layer("KVM", forced == "kvm", f"FISSION_ACCEL={forced}", "unset FISSION_ACCEL")
    if cached == "tcg":
        return Layer(
            "KVM",
            False,
            "/dev/kvm exists but the probe boot failed under it: VMs run under TCG",
            f"fix the host's (nested) KVM, then remove {cache_dir() / 'accel.json'} to probe again",
        )
    if cached == "kvm":
        return Layer("KVM", True, "/dev/kvm works (probe boot passed)")
    return Layer("KVM", True, "/dev/kvm is usable (not probed yet: the first VM probes it)")


def check_seccomp() -> Layer:
    """QEMU's own seccomp sandbox: start QEMU with it and read its Seccomp mode from /proc."""
    name = "QEMU seccomp sandbox"
    try:
        qemu = qemu_binary()
    except FissionError as exc:
        return Layer(name, False, exc.message, "apt-get install qemu-system-x86")
    argv = [
        qemu,
        "-M",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-sandbox",
        SANDBOX_OPTS,
        "-S",
        "-monitor",
        "stdio",
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    mode = None

    def filtered_or_exited() -> bool:
        nonlocal mode
        if proc.poll() is not None:
            return True
        mode = _status(proc.pid).get("Seccomp")
        return mode == "2"

    try:
        with contextlib.suppress(WaitTimeout):
            wait_until(
                filtered_or_exited,
                timeout=SECCOMP_WAIT,
                interval=0.01,
                what="QEMU to apply its seccomp filter",
                setting="layer_checks.SECCOMP_WAIT",
            )
    finally:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if mode == "2":
        return Layer(name, True, f"-sandbox {SANDBOX_OPTS} (seccomp filter mode 2)")
    stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return Layer(
        name,
        False,
        f"QEMU did not apply its seccomp filter: {stderr or mode}",
        "use a QEMU built with seccomp (Debian's qemu-system-x86 is)",
    )


def _status(pid: int | str) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def check_tools(facts: jail_plan.HostFacts) -> Layer:
    """bubblewrap and setpriv, which build the jail."""
    missing = [p for p in facts.problems() if "not installed" in p]
    if missing:
        return Layer(
            "jail tools (bwrap, setpriv)",
            False,
            "; ".join(missing),
            "apt-get install bubblewrap util-linux",
        )
    version = subprocess.run(
        [str(facts.bwrap), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    return Layer("jail tools (bwrap, setpriv)", True, f"{version}, {facts.setpriv}")


def check_setting(facts: jail_plan.HostFacts) -> Layer:
    """What FISSION_JAIL decides on this host."""
    try:
        decision = jail_plan.decide(jail_plan.jail_setting(), facts)
    except FissionError as exc:
        return Layer("jail (FISSION_JAIL)", False, exc.message, "fix what it names")
    fix = "" if decision.enabled else "run as root with bwrap and setpriv, FISSION_JAIL=auto"
    return Layer("jail (FISSION_JAIL)", decision.enabled, decision.reason, fix)


def parse_probe(stdout: str) -> dict[str, str]:
    """What the jailed shell printed: its /proc status fields, ``ns <name>`` and ``root``."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "ns":
            name, _, link = rest.partition(" ")
            found[f"ns {name}"] = link
        elif word == "root":
            found[word] = rest
        elif ":" in line:
            key, _, value = line.partition(":")
            found[key] = value.strip()
    return found


def jail_smoke(facts: jail_plan.HostFacts) -> tuple[dict[str, str], int, Path] | str:
    """Run a shell in a real jail: what it saw, its expected uid and its directory (or why not)."""
    if facts.problems():
        return "; ".join(facts.problems())
    workdir = Path(tempfile.mkdtemp(prefix="doctor-", dir=runtime_dir()))
    lease = jailer.SlotLease.acquire()
    box = None
    try:
        seen = jail_plan.Exposure(read_write=(workdir,))
        plan = jail_plan.plan(
            f"doctor-{secrets.token_hex(4)}",
            "/usr/bin/true",
            seen,
            workdir,
            "tcg",
            64,
            1,
            facts,
            lease.slot,
            jail_plan.Placement(),
            TCG_TB_SIZE_MB,
        )
        box = jailer.Jail.set_up(plan, lease, facts)
        proc = subprocess.run(
            box.wrap(["/bin/sh", "-c", PROBE_SCRIPT]),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            preexec_fn=box.join_cgroups,
        )
        if proc.returncode != 0:
            return f"the jail did not run (exit {proc.returncode}): {proc.stderr.strip()}"
        return parse_probe(proc.stdout), plan.uid, workdir
    except (OSError, subprocess.SubprocessError, FissionError) as exc:
        return f"the jail could not be set up: {exc}"
    finally:
        if box is not None:
            box.release()
        else:
            lease.release()
        shutil.rmtree(workdir, ignore_errors=True)


SYSTEM_ROOT = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc"}


def jail_layers(facts: jail_plan.HostFacts) -> list[Layer]:
    """Namespaces, the uid drop, capabilities and the new root, as a jailed shell saw them."""
    names = (
        "namespaces (" + ", ".join(NAMESPACES) + ")",
        "unprivileged uid, no capabilities",
        "minimal root (pivot_root)",
    )
    result = jail_smoke(facts)
    if isinstance(result, str):
        fix = "run as root with bwrap and setpriv installed"
        return [Layer(name, False, result, fix) for name in names]
    seen, uid, workdir = result
    shared = [n for n in NAMESPACES if seen.get(f"ns {n}") == os.readlink(f"/proc/self/ns/{n}")]
    ns = Layer(
        names[0],
        not shared,
        "all new" if not shared else f"shared with the host: {shared}",
        "" if not shared else "a kernel with these namespaces",
    )
    ids = seen.get("Uid", "").split() + seen.get("Gid", "").split()
    caps = {k: seen.get(k, "") for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    no_caps = all(v and int(v, 16) == 0 for v in caps.values())
    dropped = set(ids) == {str(uid)} and no_caps and seen.get("NoNewPrivs") == "1"
    who = Layer(
        names[1],
        dropped,
        f"uid/gid {uid}, CapEff {caps['CapEff']}, CapBnd "
        f"{caps['CapBnd']}, NoNewPrivs {seen.get('NoNewPrivs')}, groups "
        f"[{seen.get('Groups', '')}]",
        "" if dropped else "check setpriv (util-linux)",
    )
    root = set(seen.get("root", "").split())
    extra = root - SYSTEM_ROOT - {workdir.parts[1]}
    tree = Layer(
        names[2],
        not extra,
        f"/ holds only {' '.join(sorted(root))}",
        "" if not extra else f"unexpected: {sorted(extra)}",
    )
    return [ns, who, tree]


def check_cgroups(facts: jail_plan.HostFacts) -> Layer:
    """The cgroup version and which of memory, pids and cpu the jail can limit."""
    layout = facts.layout
    used = layout.controller_versions()
    where = ", ".join(f"{c} (v{v})" for c, v in used.items()) or "none"
    parents = ", ".join(str(h.parent / cgroups.GROUP_DIR) for h in layout.hierarchies)
    detail = f"cgroup {layout.version}: {where}" + (f" under {parents}" if parents else "")
    if layout.missing:
        reasons = "; ".join(f"{c}: {why}" for c, why in layout.missing)
        return Layer(
            "cgroup limits",
            False,
            f"{detail}; missing {reasons}",
            "mount the memory, pids and cpu controllers (v1 or v2)",
        )
    if facts.euid != 0:
        return Layer("cgroup limits", False, f"{detail}; only root makes VM cgroups", "run as root")
    return Layer("cgroup limits", True, detail)


def check_id_range(etc: Path = Path("/etc")) -> Layer:
    """No user, group or subordinate-id range may own an id of the jail's range."""
    low, high = jail_plan.TEMPLATE_RAM_GID, jail_plan.JAIL_ID_BASE + jail_plan.JAIL_SLOTS - 1
    clashes = []
    for path in (etc / "passwd", etc / "group"):
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit() and low <= int(fields[2]) <= high:
                    clashes.append(f"{path}: {fields[0]}")
    for path in (etc / "subuid", etc / "subgid"):
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    start, count = int(fields[1]), int(fields[2])
                    if start <= high and start + count > low:
                        clashes.append(f"{path}: {fields[0]}")
    detail = f"uids/gids {jail_plan.JAIL_ID_BASE}..{high}, template group {low}"
    if clashes:
        return Layer(
            "jail id range",
            False,
            f"{detail} overlap {', '.join(clashes)}",
            "move those ids out of the range",
        )
    return Layer("jail id range", True, f"{detail}: owned by nobody else")


def check_template_ram(version: str) -> Layer:
    """Whether clones can map their template's RAM read-only (QEMU 8.2 and later)."""
    name = "template RAM read-only to clones"
    if jail_plan.private_readonly_ram(version):
        return Layer(name, True, f"QEMU {version}: readonly=on,rom=off")
    return Layer(
        name,
        False,
        f"QEMU {version} opens a template's RAM file read-write even for a private mapping, so "
        "a jailed clone could change it; the change is detected before the next clone starts",
        "QEMU 8.2 or later",
    )


def check_all() -> list[Layer]:
    """Every layer, in the order a VM meets them."""
    try:
        qemu: str | None = qemu_binary()
        version = qemu_version(qemu) if qemu else ""
    except FissionError:
        qemu, version = None, ""
    facts = jailer.host_facts(qemu)
    return [
        check_kvm(),
        check_seccomp(),
        check_root(),
        check_tools(facts),
        check_setting(facts),
        *jail_layers(facts),
        check_id_range(),
        check_cgroups(facts),
        check_template_ram(version),
    ]


def as_json(layers: list[Layer]) -> str:
    """The layers as a JSON document."""
    return json.dumps({"layers": [asdict(layer) for layer in layers]}, indent=2)
