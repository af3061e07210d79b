"""The host side of the agent's file operations: FileInfo, answer checks and the client methods.

Paths are pre-checked here with the guest's own rules (``files.split_path``), so an obviously
bad path fails without a round trip; the guest checks again and is the authority. Every guest
answer is hostile until checked: a malformed FileInfo, a DATA frame where none belongs, a read
whose length does not match what arrived, or more than ``MAX_ENTRIES`` listed entries is an
``AgentProtocolError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fission.agent.channel import Channel
from fission.errors import (
    AgentProtocolError,
    FileNotFound,
    FissionError,
    InvalidInput,
    PathNotAllowed,
    VMError,
)
from fission.guest import files, protocol
from fission.guest.protocol import FrameType

KINDS = ("file", "dir", "symlink", "other")
MAX_NAME = 1024  # characters; a guest file name is at most 255 bytes
GUEST_ERRORS: dict[str, type[FissionError]] = {
    protocol.PATH_NOT_ALLOWED: PathNotAllowed,
    protocol.FILE_NOT_FOUND: FileNotFound,
    protocol.INVALID_INPUT: InvalidInput,
}
FileData = bytes | bytearray | memoryview | AsyncIterable[bytes]


@dataclass(frozen=True)
class FileInfo:
    """One file in the sandbox; ``path`` is relative to /home/sandbox or absolute elsewhere."""

    path: str
    name: str
    kind: str  # "file", "dir", "symlink" or "other"
    size: int  # bytes
    mode: int  # permission bits, e.g. 0o644
    mtime: float  # seconds since the epoch


def guest_error(message: dict[str, Any], doing: str) -> FissionError:
    """The error an ERROR frame's ``{code, message}`` stands for (VMError for unknown codes)."""
    text = str(message.get("message", "no detail"))[:2000]
    code = message.get("code")
    cls = GUEST_ERRORS.get(code) if isinstance(code, str) else None
    if cls is not None:
        return cls(text)
    return VMError(f"the guest agent could not {doing}: {text}")


def decode(frame: protocol.Frame) -> dict[str, Any]:
    """A control frame's JSON object; anything else is an AgentProtocolError."""
    try:
        return protocol.decode_json(frame.payload)
    except protocol.ProtocolError as exc:
        raise AgentProtocolError(f"bad {frame.type.name} frame from the guest: {exc}") from exc


def display_path(path: object) -> str:
    """The path as FileInfo shows it; InvalidInput or PathNotAllowed for a refused path."""
    if isinstance(path, str):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"the path {path!r} is not valid UTF-8 text") from exc
    try:
        return files.display_path(*files.split_path(path))
    except protocol.AgentError as exc:
        raise guest_error({"code": exc.code, "message": exc.message}, "check the path") from exc


def parse_file_info(message: object, path: str) -> FileInfo:
    """Check one info object from the guest; ``path`` is where the host says it lives."""
    if not isinstance(message, dict):
        raise AgentProtocolError("the guest sent a file info that is not an object")
    name, kind = message.get("name"), message.get("kind")
    size, mode, mtime = message.get("size"), message.get("mode"), message.get("mtime")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in (".", ".."):
        raise AgentProtocolError(f"the guest sent a bad file name {name!r:.80}")
    if "/" in name or "\0" in name:
        raise AgentProtocolError(f"the guest sent a file name with '/' or NUL: {name!r:.80}")
    if kind not in KINDS:
        raise AgentProtocolError(f"the guest sent a bad file kind {kind!r:.40}")
    if type(size) is not int or size < 0:
        raise AgentProtocolError(f"the guest sent a bad file size {size!r:.40}")
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise AgentProtocolError(f"the guest sent a bad file mode {mode!r:.40}")
    if not isinstance(mtime, int | float) or type(mtime) is bool or not math.isfinite(mtime):
        raise AgentProtocolError(f"the guest sent a bad mtime {mtime!r:.40}")
    return FileInfo(path, name, kind, size, mode, float(mtime))


