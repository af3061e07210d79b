"""envd's ``filesystem.Filesystem`` service (Connect RPC) over fission's sandbox files.

Stat, list (with depth), make dir, remove and watch are fission's own file operations (the
guest confines every path the same way); rename is ``mv`` run as the sandbox user. Watches
come from the guest's inotify (``guest/watch.py``): fission's ``create``/``modify``/``delete``/
``move``/``chmod`` become E2B's CREATE/WRITE/REMOVE/RENAME (plus CREATE of the new name)/CHMOD;
an ``overflow`` has no E2B event and is dropped. The sync SDK polls a watcher
(``CreateWatcher``/``GetWatcherEvents``): its events wait in a bounded list here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import stat as stat_module
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from fission.core.sandbox_spec import SandboxRecord
from fission.core.sandboxes import SandboxManager
from fission.e2b.access import SandboxAccess
from fission.e2b.paths import FISSION_HOME, e2b_path, guest_path
from fission.e2b.rpc_errors import oneof, rpc_error
from fission.errors import FileNotFound, FissionError

FILE_TYPES = {
    "file": filesystem_pb.FileType.FILE,
    "dir": filesystem_pb.FileType.DIRECTORY,
    "symlink": filesystem_pb.FileType.SYMLINK,
}
EVENT_TYPES = {
    "create": filesystem_pb.EventType.CREATE,
    "modify": filesystem_pb.EventType.WRITE,
    "delete": filesystem_pb.EventType.REMOVE,
    "move": filesystem_pb.EventType.RENAME,
    "chmod": filesystem_pb.EventType.CHMOD,
}
MAX_LISTED = 10_000  # entries one ListDir returns, whatever its depth
MAX_WATCHER_EVENTS = 10_000  # events a polled watcher keeps between two polls
MAX_WATCHERS = 64
KEEPALIVE_SECONDS = 30.0


def entry_info(info: Any) -> filesystem_pb.EntryInfo:
    """envd's EntryInfo of a fission FileInfo."""
    mtime = float(info.mtime)
    kind = FILE_TYPES.get(info.kind, filesystem_pb.FileType.UNSPECIFIED)
    type_bits = stat_module.S_IFDIR if info.kind == "dir" else stat_module.S_IFREG
    return filesystem_pb.EntryInfo(
        name=info.name,
        type=kind,
        path=e2b_path(info.path),
        size=info.size,
        mode=info.mode,
        permissions=stat_module.filemode(type_bits | info.mode),
        owner="user",
        group="user",
        modified_time=Timestamp(seconds=int(mtime), nanos=int((mtime % 1) * 1e9)),
        is_symlink=info.kind == "symlink",
    )


def events_of(event: Any, directory: str) -> list[filesystem_pb.FilesystemEvent]:
    """envd's events for one fission watch event (none for ``overflow``)."""
    kind = EVENT_TYPES.get(event.type)
    if kind is None:
        return []
    found = [filesystem_pb.FilesystemEvent(name=event.path, type=kind)]
    if event.type == "move" and event.to:
        found.append(filesystem_pb.FilesystemEvent(name=event.to, type=EVENT_TYPES["create"]))
    return found


class Watcher:
    """A polled watch (the sync SDK's): a task gathering events until removed."""

    def __init__(self, sandbox_id: str, stream: Any) -> None:
        self.sandbox_id = sandbox_id
        self.events: list[filesystem_pb.FilesystemEvent] = []
        self.task = asyncio.create_task(self._gather(stream))

    async def _gather(self, stream: Any) -> None:
        async with contextlib.aclosing(stream):
            async for batch in stream:
                for event in batch:
                    if len(self.events) < MAX_WATCHER_EVENTS:
                        self.events.extend(events_of(event, ""))

    def take(self) -> list[filesystem_pb.FilesystemEvent]:
        """The events since the last poll."""
        taken, self.events = self.events, []
        return taken


