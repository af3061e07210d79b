"""``AsyncSandbox`` and its ``AsyncFiles``: ``_sync`` with ``await``, for asyncio programs.

Same methods, parameters and defaults as ``Sandbox`` (``tests/unit/test_sdk_parity.py``);
output callbacks may be plain functions or coroutine functions.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, BinaryIO

from fission.errors import SandboxNotFound
from fission.sdk import _requests as calls
from fission.sdk._base import DEFAULT_CONTEXT, DEFAULT_TIMEOUT, DEFAULT_TTL, SandboxCore
from fission.sdk._commands_async import AsyncCommands
from fission.sdk._connection import DEFAULT_REQUEST_TIMEOUT, Connection, resolve_connection
from fission.sdk._http import AsyncHTTP
from fission.sdk._local import abody_of, atomic_target, open_source
from fission.sdk._models import (
    AsyncOutputCallback,
    ExposedPort,
    FileInfo,
    OutputEvent,
    PortToken,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
    StreamEvent,
)
from fission.sdk._pty import AsyncTerminal
from fission.sdk._watch_async import AsyncWatchStream


async def drain(
    events: AsyncGenerator[StreamEvent, None],
    on_stdout: AsyncOutputCallback | None,
    on_stderr: AsyncOutputCallback | None,
) -> RunResult:
    """Deliver a run's output to the callbacks, in order (awaiting them); its RunResult."""
    result = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, OutputEvent):
                callback = calls.callback_for(event, on_stdout, on_stderr)
                if callback is not None:
                    outcome = callback(event.data)
                    if inspect.isawaitable(outcome):
                        await outcome
            else:
                result = event
    if result is None:
        raise calls.missing_result()
    return result


async def stream_run(http: AsyncHTTP, call: calls.Call) -> AsyncGenerator[StreamEvent, None]:
    """The events of a streamed run: its output chunks as they come, then its RunResult."""
    assembler = calls.RunAssembler()
    async with aclosing(http.lines(call)) as lines:
        async for raw in lines:
            event = assembler.feed(raw)
            if event is not None:
                yield event
            if assembler.result is not None:
                return
    raise calls.missing_result()


