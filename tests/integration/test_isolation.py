"""What the guest can see of the host: nothing but its own kernel, disks and loopback."""

from __future__ import annotations

import json
import os
import platform

import pytest

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.orchestrator import boot
from fission.core.spec import RunSpec
from fission.errors import BootTimeout
from fission.images.store import image_set
from tests.integration.helpers import run_code, run_spec

pytestmark = pytest.mark.vm

PROBE = r"""
import json, os, platform, socket
facts = {
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "release": platform.release(),
    "hostname": socket.gethostname(),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "pid1_visible": os.path.exists("/proc/1/cmdline"),
}
try:
    os.kill(1, 9)
    facts["kill_agent"] = "allowed"
except OSError as e:
    facts["kill_agent"] = e.errno
try:
    open(HOST_FILE).read()
    facts["host_file"] = "readable"
except OSError as e:
    facts["host_file"] = e.errno
try:
    open("/etc/shadow").read()
    facts["shadow"] = "readable"
except OSError as e:
    facts["shadow"] = e.errno
facts["routes"] = open("/proc/net/route").read().splitlines()[1:]
facts["routes6"] = [l for l in open("/proc/net/ipv6_route").read().splitlines() if not l.endswith(" lo")]
print(json.dumps(facts))
"""


async def test_guest_sees_its_own_kernel_no_network_and_no_host_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")
    code = f"HOST_FILE = {str(secret)!r}\n" + PROBE
    result = await run_code("python", code)
    assert result.exit_code == 0, result.stderr.decode()
    facts = json.loads(result.stdout)
    assert facts["interfaces"] == ["lo"]
    assert facts["release"] == image_set("python").kernel_release
    assert facts["release"] != platform.release()
    assert facts["hostname"] == "fission"
    assert (facts["uid"], facts["gid"]) == (1000, 1000)
    assert facts["pid1_visible"] is False  # /proc is mounted hidepid=2
    assert facts["kill_agent"] in (1, 3)  # EPERM or ESRCH: the agent cannot be signalled
    assert facts["host_file"] == 2  # ENOENT: no host filesystem is shared
    assert facts["shadow"] == 13  # EACCES
    assert facts["routes"] == [] and facts["routes6"] == []  # no route anywhere but loopback


async def test_set_uid_programs_cannot_raise_privileges() -> None:
    result = await run_code("bash", "su -c id root </dev/null; id -u")
    assert result.stdout.strip().splitlines()[-1] == b"1000"


async def test_a_failed_boot_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_BOOT_TIMEOUT", "1")
    with pytest.raises(BootTimeout, match="FISSION_BOOT_TIMEOUT"):
        # A disk size the snapshot does not have: a cold boot, which cannot finish in 1 s.
        await run_spec(RunSpec(resolve_language("python"), "print(1)", Limits(disk_mb=64)))
    # the autouse no_leftovers fixture then checks for processes and files


async def test_qmp_answers_and_destroy_is_idempotent() -> None:
    vm, agent = await boot(RunSpec(resolve_language("bash"), "true"), warm=False)
    try:
        status = await vm.qmp("query-status")
        assert isinstance(status, dict) and status["running"] is True
        pid = vm.pid
        assert pid is not None and os.path.exists(f"/proc/{pid}")
    finally:
        await agent.close()
        await vm.destroy()
        await vm.destroy()
    assert vm.pid is None
    assert not vm.config.workdir.exists()
