"""`fission doctor`'s pure parts, and the host-side reads a jailed VMM could try to fool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fission.vmm import jail_plan, jailer, layer_checks
from fission.vmm.cgroups import Layout
from fission.vmm.qemu import tail

JAILED_STATUS = """\
Name:\tsh
Uid:\t900005\t900005\t900005\t900005
Gid:\t900005\t900005\t900005\t900005
CapEff:\t0000000000000000
NoNewPrivs:\t1
ns mnt mnt:[4026532177]
ns pid pid:[4026532180]
root bin dev etc lib lib64 proc sbin tmp usr
"""


def test_parse_probe_reads_status_namespaces_and_root() -> None:
    seen = layer_checks.parse_probe(JAILED_STATUS)
    assert seen["Uid"].split() == ["900005"] * 4
    assert seen["ns mnt"] == "mnt:[4026532177]" and seen["ns pid"] == "pid:[4026532180]"
    assert seen["root"].split()[0] == "bin" and seen["NoNewPrivs"] == "1"


def test_id_range_clashes_are_reported(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nsvc:x:900010:900010::/:/bin/false\n")
    (tmp_path / "group").write_text("root:x:0:\n")
    (tmp_path / "subuid").write_text("alice:100000:65536\nbob:899000:2000\n")
    layer = layer_checks.check_id_range(tmp_path)
    assert not layer.ok and "svc" in layer.detail and "bob" in layer.detail and "alice" not in layer.detail
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "subuid").write_text("alice:100000:65536\n")
    assert layer_checks.check_id_range(clean).ok


def test_template_ram_layer_follows_the_qemu_version() -> None:
    assert layer_checks.check_template_ram("8.2.0").ok
    old = layer_checks.check_template_ram("7.2.22")
    assert not old.ok and old.fix == "QEMU 8.2 or later"


def test_tail_reads_only_a_regular_file(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, lines=2) == "line 98\nline 99"
    assert tail(log, lines=100, max_bytes=16) == "line 98\nline 99"  # only the end is read
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    (tmp_path / "console.log").symlink_to(secret)  # what a jailed QEMU could leave
    assert tail(tmp_path / "console.log") == ""
    os.mkfifo(tmp_path / "fifo")
    assert tail(tmp_path / "fifo") == ""  # and never blocks
    assert tail(tmp_path / "missing") == ""


def test_give_back_restores_owner_and_mode_but_not_through_a_symlink(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    disk.chmod(0o600)
    before = disk.stat()
    disk.chmod(0o777)  # the VM's uid changed it while it was lent
    jailer.give_back(disk, before)
    assert disk.stat().st_mode & 0o777 == 0o600
    victim = tmp_path / "victim"
    victim.write_text("v")
    victim.chmod(0o644)
    swapped = tmp_path / "swapped"
    swapped.symlink_to(victim)
    jailer.give_back(swapped, before)
    assert victim.stat().st_mode & 0o777 == 0o644


def test_layers_have_a_fix_when_missing() -> None:
    facts = jail_plan.HostFacts(euid=1000, bwrap=None, setpriv=None, layout=Layout((), ()))
    for layer in (layer_checks.check_tools(facts), layer_checks.check_setting(facts), layer_checks.check_cgroups(facts),
                  *layer_checks.jail_layers(facts)):
        assert not layer.ok and layer.fix, layer


@pytest.mark.parametrize("value", ["on", "off"])
def test_setting_layer_reports_the_decision(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_JAIL", value)
    facts = jail_plan.HostFacts(euid=0, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv",
                           layout=Layout((), ()))
    layer = layer_checks.check_setting(facts)
    assert layer.ok is (value == "on") and f"FISSION_JAIL={value}" in layer.detail