class AsyncSandbox(SandboxCore):
    """A persistent sandbox for asyncio: ``async with AsyncSandbox(...) as s:`` creates one
    and deletes it at the end of the block; ``await AsyncSandbox.create(...)`` creates one now.
    """

    _http: AsyncHTTP
    _files: AsyncFiles

    def _attach(self, conn: Connection, sandbox_id: str | None) -> None:
        super()._attach(conn, sandbox_id)
        self._http = AsyncHTTP(conn)
        self._files = AsyncFiles(self)

    @classmethod
    async def create(
        cls,
        language: str = "python",
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        memory_mb: int = 256,
        cpus: int = 1,
        disk_mb: int = 512,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        network: str | Mapping[str, Any] = "none",
        allow_hosts: Sequence[str] | None = None,
        from_snapshot: str | None = None,
        template: str | None = None,
        on_timeout: str = "delete",
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> AsyncSandbox:
        """Create a sandbox now (parameters as for the constructor)."""
        box = cls(
            language,
            ttl=ttl,
            timeout=timeout,
            memory_mb=memory_mb,
            cpus=cpus,
            disk_mb=disk_mb,
            env=env,
            metadata=metadata,
            network=network,
            allow_hosts=allow_hosts,
            from_snapshot=from_snapshot,
            template=template,
            on_timeout=on_timeout,
            url=url,
            api_key=api_key,
            request_timeout=request_timeout,
        )
        await box._start()
        return box

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> AsyncSandbox:
        """Attach to an existing sandbox; SandboxNotFound if there is none with this id."""
        box = cls.__new__(cls)
        box._attach(resolve_connection(url, api_key, request_timeout), sandbox_id)
        try:
            await box.info()
        except BaseException:
            await box.close()
            raise
        return box

    @classmethod
    async def list(
        cls,
        state: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> AsyncGenerator[SandboxInfo, None]:
        """Every sandbox in ``state`` (running, paused) whose metadata has these pairs."""
        http = AsyncHTTP(resolve_connection(url, api_key, request_timeout))
        try:
            cursor = None
            while True:
                page, cursor = calls.parse_page(
                    await http.json(calls.list_sandboxes(state, metadata, cursor))
                )
                for info in page:
                    yield info
                if cursor is None:
                    return
        finally:
            await http.close()

    async def _start(self) -> None:
        if self._created or self._create is None:
            return
        try:
            self._remember(await self._http.json(self._create))
        except BaseException:
            await self.close()
            raise

    @property
    def commands(self) -> AsyncCommands:
        """The sandbox's commands under E2B's names: ``commands.run(cmd, background=...)``."""
        return AsyncCommands(self)

    @property
    def files(self) -> AsyncFiles:
        """The sandbox's files: read, write, upload, download, list, ..."""
        return self._files

    async def info(self) -> SandboxInfo:
        """The sandbox's current facts (state, expiry, limits, metadata)."""
        return self._remember(await self._http.json(calls.get_sandbox(self.id)))

    async def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        context: str | None = None,
        fresh_context: bool = False,
        checkpoint: bool = False,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> RunResult:
        """Run ``code`` in the sandbox's language; a non-zero exit is a result, not an error.

        ``timeout``: seconds (default: the sandbox's). ``context``: a named interpreter whose
        variables persist across runs; ``fresh_context`` starts it over. ``on_stdout`` and
        ``on_stderr`` get each chunk (bytes) as it is printed. ``checkpoint``: take a checkpoint
        after this run (its id is the result's ``checkpoint_id``; see ``rewind``).
        """
        events = self.run_stream(
            code,
            timeout=timeout,
            env=env,
            context=context,
            fresh_context=fresh_context,
            checkpoint=checkpoint,
        )
        return await drain(events, on_stdout, on_stderr)

    def run_stream(
        self,
        code: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        context: str | None = None,
        fresh_context: bool = False,
        checkpoint: bool = False,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Like ``run``, yielding OutputEvents as they come, then the RunResult."""
        call = calls.run_code(
            self.id,
            code,
            timeout=timeout,
            default_timeout=self._default_timeout,
            env=env,
            context=context,
            fresh_context=fresh_context,
            checkpoint=checkpoint,
        )
        return stream_run(self._http, call)

    async def exec(
        self,
        command: str | builtins.list[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        checkpoint: bool = False,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> RunResult:
        """Run a command: a shell line (string, run by /bin/sh) or an argv (list).

        ``timeout``: seconds (default: the sandbox's). ``cwd``: its working directory.
        ``stdin``: bytes (or text) fed to it. ``checkpoint`` and callbacks as for ``run``.
        """
        events = self.exec_stream(
            command, timeout=timeout, env=env, cwd=cwd, stdin=stdin, checkpoint=checkpoint
        )
        return await drain(events, on_stdout, on_stderr)

    def exec_stream(
        self,
        command: str | builtins.list[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        checkpoint: bool = False,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Like ``exec``, yielding OutputEvents as they come, then the RunResult."""
        call = calls.exec_command(
            self.id,
            command,
            timeout=timeout,
            default_timeout=self._default_timeout,
            env=env,
            cwd=cwd,
            stdin=stdin,
            checkpoint=checkpoint,
        )
        return stream_run(self._http, call)

    async def pause(self) -> SandboxInfo:
        """Save the sandbox to disk and stop its VM (files and memory kept; the ttl stops)."""
        return self._remember(await self._http.json(calls.pause_sandbox(self.id)))

    async def resume(self) -> SandboxInfo:
        """Start a paused sandbox again where it was; its ttl starts over."""
        return self._remember(await self._http.json(calls.resume_sandbox(self.id)))

    async def expose(self, port: int) -> ExposedPort:
        """Make ``port`` (1-65535, where a program in the sandbox listens on 127.0.0.1) reachable
        through the daemon at ``ExposedPort.url``, HTTP and WebSocket; the owner's key opens it."""
        return calls.parse_port(await self._http.json(calls.expose_port(self.id, port)))

    async def unexpose(self, port: int) -> None:
        """Stop exposing ``port``: its URL, its tokens and its open connections end."""
        await self._http.json(calls.unexpose_port(self.id, port))

    async def ports(self) -> builtins.list[ExposedPort]:
        """The sandbox's exposed ports, lowest first."""
        return calls.parse_ports(await self._http.json(calls.list_ports(self.id)))

    async def port_token(self, port: int) -> PortToken:
        """A revocable token that opens one exposed port's URL without your API key (a browser
        preview: ``PortToken.preview_url``)."""
        return calls.parse_port_token(await self._http.json(calls.mint_port_token(self.id, port)))

    async def revoke_port_token(self, port: int, token_id: str) -> None:
        """Refuse a port token from now on (connections opened through the port end)."""
        await self._http.json(calls.revoke_port_token(self.id, port, token_id))

    async def pty(self, cols: int = 80, rows: int = 24) -> AsyncTerminal:
        """A shell on a new terminal in the sandbox, ``cols`` x ``rows`` characters (1-1000):
        ``async with await sandbox.pty() as term: term.send(b"ls\\n"); term.read()``; the shell runs
        with the sandbox's limits and ends (with what it started) when the terminal closes."""
        return await AsyncTerminal._open(self._http.conn, self.id, cols, rows)

    async def set_ttl(self, ttl: float) -> SandboxInfo:
        """Let the sandbox live ``ttl`` seconds from now."""
        return self._remember(await self._http.json(calls.set_ttl(self.id, ttl)))

    async def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Save the running sandbox (memory and disk) as a snapshot; it keeps running.

        ``name``: a label of your own. Start new sandboxes from it with
        ``AsyncSandbox.create(from_snapshot=snapshot.id)``.
        """
        return calls.parse_snapshot(await self._http.json(calls.snapshot_sandbox(self.id, name)))

    async def fork(self, n: int = 1) -> builtins.list[AsyncSandbox]:
        """Snapshot the sandbox and start ``n`` (1 to 16) sandboxes from it, each with the
        same memory and files, its own disk, clock and randomness. Delete each when done."""
        _snapshot, bodies = calls.parse_fork(await self._http.json(calls.fork_sandbox(self.id, n)))
        clones = []
        for body in bodies:
            clone = type(self).__new__(type(self))
            clone._attach(self._conn, None)
            clone._remember(body)
            clones.append(clone)
        return clones

    async def rewind(self, checkpoint_id: str) -> SandboxInfo:
        """Put the sandbox back to a checkpoint of its own (memory and files as they were)."""
        call = calls.rewind_sandbox(self.id, checkpoint_id)
        return self._remember(await self._http.json(call))

    @classmethod
    async def snapshots(
        cls,
        sandbox_id: str | None = None,
        kind: str | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> builtins.list[SnapshotInfo]:
        """Your snapshots (``kind``: snapshot, checkpoint or fork), oldest first."""
        http = AsyncHTTP(resolve_connection(url, api_key, request_timeout))
        try:
            return calls.parse_snapshots(await http.json(calls.list_snapshots(sandbox_id, kind)))
        finally:
            await http.close()

    @classmethod
    async def delete_snapshot(
        cls,
        snapshot_id: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        """Delete a snapshot; Conflict while a sandbox started from it still exists."""
        http = AsyncHTTP(resolve_connection(url, api_key, request_timeout))
        try:
            await http.json(calls.delete_snapshot(snapshot_id))
        finally:
            await http.close()

    async def delete(self) -> None:
        """Destroy the sandbox: its VM, disk and saved state."""
        await self._http.json(calls.delete_sandbox(self.id))

    async def kill(self) -> bool:
        """E2B's name for ``delete``: True if it was deleted, False if it was gone already."""
        try:
            await self.delete()
        except SandboxNotFound:
            return False
        return True

    async def set_timeout(self, timeout: float) -> SandboxInfo:
        """E2B's name for ``set_ttl``: keep the sandbox ``timeout`` more seconds from now."""
        return await self.set_ttl(timeout)

    async def run_code(
        self,
        code: str,
        *,
        context: str = DEFAULT_CONTEXT,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> RunResult:
        """Run Python ``code`` in a context whose variables persist (E2B's ``run_code``).

        Every call without ``context`` shares the sandbox's default context, as E2B's code
        interpreter does; name another ``context`` for a separate one. ``run`` stays
        stateless unless given a context. ``timeout``: seconds (default: the sandbox's).
        """
        return await self.run(
            code,
            timeout=timeout,
            env=env,
            context=context,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    async def close(self) -> None:
        """Close the connection to the daemon; the sandbox itself lives on (safe twice)."""
        await self._http.close()

    async def __aenter__(self) -> AsyncSandbox:
        await self._start()
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            if self._created:
                await self.delete()
        except SandboxNotFound:
            pass  # already deleted, or expired
        finally:
            await self.close()


class AsyncFiles:
    """The files of one sandbox (``sandbox.files``); paths are relative to its home."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: bytes | str | BinaryIO) -> FileInfo:
        """Write a file from bytes, text (UTF-8) or a binary file object (streamed)."""
        box = self._sandbox
        call = calls.write_file(box.id, path)
        return calls.parse_file_info(await box._http.json(call, abody_of(data)))

    async def read(self, path: str) -> bytes:
        """A file's whole content."""
        return b"".join([chunk async for chunk in self.read_stream(path)])

    def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """A file's content in chunks as they arrive."""
        return self._sandbox._http.chunks(calls.read_file(self._sandbox.id, path))

    async def upload(self, local_path: str | os.PathLike[str], remote_path: str) -> FileInfo:
        """Copy a local file into the sandbox, in chunks."""
        with open_source(local_path) as handle:
            return await self.write(remote_path, handle)

    async def download(self, remote_path: str, local_path: str | os.PathLike[str]) -> Path:
        """Copy a file out of the sandbox, in chunks; ``local_path`` appears only when complete."""
        async with aclosing(self.read_stream(remote_path)) as chunks:
            with atomic_target(local_path) as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
        return Path(local_path)

    async def list(self, path: str = ".") -> builtins.list[FileInfo]:
        """The entries of a directory."""
        box = self._sandbox
        return calls.parse_entries(await box._http.json(calls.list_files(box.id, path)))

    async def stat(self, path: str) -> FileInfo:
        """Facts about one file or directory; FileNotFound if there is none."""
        box = self._sandbox
        return calls.parse_file_info(await box._http.json(calls.stat_file(box.id, path)))

    async def make_dir(self, path: str) -> FileInfo:
        """E2B's name for ``mkdir``: create a directory and its parents."""
        return await self.mkdir(path)

    async def get_info(self, path: str) -> FileInfo:
        """E2B's name for ``stat``: facts about one file or directory."""
        return await self.stat(path)

    async def mkdir(self, path: str) -> FileInfo:
        """Create a directory and its parents."""
        box = self._sandbox
        return calls.parse_file_info(await box._http.json(calls.make_dir(box.id, path)))

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or with ``recursive`` a directory and everything in it."""
        box = self._sandbox
        await box._http.json(calls.remove_file(box.id, path, recursive))

    async def watch(self, path: str = ".", recursive: bool = False) -> AsyncWatchStream:
        """Watch directory ``path`` (and below it with ``recursive``); iterate for changes.

        Returns once the watch is in place. The stream ends when closed (``close()`` or an
        ``async with`` block) or when the sandbox stops, pauses or is deleted.
        """
        box = self._sandbox
        lines = box._http.lines(calls.watch_files(box.id, path, recursive))
        try:
            async for raw in lines:
                if calls.is_watch_ready(raw):
                    return AsyncWatchStream(lines)
        except BaseException:
            await lines.aclose()
            raise
        raise calls.missing_result()
