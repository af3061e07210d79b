"""The daemon's gRPC API (grpc.aio): a thin adapter over ``Service`` and ``SandboxManager``.

The contract is ``fission/api/fission.proto`` (services ``Fission`` and ``Sandboxes``, the same
operations as the REST API). Every method admits its caller through the REST API's
``Gatekeeper`` (metadata ``authorization: Bearer <key>`` or ``x-api-key``; ``Health`` needs no
key), turns the request into the core's types (``grpc_messages``), calls the core and turns the
answer back; there is no logic here beyond that. A ``FissionError`` ends the call with the gRPC
status of its HTTP status, its message as details and its code slug in the trailing metadata
``fission-error-code``.

Streams (runs, commands, downloads) end when the client cancels: the work is cancelled and a
pooled machine goes back to the service. ``attach_grpc`` runs the server inside the REST app's
lifespan, in the same event loop: it starts after the service and stops (letting calls in flight
finish for ``STOP_GRACE`` seconds) before the service destroys its VMs, so SIGTERM stops both.
A process that also spawns QEMU must load gRPC with ``GRPC_ENABLE_FORK_SUPPORT=false`` (as
``daemon.serve`` does): gRPC's fork handlers crash a forked child now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI

from fission import __version__
from fission.agent.client import OutputSink
from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.auth.audit_log import LOCAL
from fission.core.sandbox_templates import create_from_template
from fission.core.sandboxes import SandboxManager
from fission.core.service import Service
from fission.core.spec import RunResult
from fission.errors import InvalidInput, NotReady
from fission.server.auth import Caller, Gatekeeper
from fission.server.grpc_calls import Adapter, streaming, unary
from fission.server.grpc_context import RequestContextInterceptor
from fission.server.grpc_messages import (
    DEFAULT_PAGE_SIZE,
    MiB,
    chunks_of,
    command_of,
    file_info_message,
    file_path,
    optional,
    output_event,
    pools_message,
    result_event,
    run_spec,
    sandbox_message,
    sandbox_spec,
    snapshot_message,
    state_filter,
)
from fission.server.grpc_ports import PortsServicer
from fission.server.metrics import ServiceMetrics

log = logging.getLogger("fission.grpc")


def checkpoint_args(request: Any, who: Caller) -> dict[str, Any]:
    """The keywords that ask for a checkpoint after a run or command (none unless asked)."""
    if not request.checkpoint:
        return {}
    return {"checkpoint": True, "max_snapshot_mb": who.max_snapshot_mb}


MAX_RECEIVE_BYTES = 40 * MiB  # a Run may carry 16 MiB of code and 16 MiB of stdin
MAX_SEND_BYTES = 4 * MiB  # answers are small, or chunks of at most 1 MiB
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.so_reuseport", 0),  # a second daemon on the port must fail, not share its calls
)
STOP_GRACE = 5.0  # seconds calls in flight may go on after shutdown begins

Work = Callable[[OutputSink], Awaitable[RunResult]]


async def run_events(work: Work) -> AsyncGenerator[pb.RunEvent, None]:
    """Run ``work``, yielding its output as it arrives, then its result (errors raise).

    Closing the generator early (the client went away) cancels the work and waits for it.
    """
    queue: asyncio.Queue[pb.RunEvent | None] = asyncio.Queue()

    async def execute() -> RunResult:
        try:
            return await work(lambda stream, data: queue.put_nowait(output_event(stream, data)))
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(execute())
    try:
        while (event := await queue.get()) is not None:
            yield event
        yield result_event(await task)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- servicers -------------------------------------------------------------------------------------
class FissionServicer(Adapter, pb_grpc.FissionServicer):
    """One-shot runs, health and pools over ``Service``."""

    def __init__(self, service: Service, gate: Gatekeeper) -> None:
        super().__init__(gate)
        self.service = service

    @streaming
    async def Run(
        self, request: pb.RunRequest, context: Any, who: Caller
    ) -> AsyncGenerator[pb.RunEvent, None]:
        spec = run_spec(request)
        lease = await self.service.acquire(spec)
        try:
            async for event in run_events(
                lambda sink: self.service.run(spec, sink, who=who.owner or LOCAL, lease=lease)
            ):
                yield event
        finally:
            self.service.dispose(lease)  # when the run never started; a no-op otherwise

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return pb.HealthResponse(ok=True, version=__version__)

    @unary
    async def Pools(self, request: pb.PoolsRequest, context: Any, who: Caller) -> pb.PoolsResponse:
        return pools_message(self.service.status())


class SandboxesServicer(Adapter, pb_grpc.SandboxesServicer):
    """Persistent sandboxes over ``SandboxManager``."""

    def __init__(self, manager: SandboxManager, gate: Gatekeeper) -> None:
        super().__init__(gate)
        self.manager = manager

    @unary
    async def Create(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        if request.HasField("from_snapshot"):
            record = await self.manager.snapshots.create_from(
                request.from_snapshot,
                who.owner,
                who.max_sandboxes,
                ttl=optional(request, "ttl"),
                metadata=dict(request.metadata),
            )
            return sandbox_message(record)
        spec = sandbox_spec(request)
        if request.HasField("template"):
            record = await create_from_template(
                self.manager, spec, request.template, who.owner, who.max_sandboxes
            )
            return sandbox_message(record)
        return sandbox_message(await self.manager.create(spec, who.owner, who.max_sandboxes))

    @unary
    async def Snapshot(self, request: Any, context: Any, who: Caller) -> pb.SnapshotInfo:
        record = await self.manager.snapshots.snapshot(
            request.sandbox_id,
            who.owner,
            optional(request, "name"),
            max_snapshot_mb=who.max_snapshot_mb,
        )
        return snapshot_message(record)

    @unary
    async def Fork(self, request: Any, context: Any, who: Caller) -> pb.ForkSandboxResponse:
        snapshot, clones = await self.manager.snapshots.fork(
            request.sandbox_id, request.n, who.owner, who.max_sandboxes, who.max_snapshot_mb
        )
        return pb.ForkSandboxResponse(
            snapshot=snapshot_message(snapshot), sandboxes=[sandbox_message(c) for c in clones]
        )

    @unary
    async def Rewind(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        record = await self.manager.snapshots.rewind(
            request.sandbox_id, request.checkpoint_id, who.owner
        )
        return sandbox_message(record)

    @unary
    async def ListSnapshots(
        self, request: Any, context: Any, who: Caller
    ) -> pb.ListSnapshotsResponse:
        snapshots = self.manager.snapshots
        records = snapshots.list_snapshots(
            who.owner, optional(request, "sandbox_id"), optional(request, "kind")
        )
        return pb.ListSnapshotsResponse(
            snapshots=[snapshot_message(r) for r in records],
            used_bytes=snapshots.store.used_bytes(who.owner),
        )

    @unary
    async def GetSnapshot(self, request: Any, context: Any, who: Caller) -> pb.SnapshotInfo:
        return snapshot_message(self.manager.snapshots.get(request.snapshot_id, who.owner))

    @unary
    async def DeleteSnapshot(
        self, request: Any, context: Any, who: Caller
    ) -> pb.DeleteSnapshotResponse:
        await self.manager.snapshots.delete(request.snapshot_id, who.owner)
        return pb.DeleteSnapshotResponse()

    @unary
    async def Get(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        return sandbox_message(self.manager.get(request.sandbox_id, who.owner))

    @unary
    async def List(self, request: Any, context: Any, who: Caller) -> pb.ListSandboxesResponse:
        records, cursor = self.manager.list_sandboxes(
            who.owner,
            state_filter(request.state),
            dict(request.metadata),
            request.page_size or DEFAULT_PAGE_SIZE,
            request.page_token or None,
        )
        return pb.ListSandboxesResponse(
            sandboxes=[sandbox_message(record) for record in records],
            next_page_token=cursor or "",
        )

    @unary
    async def SetTtl(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        return sandbox_message(self.manager.set_ttl(request.sandbox_id, request.ttl, who.owner))

    @unary
    async def Delete(self, request: Any, context: Any, who: Caller) -> pb.DeleteSandboxResponse:
        await self.manager.delete(request.sandbox_id, who.owner)
        return pb.DeleteSandboxResponse()

    @unary
    async def Pause(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        return sandbox_message(await self.manager.pause(request.sandbox_id, who.owner))

    @unary
    async def Resume(self, request: Any, context: Any, who: Caller) -> pb.Sandbox:
        return sandbox_message(await self.manager.resume(request.sandbox_id, who.owner))

    @streaming
    async def RunCode(
        self, request: Any, context: Any, who: Caller
    ) -> AsyncGenerator[pb.RunEvent, None]:
        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return self.manager.run_code(
                request.sandbox_id,
                request.code,
                owner=who.owner,
                timeout=optional(request, "timeout"),
                env=dict(request.env),
                context=optional(request, "context"),
                fresh_context=request.fresh_context,
                on_output=sink,
                **checkpoint_args(request, who),
            )

        async for event in run_events(work):
            yield event

    @streaming
    async def Exec(
        self, request: Any, context: Any, who: Caller
    ) -> AsyncGenerator[pb.RunEvent, None]:
        command = command_of(request)

        def work(sink: OutputSink) -> Awaitable[RunResult]:
            return self.manager.exec_command(
                request.sandbox_id,
                command,
                owner=who.owner,
                timeout=optional(request, "timeout"),
                env=dict(request.env),
                cwd=optional(request, "cwd"),
                stdin=optional(request, "stdin"),
                on_output=sink,
                **checkpoint_args(request, who),
            )

        async for event in run_events(work):
            yield event

    @unary
    async def WriteFile(self, requests: Any, context: Any, who: Caller) -> pb.FileInfo:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidInput("a WriteFile stream must begin with its header (sandbox_id, path)")
        header = first.header
        if header.HasField("mode"):
            raise InvalidInput("WriteFile does not support mode yet: leave it unset")

        async def data() -> AsyncIterator[bytes]:
            async for message in requests:
                if message.WhichOneof("part") != "data":
                    raise InvalidInput("only the first WriteFile message may be a header")
                yield message.data

        info = await self.manager.write_file(
            header.sandbox_id, file_path(header.path), data(), who.owner
        )
        return file_info_message(info)

    @streaming
    async def ReadFile(
        self, request: Any, context: Any, who: Caller
    ) -> AsyncGenerator[pb.FileChunk, None]:
        chunks = self.manager.read_file(request.sandbox_id, file_path(request.path), who.owner)
        try:
            async for chunk in chunks:
                for piece in chunks_of(chunk):
                    yield pb.FileChunk(data=piece)
        finally:
            await chunks.aclose()

    @streaming
    async def WatchFiles(
        self, request: Any, context: Any, who: Caller
    ) -> AsyncGenerator[pb.WatchEvent, None]:
        path = file_path(request.path or ".")
        stream = self.manager.watch_files(request.sandbox_id, path, request.recursive, who.owner)
        async with contextlib.aclosing(stream):
            async for batch in stream:
                if not batch:  # the first, empty batch: the watch is in place
                    yield pb.WatchEvent(type="ready", path=path)
                for event in batch:
                    yield pb.WatchEvent(type=event.type, path=event.path, to=event.to or "")

    @unary
    async def ListFiles(self, request: Any, context: Any, who: Caller) -> pb.ListFilesResponse:
        path = file_path(request.path or ".")
        entries = await self.manager.list_files(request.sandbox_id, path, who.owner)
        return pb.ListFilesResponse(entries=[file_info_message(entry) for entry in entries])

    @unary
    async def StatFile(self, request: Any, context: Any, who: Caller) -> pb.FileInfo:
        path = file_path(request.path)
        return file_info_message(await self.manager.stat_file(request.sandbox_id, path, who.owner))

    @unary
    async def MakeDir(self, request: Any, context: Any, who: Caller) -> pb.FileInfo:
        path = file_path(request.path)
        return file_info_message(await self.manager.make_dir(request.sandbox_id, path, who.owner))

    @unary
    async def RemoveFile(self, request: Any, context: Any, who: Caller) -> pb.RemoveFileResponse:
        path = file_path(request.path)
        await self.manager.remove_file(request.sandbox_id, path, request.recursive, who.owner)
        return pb.RemoveFileResponse()


# -- the server ------------------------------------------------------------------------------------
class GrpcServer:
    """A grpc.aio server with every service, listening on one address."""

    def __init__(
        self,
        service: Service,
        address: str,
        gate: Gatekeeper,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.address = address
        self.port = 0
        self._server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=[RequestContextInterceptor(metrics)]
        )
        pb_grpc.add_FissionServicer_to_server(FissionServicer(service, gate), self._server)
        pb_grpc.add_SandboxesServicer_to_server(
            SandboxesServicer(service.sandboxes, gate), self._server
        )
        pb_grpc.add_PortsServicer_to_server(PortsServicer(service.sandboxes, gate), self._server)

    async def start(self) -> None:
        """Bind and start serving; NotReady when the address cannot be bound."""
        try:
            self.port = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise NotReady(
                f"gRPC cannot listen on {self.address} ({exc}): is the port in use? "
                "choose another --grpc-port"
            ) from exc
        await self._server.start()
        log.info("gRPC listening on %s", self.address)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Refuse new calls, give calls in flight ``grace`` seconds, then cancel them."""
        await self._server.stop(grace)


