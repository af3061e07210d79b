"""The gRPC servicers in process, over a fake core: auth, statuses, streams, files (no VM)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi import FastAPI

from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.auth.keys import KeyLimits, KeyStore
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec
from fission.core.service import Lease
from fission.core.spec import RunResult
from fission.errors import InvalidInput, SandboxNotFound
from fission.server.auth import Gatekeeper
from fission.server.grpc_server import attach_grpc, serving

MiB = 1024 * 1024
RESULT = RunResult(3, b"", b"", False, False, False, 0, 5.0, 0.0, 6.0)


class FakeManager:
    """Stands in for SandboxManager: records calls, answers from fixed data."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.written: list[bytes] = []

    async def create(self, spec: SandboxSpec, owner: str | None, limit: int | None) -> Any:
        self.calls.append(("create", spec.language.name, owner, limit))
        return SandboxRecord("sbx_00000000000000aa", spec, owner, 1.0, 301.0)

    def get(self, sandbox_id: str, owner: str | None = None) -> Any:
        raise SandboxNotFound(f"no sandbox {sandbox_id!r}: it was deleted")

    def list_sandboxes(self, *args: Any) -> Any:
        raise RuntimeError("a bug in the core")

    async def exec_command(self, sandbox_id: str, command: Any, **kwargs: Any) -> RunResult:
        sink = kwargs.pop("on_output")
        self.calls.append(("exec", sandbox_id, command, kwargs))
        sink("stdout", b"out")
        sink("stderr", b"err")
        return RESULT

    async def write_file(self, sandbox_id: str, path: str, data: Any, owner: Any) -> Any:
        async for chunk in data:
            self.written.append(chunk)
        return {"name": path.rsplit("/", 1)[-1], "path": path, "size": sum(map(len, self.written))}

    async def read_file(self, sandbox_id: str, path: str, owner: Any) -> AsyncIterator[bytes]:
        if path == "missing":
            raise InvalidInput("no such file")
        yield b"a" * (2 * MiB + MiB // 2)
        yield b"b" * 10


class FakeService:
    """Stands in for Service: one-shot runs that print, then hang until cancelled."""

    def __init__(self) -> None:
        self.sandboxes = FakeManager()
        self.released = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, Any]:
        return {"pools": [], "memory_budget_mb": 1024, "memory_reserved_mb": 0,
                "reconciled": {}, "sandboxes": 0}

    async def acquire(self, spec: Any) -> Any:
        async def release() -> None:
            self.released.set()

        return Lease(object(), release)  # type: ignore[arg-type]

    async def run(self, spec: Any, sink: Any, *, who: str, lease: Lease) -> RunResult:
        try:
            sink("stdout", b"tick")
            await asyncio.sleep(3600)
            return RESULT
        finally:
            self.dispose(lease)

    def dispose(self, lease: Lease) -> None:
        if not lease.disposed:
            lease.disposed = True
            task = asyncio.create_task(lease.release())
            self.tasks.add(task)


@dataclass
class Harness:
    service: FakeService
    fission: pb_grpc.FissionStub
    sandboxes: pb_grpc.SandboxesStub
    key: str
    key_id: str
    slow_key: str


@asynccontextmanager
async def harness() -> AsyncIterator[Harness]:
    """A gRPC server over a fake service on a Unix socket, with keys required."""
    directory = Path(tempfile.mkdtemp(prefix="fg-", dir="/tmp"))
    db = directory / "keys.sqlite3"
    with KeyStore(db) as store:
        record, key = store.create("main", KeyLimits(max_concurrent_sandboxes=3))
        _, slow_key = store.create("slow", KeyLimits(rate_per_minute=1))
    gate = Gatekeeper(db)
    service = FakeService()
    address = f"unix:{directory}/g.sock"
    try:
        async with (
            serving(service, address, gate),  # type: ignore[arg-type]
            grpc.aio.insecure_channel(address) as channel,
        ):
            yield Harness(service, pb_grpc.FissionStub(channel), pb_grpc.SandboxesStub(channel),
                          key, record.id, slow_key)
    finally:
        gate.close()
        shutil.rmtree(directory, ignore_errors=True)


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def code_of(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata())["fission-error-code"]


