"""The host side of the agent protocol: one client per VM, treating every guest byte as hostile.

A frame larger than ``MAX_GUEST_PAYLOAD``, a frame of a type or request the host did not ask
for, bad JSON or an EXIT with fields of the wrong type raise ``AgentProtocolError``; the caller
then destroys the VM. The host also enforces the output cap itself, whatever the guest claims.
Runs, file operations (``host_files``) and context drops can be in flight at once: each has a
request id of its own, and ``channel.Channel`` routes the guest's frames to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fission.agent.channel import Channel
from fission.agent.file_ops import FileInfo, decode, guest_error
from fission.agent.file_watch import FileWatches, WatchEvent
from fission.agent.ingress import IngressTunnel
from fission.agent.tunnel_streams import HostTunnel, TunnelStream
from fission.errors import AgentProtocolError, InvalidInput
from fission.guest import context, protocol
from fission.guest.protocol import FrameType

__all__ = [
    "STDIN_CHUNK",
    "AgentClient",
    "ExecOutcome",
    "ExecRequest",
    "FileInfo",
    "OutputSink",
    "Stdin",
    "TraceSteps",
    "WatchEvent",
    "parse_exit",
    "parse_trace",
]

OutputSink = Callable[[str, bytes], None]
# A program's stdin: all of it at the start, or chunks that arrive while it runs (EOF when the
# iterable ends; the caller bounds how much it holds, the channel how fast it is sent).
Stdin = bytes | AsyncIterable[bytes]
# A guest's trace: (step, ms since the agent read the EXEC frame), in the order it sent them.
TraceSteps = tuple[tuple[str, float], ...]
STDIN_CHUNK = 64 * 1024
STREAM_NAMES = {FrameType.STDOUT: "stdout", FrameType.STDERR: "stderr"}
MAX_TRACE_STEPS = 32
MAX_TRACE_MS = 86_400_000.0  # a day in ms: no run (nor any step of one) takes longer
TRACE_STEP = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


@dataclass(frozen=True)
class ExecRequest:
    """What the agent is asked to run; see ``guest.Execution`` for how each field is used."""

    argv: list[str]
    env: dict[str, str]
    timeout: float
    memory_bytes: int
    pids_max: int
    output_limit: int
    cwd: str | None = None
    script: str | None = None
    script_name: str = "main"
    mode: str = "exec"
    stdin: bool = False
    # A Python code context: the script runs in that context's long-lived interpreter, whose
    # globals survive between runs; ``fresh_context`` discards the old one first.
    context: str | None = None
    fresh_context: bool = False
    # The VM is destroyed after this run (one-shot): the agent prepares no warm process for
    # a next one. Otherwise it does, at idle priority, so a sandbox's next run finds them.
    last_run: bool = False
    # Ask the agent for its per-step times in the EXIT frame (``ExecOutcome.trace``).
    trace: bool = False


@dataclass(frozen=True)
class ExecOutcome:
    """How a program ended, as reported by the agent (or by the host's own deadline)."""

    exit_code: int
    signal: int
    timed_out: bool
    oom: bool
    output_truncated: bool
    duration_ms: float
    # The run's context lost its state: its interpreter died in this run (timeout, OOM, exit)
    # or in an earlier one, so this run started afresh.
    context_reset: bool = False
    # A pre-started interpreter served the run (a fork-server child or a live context).
    warm: bool = False
    # The guest's per-step times when the request asked for them (and they were well formed).
    trace: TraceSteps = ()


def parse_trace(value: object) -> TraceSteps:
    """A guest's per-step trace if well formed, else empty: a bad trace never fails a run.

    Well formed: at most ``MAX_TRACE_STEPS`` pairs ``[name, ms]``, each name lower-case
    letters, digits and ``_`` (32 at most), each ms a finite number within a day either way
    (steps that prepared the run's process ahead of time are negative).
    """
    if not isinstance(value, list) or len(value) > MAX_TRACE_STEPS:
        return ()
    steps = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            return ()
        name, ms = item
        if not isinstance(name, str) or not TRACE_STEP.match(name):
            return ()
        # Compared, not converted: NaN and infinities fail it, a huge int cannot overflow.
        if type(ms) not in (int, float) or not abs(ms) <= MAX_TRACE_MS:
            return ()
        steps.append((name, float(ms)))
    return tuple(steps)


def parse_exit(message: dict[str, Any]) -> ExecOutcome:
    """Validate an EXIT frame's fields; anything malformed is an AgentProtocolError."""
    try:
        exit_code, sig = message["exit_code"], message["signal"]
        flags = [message[name] for name in ("timed_out", "oom", "output_truncated")]
        duration = message["duration_ms"]
    except KeyError as exc:
        raise AgentProtocolError(f"EXIT frame lacks {exc.args[0]!r}") from exc
    if type(exit_code) is not int or not 0 <= exit_code <= 255:
        raise AgentProtocolError(f"EXIT frame has a bad exit_code {exit_code!r}")
    if type(sig) is not int or not 0 <= sig <= 128:
        raise AgentProtocolError(f"EXIT frame has a bad signal {sig!r}")
    if not all(type(flag) is bool for flag in flags):
        raise AgentProtocolError("EXIT frame flags must be booleans")
    # Compared, not converted: a huge int from the guest would overflow float().
    if type(duration) not in (int, float) or not 0 <= duration <= MAX_TRACE_MS:
        raise AgentProtocolError(f"EXIT frame has a bad duration_ms {duration!r}")
    extras = [message.get(name, False) for name in ("context_reset", "warm")]
    if not all(type(flag) is bool for flag in extras):
        raise AgentProtocolError("EXIT frame flags must be booleans")
    return ExecOutcome(
        exit_code,
        sig,
        flags[0],
        flags[1],
        flags[2],
        float(duration),
        extras[0],
        extras[1],
        parse_trace(message.get("trace")),
    )


REATTACH_IDS = 1 << 30


def init_frame(restored: bool = True) -> bytes:
    """INIT: the host's wall clock now and a fresh random seed for the guest's kernel.

    ``restored``: the VM has just started, maybe from a saved state other clones share, so
    processes prepared before must reseed; False for a VM that was only stopped (``resync``).
    """
    init = {"time_ns": time.time_ns(), "seed": secrets.token_hex(64), "restored": restored}
    return protocol.encode_json(FrameType.INIT, 0, init)


def check_context(context_id: str | None) -> None:
    """Refuse a malformed context id before it reaches the guest."""
    if context_id is not None:
        try:
            context.check_context_id(context_id)
        except protocol.AgentError as exc:
            raise InvalidInput(exc.message) from exc


class AgentClient(FileWatches):
    """Speaks the framed protocol to one guest agent over a byte stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._channel = Channel(reader, writer)
        self._next_request = 1
        self.hello: dict[str, Any] = {}

    async def _send(self, data: bytes) -> None:
        await self._channel.send(data)

    async def handshake(self, timeout: float) -> dict[str, Any]:
        """Send INIT (wall clock and a fresh random seed) and wait for the agent's HELLO."""
        await self._send(init_frame())
        async with asyncio.timeout(timeout):
            frame = await self._channel.read_frame()
        if frame.type != FrameType.HELLO:
            raise AgentProtocolError(f"expected HELLO from the guest, got {frame.type.name}")
        hello = self._decode(frame)
        version = hello.get("protocol")
        if type(version) is not int or version != protocol.PROTOCOL_VERSION:
            raise AgentProtocolError(
                f"guest agent speaks protocol {hello.get('protocol')!r}, "
                f"host speaks {protocol.PROTOCOL_VERSION}: rebuild images"
            )
        self.hello = hello
        return hello

    async def reattach(self, timeout: float, stray_frames: int = 1000) -> dict[str, Any]:
        """The handshake on a running guest's agent that another host process talked to:
        INIT (clock only, no reseed) and its HELLO. Frames of that process's requests still
        in the channel are skipped (at most ``stray_frames``). Timeout in s."""
        # Request ids of its own start far from the earlier process's, whose runs may still
        # be ending in the guest (their frames are dropped there, but their ids stay taken).
        self._next_request = REATTACH_IDS + secrets.randbelow(REATTACH_IDS)
        await self._send(init_frame(restored=False))
        async with asyncio.timeout(timeout):
            for _ in range(stray_frames):
                frame = await self._channel.read_frame()
                if frame.type == FrameType.HELLO:
                    self.hello = self._decode(frame)
                    return self.hello
        raise AgentProtocolError("the guest agent sent no HELLO after a re-attach")

    @staticmethod
    def _decode(frame: protocol.Frame) -> dict[str, Any]:
        return decode(frame)

    async def exec(
        self,
        request: ExecRequest,
        on_output: OutputSink,
        stdin: Stdin | None = None,
        *,
        marks: dict[str, float] | None = None,
    ) -> ExecOutcome:
        """Run ``request`` and stream its output to ``on_output`` until the agent's EXIT.

        The caller bounds the wait (the host-side deadline) and destroys the VM when it passes.
        InvalidInput when the agent refuses the request (e.g. a context for another language).
        ``marks`` gets the ``time.monotonic()`` of ``exec_sent`` and ``exit_read``.
        """
        check_context(request.context)
        feeder = None
        async with self._request() as pending:
            try:
                message = asdict(request) | {"stdin": stdin is not None}
                await self._send(protocol.encode_json(FrameType.EXEC, pending.id, message))
                if marks is not None:
                    marks["exec_sent"] = time.monotonic()
                if stdin is not None:
                    feeder = asyncio.create_task(self._feed_stdin(pending.id, stdin))
                outcome = await self._collect(pending.id, request.output_limit, on_output)
                if marks is not None:
                    marks["exit_read"] = time.monotonic()
                pending.finished = True
                return outcome
            finally:
                if feeder is not None:
                    feeder.cancel()

    async def _feed_stdin(self, request_id: int, stdin: Stdin) -> None:
        if isinstance(stdin, bytes):
            await self._send_stdin(request_id, stdin)
        else:
            async for chunk in stdin:
                if chunk:  # an empty STDIN frame is the EOF: it goes only at the end
                    await self._send_stdin(request_id, chunk)
        await self._send(protocol.encode(FrameType.STDIN, request_id, b""))

    async def _send_stdin(self, request_id: int, data: bytes) -> None:
        for start in range(0, len(data), STDIN_CHUNK):
            await self._send(
                protocol.encode(FrameType.STDIN, request_id, data[start : start + STDIN_CHUNK])
            )

    async def _collect(
        self, request_id: int, output_limit: int, on_output: OutputSink
    ) -> ExecOutcome:
        received = 0
        host_truncated = False
        while True:
            frame = await self._channel.next(request_id)
            if frame.type in STREAM_NAMES:
                room = output_limit - received
                data = frame.payload[: max(room, 0)]
                if len(data) < len(frame.payload):
                    host_truncated = True
                if data:
                    received += len(data)
                    on_output(STREAM_NAMES[frame.type], data)
            elif frame.type == FrameType.EXIT:
                outcome = parse_exit(self._decode(frame))
                if host_truncated and not outcome.output_truncated:
                    outcome = dataclasses.replace(outcome, output_truncated=True)
                return outcome
            elif frame.type == FrameType.ERROR:
                raise guest_error(self._decode(frame), "run the program")
            else:
                raise AgentProtocolError(f"unexpected {frame.type.name} frame during a run")

    async def drop_context(self, context_id: str, *, timeout: float) -> bool:
        """End a code context and its interpreter; False if there was none. Timeout in s."""
        check_context(context_id)
        what = f"drop context {context_id!r}"
        answer = await self._simple(FrameType.DROP, {"context": context_id}, what, timeout)
        dropped = answer.get("dropped")
        if type(dropped) is not bool:
            raise AgentProtocolError(f"the guest answered a context drop with {answer!r:.80}")
        return dropped

    async def resync(self, timeout: float) -> None:
        """Send INIT again once the handshake is done: the guest's wall clock stood still while
        its vCPUs were stopped (QMP ``stop``), and it gets a fresh seed too. Timeout in s."""
        self._channel.open(0)
        try:
            await self._send(init_frame(restored=False))
            async with asyncio.timeout(timeout):
                frame = await self._channel.next(0)
            if frame.type != FrameType.HELLO:
                raise AgentProtocolError(f"expected HELLO from the guest, got {frame.type.name}")
        except AgentProtocolError as exc:
            self._channel.fail(exc)
            raise
        finally:
            self._channel.close(0)

    async def prepare_snapshot(self, timeout: float) -> bool:
        """Ask the agent to get ready for a snapshot; True if its fork server is warm."""
        self._channel.open(0)
        try:
            await self._send(protocol.encode_json(FrameType.PREPARE, 0, {}))
            async with asyncio.timeout(timeout):
                frame = await self._channel.next(0)
            if frame.type != FrameType.READY:
                raise AgentProtocolError(f"expected READY from the guest, got {frame.type.name}")
            return bool(self._decode(frame).get("zygote"))
        except AgentProtocolError as exc:
            self._channel.fail(exc)
            raise
        finally:
            self._channel.close(0)

    def open_tunnel(
        self, handler: Callable[[TunnelStream], Awaitable[None]], max_streams: int
    ) -> HostTunnel:
        """Serve the guest's egress streams with ``handler`` (``tunnel_streams``)."""
        tunnel = HostTunnel(self._channel, handler, max_streams)
        tunnel.start()
        return tunnel

    def open_ingress(self, max_streams: int) -> IngressTunnel:
        """Streams the host opens into the guest: exposed ports and terminals (``ingress``)."""
        ingress = IngressTunnel(self._channel, max_streams)
        ingress.start()
        return ingress

    async def listen(self, port: int, *, timeout: float) -> None:
        """Ask the agent to open the egress proxy port inside the guest; timeout in seconds."""
        answer = await self._simple(
            FrameType.LISTEN, {"port": port}, "open the proxy port", timeout
        )
        if answer.get("listening") is not True:
            raise AgentProtocolError(f"the guest answered LISTEN with {answer!r:.80}")

    async def kill(self, request_id: int) -> None:
        """Ask the agent to kill a running request's processes."""
        await self._send(protocol.encode_json(FrameType.KILL, request_id, {}))

    async def close(self) -> None:
        """Close the channel (the VM itself is the caller's to destroy)."""
        await self._channel.aclose()
