"""The QEMU command line, built by a pure function: isolation flags, disks, accel, shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.vmm.base import VMConfig
from fission.vmm.qemu_argv import BASE_KERNEL_ARGS, TCG_TB_SIZE_MB, qemu_argv

ACCELS = ["tcg", "kvm"]


def config(**changes: object) -> VMConfig:
    base: dict[str, object] = dict(
        vm_id="abc123",
        kernel=Path("/fake/vmlinuz"),
        initramfs=Path("/fake/initrd.cpio.gz"),
        rootfs=Path("/fake/rootfs-python.ext4"),
        scratch=Path("/fake/scratch-512.ext4"),
        vcpus=2,
        memory_mb=352,
        workdir=Path("/run/fission/vm-abc123"),
        kernel_args=("tsc_early_khz=2100000", "fission.zygote=numpy"),
    )
    base.update(changes)
    return VMConfig(**base)  # type: ignore[arg-type]


def values_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def one_value(argv: list[str], flag: str) -> str:
    [value] = values_after(argv, flag)
    return value


def qemu_options(value: str) -> list[tuple[str, str]]:
    """Split an option string the way QEMU does: ``,`` separates, ``,,`` is a literal comma."""
    parts, current, index = [], "", 0
    while index < len(value):
        if value[index] == "," and value[index + 1 : index + 2] == ",":
            current, index = current + ",", index + 2
        elif value[index] == ",":
            parts.append(current)
            current, index = "", index + 1
        else:
            current, index = current + value[index], index + 1
    parts.append(current)
    return [(key, val) for key, _, val in (part.partition("=") for part in parts)]


def drive(argv: list[str], drive_id: str) -> dict[str, str]:
    """The options of the -drive whose id is ``drive_id``; each key may appear only once."""
    for value in values_after(argv, "-drive"):
        pairs = qemu_options(value)
        options = dict(pairs)
        if options.get("id") == drive_id:
            assert len(options) == len(pairs), f"repeated keys in -drive {value}"
            return options
    raise AssertionError(f"no -drive id={drive_id} in {argv}")


@pytest.mark.parametrize("accel", ACCELS)
def test_the_binary_comes_first(accel: str) -> None:
    assert qemu_argv("/opt/qemu/bin/qemu-system-x86_64", config(), accel)[0] == (
        "/opt/qemu/bin/qemu-system-x86_64"
    )


@pytest.mark.parametrize("accel", ACCELS)
def test_no_network_at_all(accel: str) -> None:
    argv = qemu_argv("qemu", config(), accel)
    assert values_after(argv, "-nic") == ["none"]
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert not any(arg in ("-netdev", "-net") for arg in argv)
    assert not any("netdev" in arg or "virtio-net" in arg or "user," in arg for arg in argv)


@pytest.mark.parametrize("accel", ACCELS)
def test_qemu_runs_under_its_seccomp_sandbox(accel: str) -> None:
    options = one_value(qemu_argv("qemu", config(), accel), "-sandbox").split(",")
    assert options[0] == "on"
    for part in ("obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
        assert part in options


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("scratch_writable", [False, True])
def test_root_disk_is_read_only(accel: str, scratch_writable: bool) -> None:
    root = drive(qemu_argv("qemu", config(scratch_writable=scratch_writable), accel), "root")
    assert root["file"] == "/fake/rootfs-python.ext4"
    assert root["readonly"] == "on" and root["format"] == "raw"


@pytest.mark.parametrize("accel", ACCELS)
def test_scratch_disk_writes_go_to_a_throwaway_overlay(accel: str) -> None:
    scratch = drive(qemu_argv("qemu", config(), accel), "scratch")
    assert scratch["file"] == "/fake/scratch-512.ext4"
    assert scratch["snapshot"] == "on" and scratch["format"] == "raw"
    assert "readonly" not in scratch


def test_a_template_writes_its_scratch_disk() -> None:
    scratch = drive(qemu_argv("qemu", config(scratch_writable=True), "tcg"), "scratch")
    assert "snapshot" not in scratch


def test_kvm_uses_the_host_cpu() -> None:
    argv = qemu_argv("qemu", config(), "kvm")
    assert one_value(argv, "-accel") == "kvm"
    assert one_value(argv, "-cpu") == "host"
    assert not any("tcg" in arg for arg in argv)


def test_tcg_uses_a_large_translation_cache() -> None:
    argv = qemu_argv("qemu", config(), "tcg")
    assert one_value(argv, "-accel") == f"tcg,tb-size={TCG_TB_SIZE_MB}"
    assert one_value(argv, "-cpu") == "max"
    assert not any("kvm" in arg for arg in argv)


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize(("vcpus", "memory_mb"), [(1, 128), (2, 352), (8, 16480)])
def test_memory_and_cpus_come_from_the_config(accel: str, vcpus: int, memory_mb: int) -> None:
    argv = qemu_argv("qemu", config(vcpus=vcpus, memory_mb=memory_mb), accel)
    assert one_value(argv, "-m") == f"{memory_mb}M"
    assert one_value(argv, "-smp") == str(vcpus)


@pytest.mark.parametrize("accel", ACCELS)
def test_kernel_initrd_and_arguments(accel: str) -> None:
    argv = qemu_argv("qemu", config(), accel)
    assert one_value(argv, "-kernel") == "/fake/vmlinuz"
    assert one_value(argv, "-initrd") == "/fake/initrd.cpio.gz"
    args = one_value(argv, "-append").split(" ")
    assert args == [*BASE_KERNEL_ARGS, "tsc_early_khz=2100000", "fission.zygote=numpy"]
    assert "console=ttyS0" in args and "panic=-1" in args


def test_no_extra_kernel_arguments() -> None:
    args = one_value(qemu_argv("qemu", config(kernel_args=()), "kvm"), "-append")
    assert args == " ".join(BASE_KERNEL_ARGS)


@pytest.mark.parametrize("accel", ACCELS)
def test_sockets_and_logs_live_in_the_vm_directory(accel: str) -> None:
    argv = qemu_argv("qemu", config(), accel)
    assert one_value(argv, "-serial") == "file:/run/fission/vm-abc123/console.log"
    assert "path=/run/fission/vm-abc123/agent.sock" in one_value(argv, "-chardev")
    assert one_value(argv, "-qmp").startswith("unix:/run/fission/vm-abc123/qmp.sock,")
    assert one_value(argv, "-name").startswith("fission-abc123,")


@pytest.mark.parametrize("accel", ACCELS)
def test_a_cold_boot_has_no_snapshot_arguments(accel: str) -> None:
    argv = qemu_argv("qemu", config(), accel)
    assert "-incoming" not in argv
    assert not any("memory-backend" in arg for arg in argv)


def test_a_template_shares_its_file_backed_memory() -> None:
    argv = qemu_argv(
        "qemu", config(memory_file=Path("/m/ram"), memory_shared=True, scratch_writable=True), "tcg"
    )
    assert any(arg.endswith("size=352M,mem-path=/m/ram,share=on") for arg in argv)
    assert "memory-backend=ram" in one_value(argv, "-M")
    assert "-incoming" not in argv


def test_a_clone_maps_memory_privately_and_waits_for_its_state() -> None:
    argv = qemu_argv("qemu", config(memory_file=Path("/m/ram"), incoming=Path("/state")), "tcg")
    assert any("mem-path=/m/ram,share=off" in arg for arg in argv)
    assert one_value(argv, "-incoming") == "defer"
    assert drive(argv, "scratch")["snapshot"] == "on"


@pytest.mark.parametrize("memory_file", [Path("/m/ram"), None])
def test_a_restored_vm_does_not_load_a_kernel(memory_file: Path | None) -> None:
    argv = qemu_argv("qemu", config(memory_file=memory_file, incoming=Path("/state")), "tcg")
    assert not {"-kernel", "-initrd", "-append"} & set(argv)
    assert one_value(argv, "-incoming") == "defer"


def test_a_full_state_clone_keeps_ordinary_memory() -> None:
    argv = qemu_argv("qemu", config(incoming=Path("/state")), "tcg")
    assert one_value(argv, "-incoming") == "defer"
    assert not any("memory-backend" in arg for arg in argv)


def test_the_option_splitter_follows_qemu() -> None:
    assert qemu_options("id=a,file=/x,,y,readonly=on") == [
        ("id", "a"),
        ("file", "/x,y"),
        ("readonly", "on"),
    ]


@pytest.mark.parametrize("path", ["/home/a,b/s.ext4", "/cache/x,snapshot=off/s.ext4"])
def test_commas_in_paths_reach_qemu_intact(path: str) -> None:
    scratch = drive(qemu_argv("qemu", config(scratch=Path(path)), "tcg"), "scratch")
    assert scratch["file"] == path and scratch["snapshot"] == "on"


def test_restoring_a_clones_stream_uses_anonymous_ram_under_the_templates_id() -> None:
    from fission.vmm.fake import FakeDriver

    clone = config(memory_file=Path("/snap/memory"), incoming=Path("/snap/state"))
    restored = FakeDriver().restored(clone, Path("/box"), keep_writes=True)
    assert restored.memory_file is None and restored.memory_anonymous
    assert restored.incoming == Path("/box/state")
    argv = qemu_argv("qemu", restored, "tcg")
    assert "memory-backend-ram,id=ram,size=352M" in values_after(argv, "-object")
    assert "memory-backend=ram" in one_value(argv, "-M")
    assert not any("memory-backend-file" in v for v in values_after(argv, "-object"))
    # a cold-booted VM's state restores into ordinary memory, as it was saved
    cold = FakeDriver().restored(config(), Path("/box"), keep_writes=True)
    assert not cold.memory_anonymous
    assert "memory-backend" not in one_value(qemu_argv("qemu", cold, "tcg"), "-M")