async def test_keys_are_checked_and_health_needs_none() -> None:
    async with harness() as h:
        assert (await h.fission.Health(pb.HealthRequest())).ok
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.fission.Pools(pb.PoolsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(info.value) == "unauthorized" and "fission keys create" in info.value.details()
        pools = await h.fission.Pools(pb.PoolsRequest(), metadata=(("x-api-key", h.key),))
        assert pools.memory_budget_mb == 1024


async def test_a_key_over_its_rate_is_resource_exhausted_with_retry_after() -> None:
    async with harness() as h:
        await h.fission.Pools(pb.PoolsRequest(), metadata=md(h.slow_key))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.fission.Pools(pb.PoolsRequest(), metadata=md(h.slow_key))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        metadata = dict(info.value.trailing_metadata())
        assert metadata["fission-error-code"] == "quota_exceeded"
        assert int(metadata["retry-after"]) >= 1


async def test_errors_become_statuses() -> None:
    async with harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.Get(pb.GetSandboxRequest(sandbox_id="sbx_x"), metadata=md(h.key))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert code_of(info.value) == "sandbox_not_found"
        assert info.value.details() == "no sandbox 'sbx_x': it was deleted"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.sandboxes.List(pb.ListSandboxesRequest(), metadata=md(h.key))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert code_of(info.value) == "internal" and "bug" not in info.value.details()


async def test_create_passes_the_keys_identity_and_quota() -> None:
    async with harness() as h:
        created = await h.sandboxes.Create(pb.CreateSandboxRequest(language="sh"),
                                           metadata=md(h.key))
        assert created.id == "sbx_00000000000000aa" and created.language == "bash"
        assert h.service.sandboxes.calls == [("create", "bash", h.key_id, 3)]


async def test_exec_streams_output_then_the_result() -> None:
    async with harness() as h:
        request = pb.ExecRequest(sandbox_id="sbx_1", argv=pb.Argv(args=["cat"]), env={"A": "1"},
                                 cwd="/tmp", stdin=b"in")
        events = [e async for e in h.sandboxes.Exec(request, metadata=md(h.key))]
        assert [(e.output.stream, e.output.data) for e in events[:2]] == [
            (pb.STREAM_STDOUT, b"out"), (pb.STREAM_STDERR, b"err")]
        assert events[2].result.exit_code == 3 and len(events) == 3
        (_, sandbox_id, command, kwargs), = h.service.sandboxes.calls
        assert (sandbox_id, command) == ("sbx_1", ["cat"])
        assert kwargs == {"owner": h.key_id, "timeout": None, "env": {"A": "1"}, "cwd": "/tmp",
                          "stdin": b"in"}


async def test_write_file_takes_a_header_then_data() -> None:
    async with harness() as h:
        async def upload() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id="sbx_1", path="d/f"))
            for part in (b"ab", b"", b"c" * MiB):
                yield pb.WriteFileRequest(data=part)

        info = await h.sandboxes.WriteFile(upload(), metadata=md(h.key))
        assert (info.name, info.path, info.size) == ("f", "d/f", MiB + 2)
        assert b"".join(h.service.sandboxes.written) == b"ab" + b"c" * MiB

        async def headless() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(data=b"x")

        async def with_mode() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id="s", path="f", mode=1))

        for bad in (headless, with_mode):
            with pytest.raises(grpc.aio.AioRpcError) as info_:
                await h.sandboxes.WriteFile(bad(), metadata=md(h.key))
            assert info_.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_read_file_sends_chunks_of_at_most_1_mib() -> None:
    async with harness() as h:
        request = pb.ReadFileRequest(sandbox_id="sbx_1", path="f")
        sizes = [len(c.data) async for c in h.sandboxes.ReadFile(request, metadata=md(h.key))]
        assert sizes == [MiB, MiB, MiB // 2, 10]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            request = pb.ReadFileRequest(sandbox_id="sbx_1", path="missing")
            _ = [c async for c in h.sandboxes.ReadFile(request, metadata=md(h.key))]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cancelled_run_gives_its_machine_back() -> None:
    async with harness() as h:
        call = h.fission.Run(pb.RunRequest(code="x"), metadata=md(h.key))
        first = await call.read()
        assert first.output.data == b"tick"
        call.cancel()
        await asyncio.wait_for(h.service.released.wait(), timeout=10)


async def test_attach_grpc_serves_inside_the_apps_lifespan() -> None:
    started: list[str] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        started.append("service")
        yield
        started.append("closed")

    directory = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    socket = directory / "sub" / "g.sock"
    app = FastAPI(lifespan=lifespan)
    service = FakeService()
    attach_grpc(app, service, f"unix:{socket}", None)  # type: ignore[arg-type]
    try:
        async with app.router.lifespan_context(app):
            assert started == ["service"] and socket.exists()
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                pools = await pb_grpc.FissionStub(channel).Pools(pb.PoolsRequest())  # no key
                assert pools.memory_budget_mb == 1024
        assert started == ["service", "closed"] and not socket.exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    with pytest.raises(InvalidInput, match="key"):
        attach_grpc(app, service, "127.0.0.1:1", None)  # type: ignore[arg-type]