def child_path(directory: str, name: str) -> str:
    """``name`` inside ``directory`` as FileInfo shows it."""
    return name if directory == "." else f"{directory.rstrip('/')}/{name}"


async def chunks(data: FileData) -> AsyncIterator[bytes]:
    """``data`` in pieces of at most FILE_CHUNK bytes."""
    size = protocol.FILE_CHUNK
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])
        return
    async for piece in data:
        if not isinstance(piece, bytes | bytearray | memoryview):
            raise InvalidInput(f"write_file data yielded {type(piece).__name__}, not bytes")
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


class Pending:
    """One request in flight: its id, and whether the guest has said its last word on it."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.finished = False


class FileOperations:
    """File methods of the agent client; each request has its own id and deadline."""

    _channel: Channel
    _next_request: int

    @contextlib.asynccontextmanager
    async def _request(self) -> AsyncIterator[Pending]:
        """A fresh request id, routed while the block runs.

        A request given up before its last frame is killed in the guest and the rest of its
        frames dropped; an AgentProtocolError breaks the channel for every later call.
        """
        pending = Pending(self._next_request)
        self._next_request += 1
        self._channel.open(pending.id)
        try:
            yield pending
        except AgentProtocolError as exc:
            self._channel.fail(exc)
            raise
        finally:
            self._channel.close(pending.id, abandoned=not pending.finished)
            if not pending.finished and self._channel.failure is None:
                with contextlib.suppress(VMError):
                    await self._channel.send(protocol.encode_json(FrameType.KILL, pending.id, {}))

    async def _next(self, request_id: int, deadline: float, what: str, timeout: float) -> Any:
        """The request's next frame, or VMError once ``deadline`` (loop time) has passed."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._channel.next(request_id)
        except TimeoutError as exc:
            raise VMError(
                f"the guest agent did not finish {what} within {timeout:g} s "
                "(raise the call's timeout)"
            ) from exc

    async def _simple(
        self, kind: FrameType, message: dict[str, Any], what: str, timeout: float
    ) -> dict[str, Any]:
        """Send one FILE or DROP request and return its single RESULT."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with self._request() as pending:
            await self._channel.send(protocol.encode_json(kind, pending.id, message))
            frame = await self._next(pending.id, deadline, what, timeout)
            pending.finished = True
            return self._result(frame, what)

    @staticmethod
    def _result(frame: protocol.Frame, what: str) -> dict[str, Any]:
        """A RESULT's object; an ERROR raises its error; any other frame is hostile."""
        if frame.type == FrameType.RESULT:
            return decode(frame)
        if frame.type == FrameType.ERROR:
            raise guest_error(decode(frame), what)
        raise AgentProtocolError(f"unexpected {frame.type.name} frame answering {what}")

    async def stat_file(self, path: str, *, timeout: float) -> FileInfo:
        """Info on ``path`` itself (a symlink is reported, not followed); timeout in seconds."""
        shown = display_path(path)
        message = {"op": "stat", "path": path}
        answer = await self._simple(FrameType.FILE, message, f"stat {path!r}", timeout)
        return parse_file_info(answer.get("info"), shown)

    async def make_dir(self, path: str, *, timeout: float) -> FileInfo:
        """Make directory ``path`` and its missing parents (an existing one is fine)."""
        shown = display_path(path)
        message = {"op": "mkdir", "path": path}
        answer = await self._simple(FrameType.FILE, message, f"mkdir {path!r}", timeout)
        return parse_file_info(answer.get("info"), shown)

    async def remove_file(self, path: str, *, recursive: bool = False, timeout: float) -> None:
        """Remove a file or symlink, or a directory (non-empty only with ``recursive``)."""
        display_path(path)
        message = {"op": "remove", "path": path, "recursive": bool(recursive)}
        await self._simple(FrameType.FILE, message, f"remove {path!r}", timeout)

    async def list_files(self, path: str = ".", *, timeout: float) -> list[FileInfo]:
        """The entries of directory ``path``, sorted by name (symlinks not followed)."""
        shown = display_path(path)
        what = f"list {path!r}"
        deadline = asyncio.get_running_loop().time() + timeout
        entries: list[FileInfo] = []
        async with self._request() as pending:
            message = {"op": "list", "path": path}
            await self._channel.send(protocol.encode_json(FrameType.FILE, pending.id, message))
            while True:
                answer = self._result(await self._next(pending.id, deadline, what, timeout), what)
                batch, more = answer.get("entries"), answer.get("more")
                if not isinstance(batch, list) or type(more) is not bool:
                    raise AgentProtocolError("the guest sent a malformed directory listing")
                for item in batch:
                    name = item.get("name") if isinstance(item, dict) else None
                    entries.append(parse_file_info(item, child_path(shown, str(name))))
                if len(entries) > files.MAX_ENTRIES:
                    raise AgentProtocolError(f"the guest listed over {files.MAX_ENTRIES} entries")
                if not more:
                    pending.finished = True
                    return entries

    async def write_file(
        self, path: str, data: FileData, *, mode: int = 0o644, timeout: float
    ) -> FileInfo:
        """Write ``data`` (bytes or an async iterable of bytes) to ``path`` atomically.

        Parents are created; the file appears only once complete (written to a temporary name,
        then renamed), owned by the sandbox user with permission bits ``mode``. ``timeout`` is
        seconds for the whole transfer.
        """
        shown = display_path(path)
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise InvalidInput(f"bad file mode {mode!r}: use 0 to 0o777 (e.g. 0o644)")
        what = f"writing {path!r}"
        async with self._request() as pending:
            try:
                async with asyncio.timeout(timeout):
                    frame = await self._upload(pending.id, path, mode, data)
            except TimeoutError as exc:
                raise VMError(
                    f"the guest agent did not finish {what} within {timeout:g} s "
                    "(raise the call's timeout)"
                ) from exc
            pending.finished = True
            return parse_file_info(self._result(frame, what).get("info"), shown)

    async def _upload(
        self, request_id: int, path: str, mode: int, data: FileData
    ) -> protocol.Frame:
        """Stream the file; return the guest's answer (which may come early, as an ERROR)."""
        message = {"op": "write", "path": path, "mode": mode}
        await self._channel.send(protocol.encode_json(FrameType.FILE, request_id, message))
        answer = asyncio.ensure_future(self._channel.next(request_id))
        try:
            ended = False
            async for chunk in chunks(data):
                if answer.done():
                    break
                await self._channel.send(protocol.encode(FrameType.DATA, request_id, chunk))
            else:
                await self._channel.send(protocol.encode(FrameType.DATA, request_id, b""))
                ended = True
            frame = await answer
        finally:
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, VMError):
                    await answer
        if frame.type == FrameType.RESULT and not ended:
            raise AgentProtocolError("the guest finished a file write before all data was sent")
        return frame

    async def read_file(self, path: str, *, timeout: float) -> AsyncGenerator[bytes, None]:
        """Yield the file's bytes in chunks; ``timeout`` is seconds for the whole transfer.

        Iterate it to the end (or close it) before waiting on other requests of this VM: the
        channel holds only a few MB for a reader that has stopped.
        """
        shown = display_path(path)
        what = f"reading {shown!r}"
        deadline = asyncio.get_running_loop().time() + timeout
        received = 0
        async with self._request() as pending:
            message = {"op": "read", "path": path}
            await self._channel.send(protocol.encode_json(FrameType.FILE, pending.id, message))
            while True:
                frame = await self._next(pending.id, deadline, what, timeout)
                if frame.type == FrameType.DATA:
                    received += len(frame.payload)
                    if frame.payload:
                        yield frame.payload
                    continue
                answer = self._result(frame, what)
                pending.finished = True
                if type(answer.get("size")) is not int or answer["size"] != received:
                    raise AgentProtocolError(
                        f"the guest sent {received} bytes of {shown!r} "
                        f"but said {answer.get('size')!r:.40}"
                    )
                return
