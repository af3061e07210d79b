"""File watches for the host, from inotify inside the guest (stdlib only: inotify via ctypes).

One WATCH frame ``{path, recursive}`` starts a watch on a directory; the agent answers RESULT
``{path}`` (the path as the host shows it), then sends EVENT frames ``{events: [...]}`` as
files change, each event ``{type, path}`` with ``type`` one of ``create``, ``modify``,
``delete``, ``move`` (``path`` is the old name; ``to`` the new one when it stays inside the
watch, else a ``create`` of the new name follows alone), ``chmod``, or ``overflow`` (events were
lost: the bounded queue filled or the kernel's did). Paths are relative to the watched
directory. A KILL of the request ends the watch; so does the watched directory going away
(a final RESULT ``{ended: reason}``).

The path is confined as the file operations confine theirs (``files.split_path``, openat2
beneath the root, the sandbox user's credentials for the open): a watch reaches what the
sandbox user could list. ``recursive`` adds a watch on every directory below, and on each
new one as it appears (what a new directory already holds when its watch is added is reported
as created: inotify cannot say what happened there before). Events wait in a bounded queue
per watch (``MAX_PENDING``), coalesced (a change already queued is not queued twice), and
leave in frames of ``EVENTS_PER_FRAME``.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from typing import Any

if __package__:
    from . import files, protocol
    from .protocol import INVALID_INPUT, AgentError
else:  # run inside the guest, with its modules beside it
    import files  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    from protocol import INVALID_INPUT, AgentError  # type: ignore[no-redef]

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
) | (IN_MOVE_SELF | IN_ONLYDIR)
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len: struct inotify_event
MAX_PENDING = 1024  # events one watch holds before it says ``overflow``
EVENTS_PER_FRAME = 100  # far below MAX_GUEST_PAYLOAD even with long paths
MAX_WATCHES = 32  # watches one VM keeps at once
MAX_DIRS = 8192  # directories one recursive watch follows
READ_SIZE = 64 * 1024

Send = Callable[[protocol.FrameType, int, bytes], None]


def parse_request(message: dict[str, Any]) -> tuple[str, bool]:
    """(path, recursive) of a WATCH request; AgentError for anything malformed."""
    path, recursive = message.get("path"), message.get("recursive", False)
    if type(recursive) is not bool:
        raise AgentError(INVALID_INPUT, "WATCH needs recursive to be true or false")
    files.split_path(path)  # the same checks as every file operation
    return str(path), recursive


def parse_events(buffer: bytes) -> list[tuple[int, int, int, str]]:
    """(wd, mask, cookie, name) of each ``struct inotify_event`` in one read."""
    events, offset = [], 0
    while offset + EVENT_HEADER.size <= len(buffer):
        wd, mask, cookie, length = EVENT_HEADER.unpack_from(buffer, offset)
        offset += EVENT_HEADER.size
        raw = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append((wd, mask, cookie, os.fsdecode(raw)))
    return events


def _libc() -> Any:
    lib = files.libc()
    lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return lib


def _join(directory: str, name: str) -> str:
    if not name:
        return directory
    return name if directory == "." else f"{directory}/{name}"


class Watch:
    """One watch: its inotify instance, the directories it follows and its queued events."""

    def __init__(self, ops: files.FileOps, rid: int, path: str, recursive: bool) -> None:
        self.ops = ops
        self.rid = rid
        self.recursive = recursive
        self.root, self.rest = files.split_path(path, ops.roots)
        self.shown = files.display_path(self.root, self.rest, ops.roots)
        self.fd = _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise AgentError(INVALID_INPUT, f"cannot watch {self.shown}: {os.strerror(err)}")
        self.dirs: dict[int, str] = {}  # wd -> directory relative to the watched one
        self.pending: list[dict[str, Any]] = []
        self.queued: set[tuple[str, str]] = set()
        self.overflowed = False
        self.moves: dict[int, dict[str, Any]] = {}  # cookie -> its queued ``move`` event
        self.ended: str | None = None
        try:
            self.add(".")
        except BaseException:
            self.close()
            raise

    def add(self, relative: str, new: bool = False) -> None:
        """Watch the directory ``relative`` (to the watched one), and below it if recursive;
        ``new``: it appeared under the watch (what it holds is reported as created)."""
        if len(self.dirs) >= MAX_DIRS:
            self.push({"type": "overflow"})
            return
        target = self.rest if relative == "." else os.path.normpath(f"{self.rest}/{relative}")
        shown = files.display_path(self.root, target, self.ops.roots)
        try:
            with self.ops.credentials():  # the sandbox user must be able to list it
                rootfd = self.ops.open_root(self.root)
                try:
                    fd = files.open_beneath(rootfd, target, os.O_RDONLY | os.O_DIRECTORY)
                finally:
                    os.close(rootfd)
        except OSError as exc:
            if relative == ".":
                raise files.error_for(exc, shown) from exc
            return  # a directory that went away (or is closed) before we got there
        try:
            # The fd names exactly what was resolved beneath the root: no path is looked up
            # again, so a symlink swapped in meanwhile cannot redirect the watch.
            wd = _libc().inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), MASK)
            err = ctypes.get_errno()
            subdirs, found = [], []
            if self.recursive:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        found.append(entry.name)
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
        finally:
            os.close(fd)
        if wd < 0:
            if relative == ".":
                raise AgentError(INVALID_INPUT, f"cannot watch {shown}: {os.strerror(err)}")
            self.push({"type": "overflow"})  # out of inotify watches: say events are missed
            return
        self.dirs[wd] = relative
        if new:
            # A directory made under the watch: what appeared in it before its own watch was
            # in place would go unseen, so it is reported as created.
            for name in found:
                self.push({"type": "create", "path": _join(relative, name)})
        for name in subdirs:
            self.add(_join(relative, name), new)

    def push(self, event: dict[str, Any]) -> None:
        """Queue one event unless the same change is queued already or the queue is full."""
        key = (event["type"], event.get("path", ""))
        if event["type"] != "move" and key in self.queued:
            return
        if len(self.pending) >= MAX_PENDING:
            if not self.overflowed:
                self.overflowed = True
                self.pending[-1] = {"type": "overflow"}
            return
        self.queued.add(key)
        self.pending.append(event)

    def on_readable(self) -> None:
        """Read what inotify has and queue the events it describes."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        for wd, mask, cookie, name in parse_events(data):
            self.on_event(wd, mask, cookie, name)

    def on_event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        """Turn one inotify event into the watch's events."""
        if mask & IN_Q_OVERFLOW:
            self.push({"type": "overflow"})
            return
        directory = self.dirs.get(wd)
        if directory is None:
            return
        path = _join(directory, name)
        if mask & IN_IGNORED:
            del self.dirs[wd]
            if directory == ".":
                self.ended = f"{self.shown} was removed"
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if directory == "." and mask & IN_MOVE_SELF:
                self.ended = f"{self.shown} was moved away"
            return
        if mask & IN_CREATE:
            self.push({"type": "create", "path": path})
        elif mask & IN_MODIFY:
            self.push({"type": "modify", "path": path})
        elif mask & IN_ATTRIB:
            self.push({"type": "chmod", "path": path})
        elif mask & IN_DELETE:
            self.push({"type": "delete", "path": path})
        elif mask & IN_MOVED_FROM:
            move = {"type": "move", "path": path}
            self.moves[cookie] = move
            self.push(move)
        elif mask & IN_MOVED_TO:
            moved = self.moves.pop(cookie, None)
            if moved is not None:
                moved["to"] = path
            else:
                self.push({"type": "create", "path": path})
        if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            self.add(path, new=True)

    def take(self) -> list[dict[str, Any]]:
        """The next frame's worth of queued events (removed from the queue)."""
        batch = self.pending[:EVENTS_PER_FRAME]
        del self.pending[:EVENTS_PER_FRAME]
        for event in batch:
            self.queued.discard((event["type"], event.get("path", "")))
        if not self.pending:
            self.overflowed = False
            self.moves.clear()  # a move's partner comes in the same read or never
        return batch

    def close(self) -> None:
        """Release the inotify instance (every watch of it goes with it)."""
        files.close_quietly(self.fd)
        self.fd = -1


