"""The QEMU command line of one VM, built by pure functions (unit-tested without QEMU).

``QemuVM`` (``qemu``) only spawns what ``qemu_argv`` returns; the module docstring there says
what each VM gets and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fission.vmm.base import VMConfig

AGENT_PORT_NAME = "org.fission.agent"
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
BASE_KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "cryptomgr.notests",
    "sysctl.kernel.hung_task_timeout_secs=4",
)
# TCG's translation cache, the most of it a VM keeps resident. Measured on a Python clone:
# restore and warm-up fill 26 MiB, a numpy/pandas run 10 more, an import-heavy stdlib run 8.
# When it is full QEMU starts it over (a VM that ran that much re-translates what it uses
# next), so this bounds the memory of a long-lived sandbox without slowing one-shot runs.
TCG_TB_SIZE_MB = 64


@dataclass(frozen=True)
class QemuPaths:
    """Files of one VM inside its directory."""

    workdir: Path

    @property
    def agent_socket(self) -> Path:
        """Unix socket of the agent's virtio-serial port."""
        return self.workdir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        """Unix socket of QMP."""
        return self.workdir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        """The guest's serial console."""
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.workdir / "qemu.log"


def snapshot_args(config: VMConfig, readonly_ram: bool = False) -> list[str]:
    """Arguments for file-backed RAM (templates and clones) and for restoring a saved state.

    A restore waits (``-incoming defer``) until QMP has set the migration capabilities and
    handed over the state file's descriptor. ``readonly_ram``: a clone opens its template's
    RAM file read-only and still writes its private copy (QEMU 8.2 and later).
    """
    args: list[str] = []
    if config.memory_anonymous:
        args += ["-object", f"memory-backend-ram,id=ram,size={config.memory_mb}M"]
    if config.memory_file is not None:
        share = "on" if config.memory_shared else "off"
        readonly = ",readonly=on,rom=off" if readonly_ram and not config.memory_shared else ""
        args += [
            "-object",
            f"memory-backend-file,id=ram,size={config.memory_mb}M,"
            f"mem-path={option_value(config.memory_file)},share={share}{readonly}",
        ]
    if config.incoming is not None:
        args += ["-incoming", "defer"]
    return args


def option_value(value: object) -> str:
    """``value`` quoted for a QEMU ``key=value,...`` option: each comma doubled."""
    return str(value).replace(",", ",,")


def boot_args(config: VMConfig) -> list[str]:
    """The kernel, initramfs and kernel command line, for a VM that boots.

    A VM that restores a saved state does not boot: QEMU would still read the kernel and keep a
    copy of it for the firmware (about 14 MiB per VM, resident and private, and the reading
    costs CPU at every start), and the restored guest never asks for it.
    """
    if config.incoming is not None:
        return []
    kernel_args = " ".join((*BASE_KERNEL_ARGS, *config.kernel_args))
    return ["-kernel", str(config.kernel), "-initrd", str(config.initramfs), "-append", kernel_args]


def qemu_argv(qemu: str, config: VMConfig, accel: str, readonly_ram: bool = False) -> list[str]:
    """The full QEMU command line for ``config`` under ``accel`` (``kvm`` or ``tcg``)."""
    paths = QemuPaths(config.workdir)
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
    if config.memory_file is not None or config.memory_anonymous:
        machine += ",memory-backend=ram"
    scratch_mode = "" if config.scratch_writable else ",snapshot=on"
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel_args = ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MB}", "-cpu", "max"]
    return [
        qemu,
        "-name",
        f"fission-{config.vm_id},process=fission-{config.vm_id}",
        "-M",
        machine,
        *accel_args,
        "-smp",
        str(config.vcpus),
        "-m",
        f"{config.memory_mb}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-sandbox",
        SANDBOX_OPTS,
        "-serial",
        f"file:{paths.console_log}",  # the legacy file: form takes the rest verbatim
        *boot_args(config),
        "-drive",
        f"id=root,file={option_value(config.rootfs)},format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-device,drive=root",
        "-drive",
        f"id=scratch,file={option_value(config.scratch)},format={config.scratch_format},"
        f"if=none{scratch_mode}",
        "-device",
        "virtio-blk-device,drive=scratch",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        f"socket,id=agent,path={option_value(paths.agent_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-qmp",
        f"unix:{option_value(paths.qmp_socket)},server=on,wait=off",
        *snapshot_args(config, readonly_ram),
    ]
