"""Pure parts: QEMU command lines, limits, languages, cache keys, cpio, ELF checks, the store."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fission.agent.guest import build_env
from fission.cli.run import read_code
from fission.core.languages import resolve_language
from fission.core.limits import Limits, parse_env
from fission.core.spec import MAX_CODE_BYTES, RunResult, RunSpec
from fission.errors import ImagesNotBuilt, InvalidInput, LimitOutOfRange, UnknownLanguage
from fission.images import cpio
from fission.images.recipes import RECIPES, cache_key, recipe_key
from fission.images.store import agent_key, image_set, save_manifest
from fission.images.tools import is_static_elf
from fission.vmm.accel import accel_override, tsc_khz
from fission.vmm.base import VMConfig
from fission.vmm.qemu import qemu_argv


def config(**changes: object) -> VMConfig:
    base = dict(vm_id="abc", kernel=Path("/k"), initramfs=Path("/i"), rootfs=Path("/r.ext4"),
                scratch=Path("/s.ext4"), vcpus=2, memory_mb=352, workdir=Path("/run/vm"),
                kernel_args=("tsc_early_khz=1",))
    base.update(changes)
    return VMConfig(**base)  # type: ignore[arg-type]


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_qemu_argv_isolates_by_default(accel: str) -> None:
    argv = qemu_argv("qemu", config(), accel)
    assert "-nodefaults" in argv and value_after(argv, "-nic") == ["none"]
    assert not any("netdev" in arg for arg in argv)
    sandbox = value_after(argv, "-sandbox")[0]
    for part in ("on", "obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
        assert part in sandbox.split(",")
    drives = value_after(argv, "-drive")
    assert any("file=/r.ext4" in d and "readonly=on" in d for d in drives)
    assert any("file=/s.ext4" in d and "snapshot=on" in d for d in drives)
    assert value_after(argv, "-m") == ["352M"] and value_after(argv, "-smp") == ["2"]
    assert "tsc_early_khz=1" in value_after(argv, "-append")[0]
    accel_flags = value_after(argv, "-accel")[0]
    if accel == "kvm":
        assert accel_flags == "kvm" and value_after(argv, "-cpu") == ["host"]
    else:
        assert accel_flags.startswith("tcg") and value_after(argv, "-cpu") == ["max"]


def test_qemu_argv_for_templates_and_clones() -> None:
    template = qemu_argv("qemu", config(memory_file=Path("/m"), memory_shared=True,
                                        scratch_writable=True), "tcg")
    assert any("mem-path=/m,share=on" in a for a in template)
    assert not any("snapshot=on" in d for d in value_after(template, "-drive"))
    assert "-incoming" not in template
    clone = qemu_argv("qemu", config(memory_file=Path("/m"), incoming=Path("/state")), "tcg")
    assert any("mem-path=/m,share=off" in a for a in clone)
    assert value_after(clone, "-incoming") == ["defer"]
    assert "memory-backend=ram" in value_after(clone, "-M")[0]


def test_tsc_and_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tsc_khz("processor : 0\ncpu MHz\t\t: 2100.000\n") == 2100000
    assert tsc_khz("nothing") is None
    monkeypatch.setenv("FISSION_ACCEL", "KVM")
    assert accel_override() == "kvm"
    monkeypatch.setenv("FISSION_ACCEL", "xen")
    with pytest.raises(InvalidInput, match="FISSION_ACCEL"):
        accel_override()
    monkeypatch.delenv("FISSION_ACCEL")
    assert accel_override() is None


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [("timeout", 0, "--timeout"), ("timeout", 4000, "--timeout"), ("memory_mb", 16, "--memory"),
     ("memory_mb", 10**6, "--memory"), ("disk_mb", 1, "--disk"), ("pids", 1, "--pids"),
     ("output_limit_mb", 0, "--output-limit"), ("timeout", float("nan"), "--timeout"),
     ("memory_mb", True, "--memory"), ("cpus", 0, "--cpus")],
)
def test_limits_out_of_range_name_their_option(field: str, value: object, option: str) -> None:
    with pytest.raises(LimitOutOfRange, match=option):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_parse_env() -> None:
    assert parse_env(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("NOEQ", "=v", "1A=v", "A-B=v", "A=\0"):
        with pytest.raises(InvalidInput):
            parse_env([bad])


def test_languages_and_aliases() -> None:
    assert resolve_language("JavaScript").name == "node"
    assert resolve_language("py").name == "python"
    assert resolve_language(" sh ").name == "bash"
    with pytest.raises(UnknownLanguage, match=r"python.*node.*bash"):
        resolve_language("cobol")


def test_run_spec_and_result() -> None:
    language = resolve_language("python")
    with pytest.raises(InvalidInput, match="bytes"):
        RunSpec(language, "x" * (MAX_CODE_BYTES + 1))
    with pytest.raises(InvalidInput, match="NUL"):
        RunSpec(language, "a\0b")
    body = RunResult(1, b"\xffok", b"", True, False, True, 0, 1.0, 2.0, 3.0).to_json()
    assert body["stdout"] == "\ufffdok" and body["timed_out"] and body["truncated"]
    assert {"stdout", "stderr", "exit_code", "timed_out", "oom", "duration_ms", "truncated"} <= set(body)


def test_cache_keys() -> None:
    assert cache_key("a", "b") == cache_key("a", "b")
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key("a", "b") != cache_key("b", "a")
    python = RECIPES["python"]
    assert recipe_key(python, b"src") != recipe_key(python, b"other src")
    assert recipe_key(python, b"src") != recipe_key(RECIPES["node"], b"src")


def parse_newc(archive: bytes) -> dict[str, bytes]:
    members, offset = {}, 0
    while True:
        assert archive[offset:offset + 6] == b"070701" and offset % 4 == 0
        fields = [int(archive[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return members
        members[name] = archive[data_start:data_start + size]
        offset = (data_start + size + 3) // 4 * 4


def test_cpio_archive_is_valid_newc() -> None:
    entries = [cpio.directory("bin"), cpio.file("bin/x", b"abc", executable=True),
               cpio.file("init", b"#!/bin/sh\n"), cpio.char_device("dev/console", 5, 1)]
    archive = cpio.newc_archive(entries)
    assert parse_newc(archive) == {"bin": b"", "bin/x": b"abc", "init": b"#!/bin/sh\n",
                                   "dev/console": b""}
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed: the system tool's check is skipped")
    listing = subprocess.run(["cpio", "-t"], input=archive, capture_output=True, check=True)
    assert listing.stdout.split() == [b"bin", b"bin/x", b"init", b"dev/console"]


def test_is_static_elf() -> None:
    if Path("/bin/busybox").exists():
        assert is_static_elf(Path("/bin/busybox").read_bytes())
    assert not is_static_elf(Path("/bin/ls").read_bytes())
    assert not is_static_elf(b"not an elf at all")
    assert not is_static_elf(b"\x7fELF\x02\x01" + b"\xff" * 60)


def test_image_set_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_CACHE_DIR", str(tmp_path))
    with pytest.raises(ImagesNotBuilt, match="fission images build python"):
        image_set("python")
    files = {name: tmp_path / name for name in ("vmlinuz", "initrd", "root.ext4")}
    for path in files.values():
        path.write_bytes(b"x")
    manifest = {"kernel": {"path": str(files["vmlinuz"]), "release": "6.1"},
                "initramfs": {"path": str(files["initrd"])},
                "rootfs": {"python": {"path": str(files["root.ext4"]), "agent_key": "old"}}}
    save_manifest(manifest)
    with pytest.raises(ImagesNotBuilt, match="older guest agent"):
        image_set("python")
    manifest["rootfs"]["python"]["agent_key"] = agent_key()
    save_manifest(manifest)
    assert image_set("python").kernel_release == "6.1"
    files["root.ext4"].unlink()
    with pytest.raises(ImagesNotBuilt, match="missing"):
        image_set("python")


def test_read_code(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="one of the two"):
        read_code(None, None)
    with pytest.raises(InvalidInput, match="one of the two"):
        read_code("x", tmp_path)
    with pytest.raises(InvalidInput, match="no such file"):
        read_code(None, tmp_path / "missing.py")
    with pytest.raises(InvalidInput, match="directory"):
        read_code(None, tmp_path)
    binary = tmp_path / "bin.py"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidInput, match="UTF-8"):
        read_code(None, binary)


def test_guest_modules_use_only_the_standard_library() -> None:
    agent = Path(__file__).resolve().parents[2] / "fission" / "agent"
    local = {"protocol", "confine", "zygote"}
    for name in ("guest.py", "protocol.py", "confine.py", "zygote.py"):
        tree = ast.parse((agent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root in local, f"{name} imports {root}"


def test_guest_env_is_built_from_the_request_only() -> None:
    env = build_env({"A": "1", "HOME": "/tmp"})
    assert env["A"] == "1" and env["HOME"] == "/tmp" and env["PATH"].startswith("/usr/local")
    assert "FISSION_CACHE_DIR" not in env
    for bad in ({"A=B": "1"}, {"A": "x\0y"}, {"": "1"}):
        with pytest.raises(ValueError):
            build_env(bad)
    assert json.dumps(build_env({}))