class Watches:
    """The watches of one agent: started by WATCH, ended by KILL, flushed every loop turn."""

    def __init__(self, ops: files.FileOps, send: Send, register: Callable[[Watch], object]) -> None:
        self.ops = ops
        self.send = send
        self.register = register  # puts a new watch's fd in the agent's selector
        self.unregister: Callable[[Watch], object] = lambda _: None
        self.active: dict[int, Watch] = {}

    def start(self, rid: int, message: dict[str, Any]) -> None:
        """Start the watch of one WATCH request and answer with its path."""
        path, recursive = parse_request(message)
        if rid in self.active:
            raise AgentError(INVALID_INPUT, f"request {rid} is already watching")
        if len(self.active) >= MAX_WATCHES:
            raise AgentError(
                INVALID_INPUT, f"{MAX_WATCHES} watches are open: stop one before starting another"
            )
        try:
            watch = Watch(self.ops, rid, path, recursive)
        except OSError as exc:
            raise files.error_for(exc, path) from exc
        self.active[rid] = watch
        self.register(watch)
        self.send(protocol.FrameType.RESULT, rid, protocol.dump_json({"path": watch.shown}))

    def flush(self) -> None:
        """Send what every watch has queued; end the watches whose directory went away."""
        for rid, watch in list(self.active.items()):
            while watch.pending:
                batch = watch.take()
                self.send(protocol.FrameType.EVENT, rid, protocol.dump_json({"events": batch}))
            if watch.ended is not None:
                self.cancel(rid)
                self.send(
                    protocol.FrameType.RESULT, rid, protocol.dump_json({"ended": watch.ended})
                )

    def cancel(self, rid: int) -> bool:
        """End the watch of request ``rid``; False if there is none."""
        watch = self.active.pop(rid, None)
        if watch is None:
            return False
        self.unregister(watch)
        watch.close()
        return True

    def cancel_all(self) -> None:
        """End every watch (the host left: nobody reads their events)."""
        for rid in list(self.active):
            self.cancel(rid)


__all__ = ["MAX_PENDING", "Watch", "Watches", "parse_events", "parse_request"]
