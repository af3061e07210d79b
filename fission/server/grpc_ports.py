"""The gRPC ``Ports`` service: exposed ports, their tokens, and terminals (a bidi stream).

The same operations as the REST routes (``ports_api``, ``pty_api``) over the same
``SandboxPorts``; the proxying of an exposed port stays on the daemon's HTTP address. ``Pty``:
the client's first message names the sandbox and size, then carries keystrokes and resizes;
the answer is the terminal's output, then ``exit`` with the shell's code. Closing the call hangs
the terminal up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from fission.agent.ingress import IngressTunnel
from fission.agent.tunnel_streams import TunnelStream
from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.core.sandbox_ports import DEFAULT_SHELL_SIZE, check_size
from fission.core.sandboxes import SandboxManager
from fission.errors import FissionError, InvalidInput
from fission.server.auth import Caller, Gatekeeper
from fission.server.grpc_calls import Adapter, abort, log, unary


def exposed_message(exposure: dict[str, Any]) -> pb.ExposedPort:
    """An exposed port's JSON as its message."""
    return pb.ExposedPort(
        sandbox_id=exposure["sandbox_id"],
        port=exposure["port"],
        path=exposure["path"],
        token_ids=exposure["tokens"],
        streams=exposure["streams"],
    )


def start_size(start: pb.PtyStart) -> tuple[int, int]:
    """The size a PtyStart asks for (0 means the default)."""
    return check_size(start.cols or DEFAULT_SHELL_SIZE[0], start.rows or DEFAULT_SHELL_SIZE[1])


async def feed_terminal(
    requests: AsyncIterator[pb.PtyInput], stream: TunnelStream, ingress: IngressTunnel
) -> None:
    """Pass the client's keystrokes and resizes on until it stops sending."""
    async for message in requests:
        part = message.WhichOneof("part")
        if part == "data":
            await stream.write(message.data)
        elif part == "resize":
            cols, rows = check_size(message.resize.cols, message.resize.rows)
            await ingress.resize(stream, cols, rows)
        else:
            raise InvalidInput("only the first Pty message may be `start`")


class PortsServicer(Adapter, pb_grpc.PortsServicer):
    """Exposed ports and terminals over ``SandboxManager.ports``."""

    def __init__(self, manager: SandboxManager, gate: Gatekeeper) -> None:
        super().__init__(gate)
        self.ports = manager.ports

    @unary
    async def Expose(self, request: Any, context: Any, who: Caller) -> pb.ExposedPort:
        return exposed_message(self.ports.expose(request.sandbox_id, request.port, who.owner))

    @unary
    async def Unexpose(self, request: Any, context: Any, who: Caller) -> pb.UnexposePortResponse:
        await self.ports.unexpose(request.sandbox_id, request.port, who.owner)
        return pb.UnexposePortResponse()

    @unary
    async def ListPorts(self, request: Any, context: Any, who: Caller) -> pb.ListPortsResponse:
        found = self.ports.list_ports(request.sandbox_id, who.owner)
        return pb.ListPortsResponse(ports=[exposed_message(item) for item in found])

    @unary
    async def MintPortToken(self, request: Any, context: Any, who: Caller) -> pb.PortToken:
        minted = self.ports.mint_token(request.sandbox_id, request.port, who.owner)
        return pb.PortToken(
            token_id=minted["token_id"],
            token=minted["token"],
            port=minted["port"],
            path=minted["path"],
        )

    @unary
    async def RevokePortToken(
        self, request: Any, context: Any, who: Caller
    ) -> pb.RevokePortTokenResponse:
        await self.ports.revoke_token(request.sandbox_id, request.port, request.token_id, who.owner)
        return pb.RevokePortTokenResponse()

    async def Pty(
        self, requests: AsyncIterator[pb.PtyInput], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.PtyOutput, None]:
        """A shell on a new terminal (see the module's docstring)."""
        try:
            who = await self.admit(context)
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("part") != "start":
                raise InvalidInput("a Pty stream must begin with `start` (sandbox_id, cols, rows)")
            cols, rows = start_size(first.start)
            sandbox_id = first.start.sandbox_id
            async with self.ports.open_pty(sandbox_id, who.owner, cols, rows) as opened:
                async for output in self._relay(requests, *opened):
                    yield output
        except FissionError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("gRPC Pty failed")
            await abort(context, FissionError(f"internal error ({type(exc).__name__})"))

    async def _relay(
        self, requests: AsyncIterator[pb.PtyInput], stream: TunnelStream, ingress: IngressTunnel
    ) -> AsyncGenerator[pb.PtyOutput, None]:
        feeder = asyncio.create_task(feed_terminal(requests, stream, ingress))
        reading: asyncio.Task[bytes] | None = None
        try:
            while True:
                reading = asyncio.create_task(stream.read())
                waiting: set[asyncio.Task[Any]] = {reading} if feeder.done() else {reading, feeder}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                    raise feeder.exception()  # type: ignore[misc]  # bad input: the call ends
                data = await reading
                if not data:
                    break
                yield pb.PtyOutput(data=data)
            code = stream.exit_code
            ended = pb.PtyExit() if code is None else pb.PtyExit(exit_code=code)
            yield pb.PtyOutput(exit=ended)
        finally:
            for task in (feeder, reading):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
