"""Unit tests for the pure parts of warm starts: snapshot fit and keys, budget, config, wire."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fission.api.run_stream import (
    error_body,
    error_from_body,
    output_bytes,
    output_line,
    result_from_lines,
    result_line,
)
from fission.core import snapshots
from fission.core.journal import Journal, process_start_time
from fission.core.limits import Limits
from fission.core.pool import MemoryBudget, WarmPool
from fission.core.service_options import parse_pool_flags
from fission.core.spec import RunResult
from fission.errors import Busy, InvalidInput, LimitOutOfRange, UnknownLanguage
from fission.guest import zygote
from fission.images.store import ImageSet
from fission.server.daemon import build_config
from fission.vmm import jailer, qemu_snapshots


def test_snapshot_fits_only_the_template_shape() -> None:
    assert snapshots.fits(Limits())
    assert snapshots.fits(Limits(memory_mb=snapshots.TEMPLATE_CAPACITY_MB, timeout=5))
    assert not snapshots.fits(Limits(memory_mb=snapshots.TEMPLATE_CAPACITY_MB + 1))
    assert not snapshots.fits(Limits(disk_mb=64))
    if (os.cpu_count() or 1) > 1:
        assert not snapshots.fits(Limits(cpus=2))


def images(tmp_path: Path, rootfs: str = "rootfs.ext4") -> ImageSet:
    return ImageSet("python", tmp_path / "k", tmp_path / "i", tmp_path / rootfs, "6.1")


def test_snapshot_key_changes_with_every_input(tmp_path: Path) -> None:
    key = qemu_snapshots.snapshot_key
    base = key(images(tmp_path), "tcg", "7.2", (), False)
    assert base == key(images(tmp_path), "tcg", "7.2", (), False)
    others = {
        key(images(tmp_path, "other.ext4"), "tcg", "7.2", (), False),
        key(images(tmp_path), "kvm", "7.2", (), False),
        key(images(tmp_path), "tcg", "8.0", (), False),
        key(images(tmp_path), "tcg", "7.2", (), True),
        key(images(tmp_path), "tcg", "7.2", ("fission.zygote=numpy",), False),
    }
    assert base not in others and len(others) == 5


def test_a_python_template_preloads_its_modules_in_the_fork_server() -> None:
    assert snapshots.warm_template("python").kernel_args == ("fission.zygote=numpy,pandas",)
    assert snapshots.warm_template("bash").kernel_args == ()


def test_find_snapshot_needs_its_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_CACHE_DIR", str(tmp_path))
    found = qemu_snapshots.find_snapshot(images(tmp_path), "tcg", "7.2")
    assert found is None
    directory = qemu_snapshots.snapshot_path(images(tmp_path), "tcg", "7.2")
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"kernel_args": ["a=1"]}))
    found = qemu_snapshots.find_snapshot(images(tmp_path), "tcg", "7.2")
    assert found is not None and found.kernel_args == ("a=1",)
    assert found.memory.parent == directory


def test_memory_budget() -> None:
    budget = MemoryBudget(1000)
    assert budget.reserve(600)
    assert not budget.reserve(500)
    budget.release(600)
    assert budget.reserve(1000)
    budget.release(5000)
    assert budget.used_mb == 0


def test_an_empty_pool_answers_busy_after_its_deadline() -> None:
    async def never() -> object:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        pool = WarmPool("python", 1, MemoryBudget(0), 100, never)  # type: ignore[arg-type]
        pool.start()
        try:
            with pytest.raises(Busy, match="--pool python=N"):
                await pool.acquire(0.2)
            assert pool.status()["busy"] == 1
            assert pool.status()["starting"] == 0  # the budget allowed nothing
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_pool_flags() -> None:
    assert parse_pool_flags(["python=2", "js=1"]) == {"python": 2, "node": 1}
    with pytest.raises(InvalidInput, match="LANGUAGE=COUNT"):
        parse_pool_flags(["python"])
    with pytest.raises(InvalidInput, match="at most 64"):
        parse_pool_flags(["python=100"])
    with pytest.raises(UnknownLanguage):
        parse_pool_flags(["cobol=1"])


def config(**overrides: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "config_file": None, "pools": [], "memory_budget_mb": None, "acquire_timeout": None,
        "socket": None, "host": None, "port": None, "state_dir": None,
    }
    args.update(overrides)
    return build_config(**args)  # type: ignore[arg-type]


def test_config_file_and_flags(tmp_path: Path) -> None:
    file = tmp_path / "fission.toml"
    file.write_text('memory_budget_mb = 4096\nacquire_timeout = 3.5\n[pool]\npython = 3\nbash = 1\n')
    merged = config(config_file=file, pools=["bash=2"], socket=tmp_path / "s.sock")
    assert merged.service.pools == {"python": 3, "bash": 2}
    assert merged.service.memory_budget_mb == 4096
    assert merged.service.acquire_timeout == 3.5
    assert merged.socket == tmp_path / "s.sock" and merged.host is None


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        config(config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("pool = [")
    with pytest.raises(InvalidInput, match="not valid TOML"):
        config(config_file=bad)
    with pytest.raises(InvalidInput, match="at least 256"):
        config(memory_budget_mb=10)
    with pytest.raises(InvalidInput, match="both --host and --port"):
        config(host="127.0.0.1")


def test_tcp_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path))
    assert config().socket == tmp_path / "fission.sock"
    tcp = config(host="127.0.0.1", port=8080)
    assert tcp.socket is None and (tcp.host, tcp.port) == ("127.0.0.1", 8080)


@pytest.mark.parametrize("data", [b"plain text\n", b"\xff\xfe binary", b""])
def test_output_lines_round_trip(data: bytes) -> None:
    line = json.loads(json.dumps(output_line("stderr", data)))
    assert output_bytes(line) == ("stderr", data)


def test_result_and_error_lines() -> None:
    result = RunResult(3, b"o", b"e", False, True, False, 9, 1.5, 2.5, 4.0)
    line = json.loads(json.dumps(result_line(result)))
    assert "stdout" not in line and line["type"] == "result"
    assert result_from_lines(line, b"o", b"e") == result
    error = error_from_body(error_body(LimitOutOfRange("--memory 1 is out of range")))
    assert isinstance(error, LimitOutOfRange) and "--memory" in error.message
    assert type(error_from_body({"code": "nonsense", "message": "x"})).__name__ == "FissionError"


def test_journal_reconcile_kills_only_the_recorded_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swept: list[list[str]] = []
    monkeypatch.setattr(jailer, "remove_stale_cgroups", lambda ids: swept.append(sorted(ids)) or 2)
    journal = Journal(tmp_path)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(victim.pid)
        assert start is not None
        (journal.directory / "a.json").write_text(
            json.dumps({"pid": victim.pid, "start_time": start, "workdir": "x"}))
        # A record whose start time does not match (a recycled pid) must not be killed.
        (journal.directory / "b.json").write_text(
            json.dumps({"pid": os.getpid(), "start_time": -1, "workdir": "y"}))
        (journal.vms_dir / "vm-old").mkdir()
        assert journal.reconcile() == {"killed": 1, "removed": 1, "cgroups": 2}
        # The cgroups of the recorded VMs go too, and those of every VM directory: a VM still
        # starting when the daemon died has a directory and a cgroup but no record yet.
        assert swept == [["a", "b", "old"]]
        assert victim.wait(timeout=10) == -9
        assert list(journal.directory.iterdir()) == [] and list(journal.vms_dir.iterdir()) == []
    finally:
        victim.kill()
        victim.wait()


def test_recv_with_fds_is_non_blocking_and_carries_descriptors() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        with pytest.raises(BlockingIOError):
            zygote.recv_with_fds(right, socket.MSG_DONTWAIT)
        read_end, write_end = os.pipe()
        try:
            zygote.send(left, {"warm": 7}, [write_end])
            data, fds = zygote.recv_with_fds(right, socket.MSG_DONTWAIT)
            assert json.loads(data) == {"warm": 7} and len(fds) == 1
            os.write(fds[0], b"through the passed fd")
            os.close(fds[0])
            assert os.read(read_end, 100) == b"through the passed fd"
        finally:
            os.close(read_end)
            os.close(write_end)


@pytest.mark.parametrize(("code", "expected"), [(None, 0), (3, 3), (256 + 4, 4), ("bye", 1)])
def test_exit_code_of_system_exit(code: object, expected: int) -> None:
    assert zygote.exit_code_of(SystemExit(code)) == expected


def test_zygote_modules_from_the_kernel_command_line() -> None:
    from fission.guest.agent import zygote_modules

    assert zygote_modules("quiet fission.zygote=numpy,pandas x=1") == ["numpy", "pandas"]
    assert zygote_modules("fission.zygote=none") == []
    assert zygote_modules("quiet") is None
