"""The QEMU driver's waits, without QEMU: sockets that refuse then listen, a migration's status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fission.errors import VMError, VMStartFailed
from fission.vmm import qemu
from fission.vmm.base import VMConfig
from fission.vmm.qemu import QemuVM


class FakeProcess:
    """What QemuVM reads of its QEMU process."""

    def __init__(self, returncode: int | None = None) -> None:
        self.returncode = returncode
        self.pid = 999_999


def vm_in(workdir: Path, returncode: int | None = None) -> QemuVM:
    config = VMConfig(
        vm_id="waits",
        kernel=Path("/fake/vmlinuz"),
        initramfs=Path("/fake/initrd"),
        rootfs=Path("/fake/rootfs"),
        scratch=Path("/fake/scratch"),
        vcpus=1,
        memory_mb=128,
        workdir=workdir,
    )
    vm = QemuVM(config, "/fake/qemu", "tcg")
    vm._proc = FakeProcess(returncode)  # type: ignore[assignment]
    return vm


def bound_not_listening(path: Path) -> socket.socket:
    """A Unix socket that exists but refuses connections, as QEMU's does for a moment."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


async def test_the_agent_socket_is_retried_until_it_listens(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    sock = bound_not_listening(vm.paths.agent_socket)
    asyncio.get_running_loop().call_later(0.1, sock.listen)
    try:
        started = time.monotonic()
        _, writer = await vm.open_agent_channel()
        assert time.monotonic() - started >= 0.09  # it was refused first, and retried
        writer.close()
    finally:
        sock.close()


async def test_a_refusal_after_qemu_exited_is_not_retried(tmp_path: Path) -> None:
    vm = vm_in(tmp_path, returncode=1)
    sock = bound_not_listening(vm.paths.agent_socket)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await vm.open_agent_channel()
        assert time.monotonic() - started < 1.0
    finally:
        sock.close()


async def test_a_socket_that_never_listens_times_out_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "SOCKET_WAIT_SECONDS", 0.05)
    vm = vm_in(tmp_path)
    sock = bound_not_listening(vm.paths.agent_socket)
    try:
        with pytest.raises(TimeoutError, match="SOCKET_WAIT_SECONDS"):
            await vm.open_agent_channel()
    finally:
        sock.close()


async def test_qmp_is_retried_until_it_listens(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    sock = bound_not_listening(vm.paths.qmp_socket)
    version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
    greeting: dict[str, Any] = {"QMP": {"version": version, "capabilities": []}}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(greeting).encode() + b"\n")
        pending = ""
        while data := await reader.read(4096):
            pending += data.decode()
            with contextlib.suppress(ValueError):  # not a whole JSON object yet
                request, end = json.JSONDecoder().raw_decode(pending.lstrip())
                pending = pending.lstrip()[end:]
                result = {} if request["execute"] == "qmp_capabilities" else {"status": "running"}
                answer = {"return": result, **({"id": request["id"]} if "id" in request else {})}
                writer.write(json.dumps(answer).encode() + b"\n")
        writer.close()

    servers: list[asyncio.Server] = []

    def listen() -> None:
        sock.listen()
        task = asyncio.ensure_future(asyncio.start_unix_server(serve, sock=sock))
        task.add_done_callback(lambda t: servers.append(t.result()))

    asyncio.get_running_loop().call_later(0.1, listen)
    try:
        started = time.monotonic()
        assert await vm.qmp("query-status") == {"status": "running"}
        assert time.monotonic() - started >= 0.09  # refused first, and retried
    finally:
        if vm._qmp is not None:  # not destroy(): it would signal the fake process id
            await vm._qmp.disconnect()
        for server in servers:
            server.close()
        sock.close()


async def test_sockets_wait_stops_when_qemu_exits(tmp_path: Path) -> None:
    vm = vm_in(tmp_path, returncode=1)
    (tmp_path / "qemu.log").write_text("qemu: bad option\n")
    with pytest.raises(VMStartFailed, match="exited with code 1") as caught:
        await vm._sockets_bound()
    assert "bad option" in caught.value.message


def scripted_migration(vm: QemuVM, statuses: list[dict[str, Any]]) -> list[str]:
    """Stand QMP in with answers for ``query-migrate``; the commands sent are returned."""
    sent: list[str] = []

    async def qmp(command: str, **arguments: object) -> object:
        sent.append(command)
        if command == "query-migrate":
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return {}

    async def pass_fd(path: Path, flags: int, name: str) -> None:
        sent.append("getfd")

    vm.qmp = qmp  # type: ignore[method-assign]
    vm._pass_fd = pass_fd  # type: ignore[method-assign]
    return sent


async def test_save_state_waits_for_completion(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    sent = scripted_migration(
        vm, [{"status": "setup"}, {"status": "active"}, {"status": "completed"}]
    )
    await vm.save_state(tmp_path / "state")
    assert sent.count("query-migrate") == 3


async def test_save_state_reports_a_failed_migration(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    scripted_migration(vm, [{"status": "active"}, {"status": "failed", "error-desc": "disk full"}])
    with pytest.raises(VMError, match="saving the VM state failed: disk full"):
        await vm.save_state(tmp_path / "state")


async def test_save_state_gives_up_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "SAVE_STATE_SECONDS", 0.05)
    vm = vm_in(tmp_path)
    scripted_migration(vm, [{"status": "active"}])
    with pytest.raises(VMError, match=r"saving the VM state failed: .*SAVE_STATE_SECONDS"):
        await vm.save_state(tmp_path / "state")