class FilesystemService(filesystem_connect.Filesystem):
    """The ``filesystem.Filesystem`` service for every sandbox of the daemon."""

    def __init__(self, manager: SandboxManager, access: SandboxAccess) -> None:
        self.manager = manager
        self.access = access
        self.watchers: dict[str, Watcher] = {}

    def _sandbox(self, ctx: Any) -> SandboxRecord:
        headers = ctx.request_headers
        try:
            return self.access.check(headers.get("e2b-sandbox-id"), headers.get("x-access-token"))
        except FissionError as exc:
            raise rpc_error(exc) from exc

    async def _call(self, work: Any) -> Any:
        try:
            return await work
        except FissionError as exc:
            raise rpc_error(exc) from exc

    async def stat(self, request: Any, ctx: Any) -> filesystem_pb.StatResponse:
        """Facts about one path."""
        record = self._sandbox(ctx)
        info = await self._call(
            self.manager.stat_file(record.id, guest_path(request.path), record.owner)
        )
        return filesystem_pb.StatResponse(entry=entry_info(info))

    async def make_dir(self, request: Any, ctx: Any) -> filesystem_pb.MakeDirResponse:
        """Make a directory and its parents; ALREADY_EXISTS if it is there."""
        record = self._sandbox(ctx)
        path = guest_path(request.path)
        with contextlib.suppress(FileNotFound):
            await self.manager.stat_file(record.id, path, record.owner)
            raise ConnectError(Code.ALREADY_EXISTS, f"{request.path} already exists")
        info = await self._call(self.manager.make_dir(record.id, path, record.owner))
        return filesystem_pb.MakeDirResponse(entry=entry_info(info))

    async def move(self, request: Any, ctx: Any) -> filesystem_pb.MoveResponse:
        """Rename a path (``mv`` as the sandbox user; parents of the target are made)."""
        record = self._sandbox(ctx)
        # Relative to the home (the command's cwd) where they are under it.
        source, target = (
            guest_path(path).removeprefix(FISSION_HOME + "/")
            for path in (request.source, request.destination)
        )
        script = 'mkdir -p -- "$(dirname -- "$2")" && mv -T -- "$1" "$2"'
        done = await self._call(
            self.manager.exec_command(
                record.id,
                ["/bin/sh", "-c", script, "mv", source, target],
                owner=record.owner,
                cwd=FISSION_HOME,
            )
        )
        if done.exit_code != 0:
            problem = done.stderr.decode(errors="replace").strip()
            code = Code.NOT_FOUND if "No such file" in problem else Code.INVALID_ARGUMENT
            raise ConnectError(code, f"cannot rename {request.source}: {problem}")
        info = await self._call(self.manager.stat_file(record.id, target, record.owner))
        return filesystem_pb.MoveResponse(entry=entry_info(info))

    async def list_dir(self, request: Any, ctx: Any) -> filesystem_pb.ListDirResponse:
        """A directory's entries, ``depth`` levels down (1 when unset)."""
        record = self._sandbox(ctx)
        depth = max(request.depth, 1)
        found: list[filesystem_pb.EntryInfo] = []
        pending = [(guest_path(request.path), 1)]
        while pending:
            path, level = pending.pop(0)
            entries = await self._call(self.manager.list_files(record.id, path, record.owner))
            for info in entries:
                if len(found) >= MAX_LISTED:
                    raise ConnectError(
                        Code.INVALID_ARGUMENT, f"more than {MAX_LISTED} entries: use a lower depth"
                    )
                found.append(entry_info(info))
                if info.kind == "dir" and level < depth:
                    pending.append((info.path, level + 1))
        return filesystem_pb.ListDirResponse(entries=found)

    async def remove(self, request: Any, ctx: Any) -> filesystem_pb.RemoveResponse:
        """Remove a file or a directory with everything in it."""
        record = self._sandbox(ctx)
        path = guest_path(request.path)
        await self._call(self.manager.remove_file(record.id, path, True, record.owner))
        return filesystem_pb.RemoveResponse()

    async def watch_dir(
        self, request: Any, ctx: Any
    ) -> AsyncIterator[filesystem_pb.WatchDirResponse]:
        """A directory's changes as a stream: a start event once in place, then the changes."""
        record = self._sandbox(ctx)
        stream = self.manager.watch_files(
            record.id, guest_path(request.path), request.recursive, record.owner
        )
        await self._call(anext(stream))
        async with contextlib.aclosing(stream):
            start = filesystem_pb.WatchDirResponse.StartEvent()
            yield filesystem_pb.WatchDirResponse(event=oneof("start", start))
            while True:
                try:
                    batch = await asyncio.wait_for(anext(stream), KEEPALIVE_SECONDS)
                except TimeoutError:
                    keepalive = filesystem_pb.WatchDirResponse.KeepAlive()
                    yield filesystem_pb.WatchDirResponse(event=oneof("keepalive", keepalive))
                    continue
                except StopAsyncIteration:
                    return
                for event in batch:
                    for change in events_of(event, request.path):
                        yield filesystem_pb.WatchDirResponse(event=oneof("filesystem", change))

    async def create_watcher(self, request: Any, ctx: Any) -> filesystem_pb.CreateWatcherResponse:
        """Start a polled watch; its id."""
        record = self._sandbox(ctx)
        for key, old in list(self.watchers.items()):
            if old.task.done():  # its sandbox ended, or it failed: nobody polls it any more
                self.watchers.pop(key, None)
        if len(self.watchers) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} watchers are open")
        stream = self.manager.watch_files(
            record.id, guest_path(request.path), request.recursive, record.owner
        )
        await self._call(anext(stream))
        watcher_id = f"w-{secrets.token_hex(8)}"
        self.watchers[watcher_id] = Watcher(record.id, stream)
        return filesystem_pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _watcher(self, record: SandboxRecord, watcher_id: str) -> Watcher:
        watcher = self.watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != record.id:
            raise ConnectError(Code.NOT_FOUND, f"no watcher {watcher_id!r} in this sandbox")
        return watcher

    async def get_watcher_events(
        self, request: Any, ctx: Any
    ) -> filesystem_pb.GetWatcherEventsResponse:
        """The polled watch's events since the last call."""
        watcher = self._watcher(self._sandbox(ctx), request.watcher_id)
        return filesystem_pb.GetWatcherEventsResponse(events=watcher.take())

    async def remove_watcher(self, request: Any, ctx: Any) -> filesystem_pb.RemoveWatcherResponse:
        """End a polled watch."""
        watcher = self._watcher(self._sandbox(ctx), request.watcher_id)
        self.watchers.pop(request.watcher_id, None)
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FissionError):
            await watcher.task
        return filesystem_pb.RemoveWatcherResponse()

    async def close(self) -> None:
        """End every polled watch (the daemon stops)."""
        for watcher in self.watchers.values():
            watcher.task.cancel()
        await asyncio.gather(*(w.task for w in self.watchers.values()), return_exceptions=True)
        self.watchers.clear()
