"""Files in a running sandbox: write and read (streamed), list, stat, mkdir, remove, watch.

Each transfer holds the sandbox's gate as an operation, so it may overlap runs and other
transfers but not a pause or resume; a sandbox deleted meanwhile reports ``SandboxNotFound``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from fission.agent.client import WatchEvent
from fission.core.managed_sandbox import ManagedSandbox, gone, is_gone
from fission.errors import FissionError

FILE_OP_TIMEOUT = 120.0


async def write_file(
    box: ManagedSandbox, path: str, data: bytes | AsyncIterator[bytes], mode: int = 0o644
) -> Any:
    """Write a file in the sandbox (streamed when ``data`` is an async iterator)."""
    async with box.gate.operation():
        return await _file_op(
            box, box.agent.write_file(path, data, mode=mode, timeout=FILE_OP_TIMEOUT)
        )


async def read_file(box: ManagedSandbox, path: str) -> AsyncGenerator[bytes, None]:
    """The file's bytes in chunks; the sandbox stays locked until the last chunk is read."""
    async with box.gate.operation():
        try:
            # aclosing: a reader that stops early still ends the agent's transfer cleanly
            async with contextlib.aclosing(
                box.agent.read_file(path, timeout=FILE_OP_TIMEOUT)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        except FissionError as exc:
            if is_gone(box):
                raise gone(box) from exc
            raise


async def list_files(box: ManagedSandbox, path: str = ".") -> Any:
    """The entries of a directory in the sandbox."""
    async with box.gate.operation():
        return await _file_op(box, box.agent.list_files(path, timeout=FILE_OP_TIMEOUT))


async def stat_file(box: ManagedSandbox, path: str) -> Any:
    """Facts about one path in the sandbox."""
    async with box.gate.operation():
        return await _file_op(box, box.agent.stat_file(path, timeout=FILE_OP_TIMEOUT))


async def make_dir(box: ManagedSandbox, path: str) -> Any:
    """Create a directory (and its parents) in the sandbox."""
    async with box.gate.operation():
        return await _file_op(box, box.agent.make_dir(path, timeout=FILE_OP_TIMEOUT))


async def remove_file(box: ManagedSandbox, path: str, recursive: bool = False) -> None:
    """Remove a file (or a directory tree with ``recursive``) in the sandbox."""
    async with box.gate.operation():
        await _file_op(
            box, box.agent.remove_file(path, recursive=recursive, timeout=FILE_OP_TIMEOUT)
        )


async def watch_files(
    box: ManagedSandbox, path: str, recursive: bool = False
) -> AsyncGenerator[list[WatchEvent], None]:
    """Batches of changes under a directory; the first (empty) says the watch is in place.

    Only the start holds the sandbox (a watch must not keep it from pausing); the stream ends
    when the sandbox stops, pauses or is deleted.
    """
    async with box.gate.operation():
        stream = box.agent.watch_files(path, recursive=recursive, timeout=FILE_OP_TIMEOUT)
        await _file_op(box, anext(stream))
    async with contextlib.aclosing(stream):
        yield []
        async for batch in stream:
            yield batch


async def _file_op(box: ManagedSandbox, operation: Awaitable[Any]) -> Any:
    try:
        return await operation
    except FissionError as exc:
        if is_gone(box):
            raise gone(box) from exc
        raise