@asynccontextmanager
async def serving(
    service: Service, address: str, gate: Gatekeeper, metrics: ServiceMetrics | None = None
) -> AsyncIterator[GrpcServer]:
    """A started GrpcServer for the duration of the block (a Unix socket is removed after)."""
    socket = Path(address.removeprefix("unix:")) if address.startswith("unix:") else None
    if socket is not None:
        socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)  # a dead daemon's socket; the caller holds the state lock
    server = GrpcServer(service, address, gate, metrics)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        if socket is not None:
            socket.unlink(missing_ok=True)


def attach_grpc(app: FastAPI, service: Service, address: str, keys_db: Path | None) -> None:
    """Serve gRPC on ``address`` from ``app``'s lifespan, between the service's start and close.

    A TCP address needs ``keys_db`` (every call needs a key); ``unix:PATH`` may run without. When
    the REST listener checks keys too, both share its gatekeeper, so a key has one rate limit.
    """
    if keys_db is None and not address.startswith("unix:"):
        raise InvalidInput(f"gRPC on {address} (TCP) needs an API key database")
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            rest_gate = getattr(app.state, "gate", None)
            shared = (
                rest_gate
                if keys_db is not None
                and isinstance(rest_gate, Gatekeeper)
                and rest_gate.keys is not None
                else None
            )
            gate = shared or Gatekeeper(keys_db, service.telemetry)
            metrics = getattr(app.state, "metrics", None)
            try:
                async with serving(service, address, gate, metrics):
                    yield state
            finally:
                if shared is None:
                    gate.close()

    app.router.lifespan_context = lifespan
