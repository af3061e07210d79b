"""The gRPC servicers in process, over a real Service on the fake VMM driver (no QEMU).

Auth, statuses, streams and files go through the real SandboxManager and agent protocol; the
calls the servicers make into the core are recorded by wrapping the real methods (``record_calls``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from fastapi import FastAPI

from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.auth.keys import KeyLimits, KeyStore
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service
from fission.errors import InvalidInput
from fission.server.auth import Gatekeeper
from fission.server.grpc_messages import chunks_of
from fission.server.grpc_server import attach_grpc, serving
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import Calls, ServiceStarter, eventually, record_calls

MiB = 1024 * 1024
BUDGET_MB = 4096


@dataclass
class Harness:
    service: Service
    fission: pb_grpc.FissionStub
    sandboxes: pb_grpc.SandboxesStub
    key: str
    key_id: str
    slow_key: str


@pytest_asyncio.fixture(loop_scope="function")
async def service(start_service: ServiceStarter) -> Service:
    return await start_service(memory_budget_mb=BUDGET_MB)


@asynccontextmanager
async def harness(service: Service) -> AsyncIterator[Harness]:
    """A gRPC server over ``service`` on a Unix socket, with keys required."""
    directory = Path(tempfile.mkdtemp(prefix="fg-", dir="/tmp"))
    db = directory / "keys.sqlite3"
    with KeyStore(db) as store:
        main, key = store.create("main", KeyLimits(max_concurrent_sandboxes=3))
        _, slow_key = store.create("slow", KeyLimits(rate_per_minute=1))
    gate = Gatekeeper(db)
    address = f"unix:{directory}/g.sock"
    try:
        async with (
            serving(service, address, gate),
            grpc.aio.insecure_channel(address) as channel,
        ):
            yield Harness(
                service,
                pb_grpc.FissionStub(channel),
                pb_grpc.SandboxesStub(channel),
                key,
                main.id,
                slow_key,
            )
    finally:
        gate.close()
        shutil.rmtree(directory, ignore_errors=True)


async def bash_sandbox(h: Harness, fake_driver: FakeDriver) -> tuple[str, FakeVM]:
    """A running bash sandbox of the main key, and its fake VM."""
    created = await h.service.sandboxes.create(SandboxSpec(resolve_language("bash")), h.key_id)
    (vm,) = fake_driver.live
    return created.id, vm


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def code_of(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata())["fission-error-code"]


async def test_keys_are_checked_and_health_needs_none(service: Service) -> None:
    async with harness(service) as h:
        assert (await h.fission.Health(pb.HealthRequest())).ok
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.fission.Pools(pb.PoolsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            code_of(info.value) == "unauthorized" and "fission keys create" in info.value.details()
        )
        pools = await h.fission.Pools(pb.PoolsRequest(), metadata=(("x-api-key", h.key),))
        assert pools.memory_budget_mb == BUDGET_MB


async def test_a_key_over_its_rate_is_resource_exhausted_with_retry_after(
    service: Service,
) -> None:
    async with harness(service) as h:
        await h.fission.Pools(pb.PoolsRequest(), metadata=md(h.slow_key))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.fission.Pools(pb.PoolsRequest(), metadata=md(h.slow_key))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        metadata = dict(info.value.trailing_metadata())
        assert metadata["fission-error-code"] == "quota_exceeded"
        assert int(metadata["retry-after"]) >= 1


async def test_errors_become_statuses(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the core")

    monkeypatch.setattr(service.sandboxes, "list_sandboxes", broken)
    async with harness(service) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.Get(pb.GetSandboxRequest(sandbox_id="sbx_x"), metadata=md(h.key))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert code_of(info.value) == "sandbox_not_found"
        assert info.value.details() == (
            "no sandbox 'sbx_x': it was deleted, expired, or never existed"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.List(pb.ListSandboxesRequest(), metadata=md(h.key))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert code_of(info.value) == "internal" and "bug" not in info.value.details()


async def test_create_passes_the_keys_identity_and_quota(service: Service) -> None:
    calls: Calls = []
    record_calls(
        service.sandboxes,
        "create",
        calls,
        lambda spec, owner, limit: ("create", spec.language.name, owner, limit),
    )
    async with harness(service) as h:
        created = await h.sandboxes.Create(
            pb.CreateSandboxRequest(language="sh"), metadata=md(h.key)
        )
        assert created.id.startswith("sbx_") and created.language == "bash"
        assert calls == [("create", "bash", h.key_id, 3)]
        assert service.sandboxes.get(created.id, owner=h.key_id).spec.language.name == "bash"


async def test_exec_streams_output_then_the_result(
    service: Service, fake_driver: FakeDriver
) -> None:
    calls: Calls = []
    record_calls(
        service.sandboxes,
        "exec_command",
        calls,
        lambda sandbox_id, command, on_output, **kwargs: ("exec", sandbox_id, command, kwargs),
    )
    async with harness(service) as h:
        sandbox_id, vm = await bash_sandbox(h, fake_driver)
        # stdout, then (once it is surely sent) stderr, then exit 3
        argv = ["sh", "-c", "cat; sleep 0.2; printf err >&2; exit 3"]
        request = pb.ExecRequest(
            sandbox_id=sandbox_id, argv=pb.Argv(args=argv), env={"A": "1"}, cwd="/tmp", stdin=b"out"
        )
        events = [e async for e in h.sandboxes.Exec(request, metadata=md(h.key))]
        assert [(e.output.stream, e.output.data) for e in events[:2]] == [
            (pb.STREAM_STDOUT, b"out"),
            (pb.STREAM_STDERR, b"err"),
        ]
        assert events[2].result.exit_code == 3 and len(events) == 3
        ((_, called_id, command, kwargs),) = calls
        assert (called_id, command) == (sandbox_id, argv)
        assert kwargs == {
            "owner": h.key_id,
            "timeout": None,
            "env": {"A": "1"},
            "cwd": "/tmp",
            "stdin": b"out",
        }
        assert vm.guest is not None
        (sent,) = vm.guest.execs  # what reached the guest agent
        assert (sent["argv"], sent["env"]["A"], sent["cwd"]) == (argv, "1", "/tmp")


async def test_write_file_takes_a_header_then_data(
    service: Service, fake_driver: FakeDriver
) -> None:
    async with harness(service) as h:
        sandbox_id, vm = await bash_sandbox(h, fake_driver)

        async def upload() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id, path="d/f"))
            for part in (b"ab", b"", b"c" * MiB):
                yield pb.WriteFileRequest(data=part)

        info = await h.sandboxes.WriteFile(upload(), metadata=md(h.key))
        assert (info.name, info.path, info.size) == ("f", "d/f", MiB + 2)
        assert (vm.home / "d" / "f").read_bytes() == b"ab" + b"c" * MiB

        async def headless() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(data=b"x")

        async def with_mode() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id="s", path="f", mode=1))

        for bad in (headless, with_mode):
            with pytest.raises(grpc.aio.AioRpcError) as info_:
                await h.sandboxes.WriteFile(bad(), metadata=md(h.key))
            assert info_.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_chunks_are_cut_to_at_most_1_mib() -> None:
    pieces = [
        piece for chunk in (b"a" * (2 * MiB + MiB // 2), b"b" * 10) for piece in chunks_of(chunk)
    ]
    assert [len(piece) for piece in pieces] == [MiB, MiB, MiB // 2, 10]


async def test_read_file_sends_chunks_of_at_most_1_mib(
    service: Service, fake_driver: FakeDriver
) -> None:
    async with harness(service) as h:
        sandbox_id, vm = await bash_sandbox(h, fake_driver)
        content = b"a" * (2 * MiB + MiB // 2) + b"b" * 10
        (vm.home / "f").write_bytes(content)
        (vm.home / "a-directory").mkdir()
        request = pb.ReadFileRequest(sandbox_id=sandbox_id, path="f")
        chunks = [c.data async for c in h.sandboxes.ReadFile(request, metadata=md(h.key))]
        assert max(map(len, chunks)) <= MiB and b"".join(chunks) == content
        with pytest.raises(grpc.aio.AioRpcError) as info:
            request = pb.ReadFileRequest(sandbox_id=sandbox_id, path="a-directory")
            _ = [c async for c in h.sandboxes.ReadFile(request, metadata=md(h.key))]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cancelled_run_gives_its_machine_back(
    service: Service, fake_driver: FakeDriver
) -> None:
    code = "import sys, time\nsys.stdout.write('tick')\nsys.stdout.flush()\ntime.sleep(3600)"
    async with harness(service) as h:
        call = h.fission.Run(pb.RunRequest(code=code), metadata=md(h.key))
        first = await call.read()
        assert first.output.data == b"tick"
        assert service.budget.used_mb > 0 and len(fake_driver.live) == 1
        call.cancel()
        await fake_driver.wait_all_destroyed(10)
        await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")


async def test_attach_grpc_serves_inside_the_apps_lifespan(service: Service) -> None:
    started: list[str] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        started.append("service")
        yield
        started.append("closed")

    directory = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    socket = directory / "sub" / "g.sock"
    app = FastAPI(lifespan=lifespan)
    attach_grpc(app, service, f"unix:{socket}", None)
    try:
        async with app.router.lifespan_context(app):
            assert started == ["service"] and socket.exists()
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                pools = await pb_grpc.FissionStub(channel).Pools(pb.PoolsRequest())  # no key
                assert pools.memory_budget_mb == BUDGET_MB
        assert started == ["service", "closed"] and not socket.exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    with pytest.raises(InvalidInput, match="key"):
        attach_grpc(app, service, "127.0.0.1:1", None)


async def test_snapshot_fork_rewind_and_snapshot_listing(
    service: Service, fake_driver: FakeDriver
) -> None:
    async with harness(service) as h:
        sandbox_id, _vm = await bash_sandbox(h, fake_driver)
        shell = pb.ExecRequest(sandbox_id=sandbox_id, shell="echo a > f", checkpoint=True)
        events = [e async for e in h.sandboxes.Exec(shell, metadata=md(h.key))]
        checkpoint_id = events[-1].result.checkpoint_id
        assert checkpoint_id.startswith("snap_")
        request = pb.SnapshotSandboxRequest(sandbox_id=sandbox_id, name="n")
        snap = await h.sandboxes.Snapshot(request, metadata=md(h.key))
        assert (snap.name, snap.kind, snap.sandbox_id) == ("n", "snapshot", sandbox_id)
        forked = await h.sandboxes.Fork(
            pb.ForkSandboxRequest(sandbox_id=sandbox_id, n=1), metadata=md(h.key)
        )
        assert forked.snapshot.kind == "fork" and len(forked.sandboxes) == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.Fork(
                pb.ForkSandboxRequest(sandbox_id=sandbox_id, n=0), metadata=md(h.key)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        made = await h.sandboxes.Create(
            pb.CreateSandboxRequest(from_snapshot=snap.id), metadata=md(h.key)
        )
        assert made.language == "bash"
        rewind = pb.RewindSandboxRequest(sandbox_id=sandbox_id, checkpoint_id=checkpoint_id)
        assert (await h.sandboxes.Rewind(rewind, metadata=md(h.key))).id == sandbox_id
        listed = await h.sandboxes.ListSnapshots(pb.ListSnapshotsRequest(), metadata=md(h.key))
        assert {s.kind for s in listed.snapshots} == {"checkpoint", "snapshot", "fork"}
        got = await h.sandboxes.GetSnapshot(
            pb.GetSnapshotRequest(snapshot_id=snap.id), metadata=md(h.key)
        )
        assert got.id == snap.id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.DeleteSnapshot(
                pb.DeleteSnapshotRequest(snapshot_id=snap.id), metadata=md(h.key)
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await h.sandboxes.Delete(pb.DeleteSandboxRequest(sandbox_id=made.id), metadata=md(h.key))
        await h.sandboxes.DeleteSnapshot(
            pb.DeleteSnapshotRequest(snapshot_id=snap.id), metadata=md(h.key)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.GetSnapshot(
                pb.GetSnapshotRequest(snapshot_id=snap.id), metadata=md(h.key)
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert code_of(info.value) == "snapshot_not_found"
