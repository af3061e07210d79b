"""File operations for the host, carried out inside the guest (stdlib only).

Relative paths resolve under /home/sandbox; absolute ones only under an allowed root (``ROOTS``).
The guest is the authority on what a path means: every lookup goes through openat2(2) with
RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS relative to the root's directory fd, so ``..`` and
symlinks that leave the root (absolute ones, ones that climb out, /proc magic links) fail with
``path_not_allowed``; a symlink that stays inside is followed. Each operation runs with the
sandbox user's file-system uid and gid (setfsuid/setfsgid, which also drop root's file
capabilities), so it reaches nothing the user's own code could not, and what it creates is the
sandbox user's.

One FILE frame ``{op, path, ...}`` per request; answers are RESULT frames unless said otherwise:

    stat    {path}                      -> {info}        (a symlink itself is not followed)
    list    {path}                      -> {entries: [info, ...], more: bool}, in several frames
    mkdir   {path}                      -> {info}        (parents too; an existing dir is fine)
    remove  {path, recursive}           -> {}
    write   {path, mode}, DATA..., DATA b"" -> {info}    (to a temporary name, then renamed)
    read    {path}                      -> DATA..., then {size}

where info is ``{name, kind, size, mode, mtime}``. A failure is ERROR ``{code, message}``.
Transfers move in FILE_CHUNK pieces; reads advance one chunk per agent loop turn (``pump``), so
a long transfer never stalls the runs the agent serves meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import Any

if __package__:
    from . import protocol
    from .confine import SANDBOX_GID, SANDBOX_UID
    from .protocol import FILE_NOT_FOUND, INVALID_INPUT, PATH_NOT_ALLOWED, AgentError
else:  # run inside the guest, with its modules beside it
    import protocol  # type: ignore[no-redef]
    from confine import SANDBOX_GID, SANDBOX_UID  # type: ignore[no-redef]
    from protocol import (  # type: ignore[no-redef]
        FILE_NOT_FOUND,
        INVALID_INPUT,
        PATH_NOT_ALLOWED,
        AgentError,
    )

HOME = "/home/sandbox"
ROOTS = (HOME, "/tmp", "/data")  # the first is where relative paths resolve
MAX_PATH = 4096
MAX_ENTRIES = 100_000
ENTRIES_PER_FRAME = 100  # a frame stays far below MAX_GUEST_PAYLOAD even with long names
MAX_DEPTH = 256  # deepest tree a recursive remove descends
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}

Send = Callable[[protocol.FrameType, int, bytes], None]


# -- paths (pure; the host runs these too, as a cheap pre-check) ------------------------------
def split_path(path: object, roots: tuple[str, ...] = ROOTS) -> tuple[str, str]:
    """(allowed root, path relative to it with ``.`` and ``..`` folded) or AgentError."""
    if not isinstance(path, str) or not path:
        raise AgentError(INVALID_INPUT, "the path is empty")
    if "\0" in path:
        raise AgentError(INVALID_INPUT, "the path holds a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise AgentError(INVALID_INPUT, f"the path is longer than {MAX_PATH} bytes")
    root, rest = roots[0], path
    if path.startswith("/"):
        absolute = "/" + path.lstrip("/")
        for candidate in roots:
            if absolute == candidate or absolute.startswith(candidate + "/"):
                root, rest = candidate, absolute[len(candidate) :].lstrip("/") or "."
                break
        else:
            raise AgentError(
                PATH_NOT_ALLOWED,
                f"{path!r} is outside the sandbox's files: use a path relative to {roots[0]} "
                f"or under {', '.join(roots)}",
            )
    rest = os.path.normpath(rest)
    if rest == ".." or rest.startswith("../"):
        raise AgentError(PATH_NOT_ALLOWED, f"{path!r} leads out of {root} through '..'")
    return root, rest


def display_path(root: str, rest: str, roots: tuple[str, ...] = ROOTS) -> str:
    """The path as the caller should use it: relative under the home root, else absolute."""
    if root == roots[0]:
        return rest
    return root if rest == "." else f"{root}/{rest}"


def error_for(exc: OSError, shown: str) -> AgentError:
    """The ERROR a failed system call becomes, naming the problem."""
    code = exc.errno
    if code in (errno.EXDEV, errno.ELOOP):
        return AgentError(
            PATH_NOT_ALLOWED, f"{shown}: leads out of the sandbox's files (a symlink or '..')"
        )
    if code in (errno.EACCES, errno.EPERM):
        return AgentError(PATH_NOT_ALLOWED, f"{shown}: permission denied to the sandbox user")
    if code == errno.ENOENT:
        return AgentError(FILE_NOT_FOUND, f"{shown}: no such file or directory")
    problems = {
        errno.ENOTDIR: "not a directory",
        errno.EISDIR: "is a directory",
        errno.EEXIST: "already exists",
        errno.ENOTEMPTY: "the directory is not empty (remove it with recursive=True)",
        errno.ENOSPC: "the sandbox's disk is full",
        errno.EDQUOT: "the sandbox's disk is full",
        errno.ENAMETOOLONG: "a file name is too long",
        errno.EROFS: "the file system is read-only",
    }
    return AgentError(INVALID_INPUT, f"{shown}: {problems.get(code or 0, os.strerror(code or 0))}")


def base_name(root: str, rest: str) -> str:
    """The last component of ``rest`` under ``root`` (the root's own name for ``.``)."""
    return os.path.basename(root if rest == "." else rest)


def info_of(name: str, st: os.stat_result) -> dict[str, Any]:
    """The FileInfo fields of a stat result (``name`` made valid UTF-8 for JSON)."""
    return {
        "name": name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        "kind": KINDS.get(stat.S_IFMT(st.st_mode), "other"),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }


# -- system calls -----------------------------------------------------------------------------
class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: Any = None


def libc() -> Any:
    """The C library, loaded on first use."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """openat2(dirfd, path) that refuses to leave ``dirfd`` or to follow magic links."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = libc().syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


@contextlib.contextmanager
def fs_credentials(uid: int | None, gid: int | None) -> Iterator[None]:
    """Run the block with file-system uid and gid ``uid``/``gid`` (None: unchanged)."""
    if uid is None or gid is None:
        yield
        return
    lib = libc()
    lib.setfsgid(gid)
    lib.setfsuid(uid)
    try:
        # Both calls return the previous id; with an invalid id (-1) they change nothing.
        if lib.setfsuid(-1) != uid or lib.setfsgid(-1) != gid:
            raise AgentError("internal", "cannot take the sandbox user's file credentials")
        yield
    finally:
        lib.setfsuid(0)
        lib.setfsgid(0)


def close_quietly(fd: int) -> None:
    """Close ``fd`` if it is open."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_contents(dirfd: int, depth: int = 0) -> None:
    """Remove everything inside the directory ``dirfd``, never following a symlink."""
    if depth > MAX_DEPTH:
        raise OSError(errno.ELOOP, f"the tree is deeper than {MAX_DEPTH} directories")
    with os.scandir(dirfd) as it:
        entries = list(it)
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                sub = os.open(entry.name, flags, dir_fd=dirfd)
                try:
                    remove_contents(sub, depth + 1)
                finally:
                    os.close(sub)
                os.rmdir(entry.name, dir_fd=dirfd)
            else:
                os.unlink(entry.name, dir_fd=dirfd)
        except FileNotFoundError:
            continue


class Upload:
    """A file being written: its temporary file, its parent directory and final name."""

    def __init__(self, parent: int, name: str, temp: str, fd: int, mode: int, shown: str):
        self.parent = parent
        self.name = name
        self.temp = temp
        self.fd = fd
        self.mode = mode
        self.shown = shown


class FileOps:
    """The agent's file operations and the transfers in flight."""

    def __init__(
        self,
        send: Send,
        roots: tuple[str, ...] = ROOTS,
        uid: int | None = SANDBOX_UID,
        gid: int | None = SANDBOX_GID,
    ) -> None:
        self.send = send
        self.roots = roots
        self.uid = uid
        self.gid = gid
        self.uploads: dict[int, Upload] = {}
        self.downloads: dict[int, tuple[int, int, str]] = {}  # request id -> (fd, sent, path)

    def reply(self, rid: int, message: dict[str, Any]) -> None:
        """Send one RESULT frame."""
        self.send(protocol.FrameType.RESULT, rid, protocol.dump_json(message))

    def credentials(self) -> contextlib.AbstractContextManager[None]:
        """The sandbox user's file-system credentials, for one step."""
        return fs_credentials(self.uid, self.gid)

    def open_root(self, root: str) -> int:
        """An O_PATH fd of an allowed root (never through a symlink)."""
        return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def open_parent(self, rootfd: int, rest: str) -> tuple[int, str]:
        """(O_PATH fd of the parent directory, final name) of ``rest`` under ``rootfd``."""
        head, name = os.path.split(rest)
        return open_beneath(rootfd, head or ".", os.O_PATH | os.O_DIRECTORY), name

    # -- dispatch -----------------------------------------------------------------------------
    def handle(self, rid: int, message: dict[str, Any]) -> None:
        """Start or carry out one FILE request; AgentError for what cannot be done."""
        op = message.get("op")
        root, rest = split_path(message.get("path"), self.roots)
        shown = display_path(root, rest, self.roots)
        if rid in self.uploads or rid in self.downloads:
            raise AgentError(INVALID_INPUT, f"request {rid} is already transferring a file")
        try:
            if op == "stat":
                self.reply(rid, {"info": self.stat(root, rest)})
            elif op == "list":
                self.list(rid, root, rest, shown)
            elif op == "mkdir":
                self.reply(rid, {"info": self.mkdir(root, rest, shown)})
            elif op == "remove":
                self.remove(root, rest, shown, bool(message.get("recursive")))
                self.reply(rid, {})
            elif op == "write":
                mode = message.get("mode", 0o644)
                if type(mode) is not int or not 0 <= mode <= 0o777:
                    raise AgentError(INVALID_INPUT, f"bad file mode {mode!r}: use 0 to 0o777")
                self.uploads[rid] = self.open_upload(rid, root, rest, shown, mode)
            elif op == "read":
                self.downloads[rid] = (self.open_download(root, rest, shown), 0, shown)
            else:
                raise AgentError(INVALID_INPUT, f"unknown file operation {op!r}")
        except OSError as exc:
            raise error_for(exc, shown) from exc

    def stat(self, root: str, rest: str) -> dict[str, Any]:
        """The info of ``rest`` itself (a symlink is not followed)."""
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                parent, name = self.open_parent(rootfd, rest)
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(parent)
            finally:
                os.close(rootfd)
        return info_of(base_name(root, rest), st)

    def list(self, rid: int, root: str, rest: str, shown: str) -> None:
        """Send the directory's entries, sorted by name, in RESULT frames."""
        entries: list[dict[str, Any]] = []
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                fd = open_beneath(rootfd, rest, os.O_RDONLY | os.O_DIRECTORY)
            finally:
                os.close(rootfd)
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        if len(entries) >= MAX_ENTRIES:
                            raise AgentError(
                                INVALID_INPUT,
                                f"{shown}: more than {MAX_ENTRIES} entries; list a subdirectory",
                            )
                        try:
                            entries.append(info_of(entry.name, entry.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue
            finally:
                os.close(fd)
        entries.sort(key=lambda e: str(e["name"]))
        for start in range(0, max(len(entries), 1), ENTRIES_PER_FRAME):
            chunk = entries[start : start + ENTRIES_PER_FRAME]
            self.reply(rid, {"entries": chunk, "more": start + ENTRIES_PER_FRAME < len(entries)})

    def mkdir(self, root: str, rest: str, shown: str) -> dict[str, Any]:
        """Make ``rest`` and its missing parents (mode 0755); return its info."""
        self.make_dirs(root, rest)
        info = self.stat_followed(root, rest)
        if info["kind"] != "dir":
            raise AgentError(INVALID_INPUT, f"{shown}: already exists and is not a directory")
        return info

    def make_dirs(self, root: str, rest: str) -> None:
        """Create each missing directory of ``rest``, each step resolved beneath the root."""
        parts = [] if rest == "." else rest.split("/")
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                for i, part in enumerate(parts):
                    parent = open_beneath(rootfd, "/".join(parts[:i]) or ".", os.O_PATH)
                    try:
                        os.mkdir(part, 0o755, dir_fd=parent)
                    except FileExistsError:
                        pass
                    finally:
                        os.close(parent)
            finally:
                os.close(rootfd)

    def stat_followed(self, root: str, rest: str) -> dict[str, Any]:
        """The info of what ``rest`` resolves to (symlinks inside the root followed)."""
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                fd = open_beneath(rootfd, rest, os.O_PATH)
            finally:
                os.close(rootfd)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        return info_of(base_name(root, rest), st)

    def remove(self, root: str, rest: str, shown: str, recursive: bool) -> None:
        """Remove a file, a symlink (not its target) or a directory (with ``recursive``)."""
        if rest == ".":
            raise AgentError(INVALID_INPUT, f"{shown}: cannot remove {root} itself")
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                parent, name = self.open_parent(rootfd, rest)
            finally:
                os.close(rootfd)
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent)
                    return
                if recursive:
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(name, flags, dir_fd=parent)
                    try:
                        remove_contents(fd)
                    finally:
                        os.close(fd)
                os.rmdir(name, dir_fd=parent)
            finally:
                os.close(parent)

    # -- transfers ----------------------------------------------------------------------------
    def open_upload(self, rid: int, root: str, rest: str, shown: str, mode: int) -> Upload:
        """Make the parents and a temporary file beside the target."""
        if rest == ".":
            raise AgentError(INVALID_INPUT, f"{shown}: is a directory")
        head = os.path.dirname(rest)
        if head:
            self.make_dirs(root, head)
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                parent, name = self.open_parent(rootfd, rest)
            finally:
                os.close(rootfd)
            try:
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        raise AgentError(INVALID_INPUT, f"{shown}: is a directory")
                except FileNotFoundError:
                    pass
                temp = f".fission-{rid}-{secrets.token_hex(4)}.part"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o600, dir_fd=parent)
            except BaseException:
                os.close(parent)
                raise
        return Upload(parent, name, temp, fd, mode, shown)

    def data(self, rid: int, payload: bytes) -> None:
        """Append one DATA chunk to an upload; an empty one completes it."""
        upload = self.uploads.get(rid)
        if upload is None:
            return  # the rest of an upload that failed or was cancelled
        try:
            if payload:
                view = memoryview(payload)
                while view:
                    view = view[os.write(upload.fd, view) :]
                return
            with self.credentials():
                os.fchmod(upload.fd, upload.mode)
                os.close(upload.fd)
                upload.fd = -1
                parent = upload.parent
                os.rename(upload.temp, upload.name, src_dir_fd=parent, dst_dir_fd=parent)
                st = os.stat(upload.name, dir_fd=upload.parent, follow_symlinks=False)
            del self.uploads[rid]
            os.close(upload.parent)
            self.reply(rid, {"info": info_of(upload.name, st)})
        except OSError as exc:
            self.cancel(rid)
            raise error_for(exc, upload.shown) from exc

    def open_download(self, root: str, rest: str, shown: str) -> int:
        """An fd of the regular file to read."""
        with self.credentials():
            rootfd = self.open_root(root)
            try:
                fd = open_beneath(rootfd, rest, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            finally:
                os.close(rootfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            problem = "is a directory" if stat.S_ISDIR(st.st_mode) else "is not a regular file"
            raise AgentError(INVALID_INPUT, f"{shown}: {problem}")
        return fd

    def pump(self) -> None:
        """Send the next chunk of every read in flight (the end, or an ERROR, when done)."""
        for rid, (fd, sent, shown) in list(self.downloads.items()):
            try:
                chunk = os.read(fd, protocol.FILE_CHUNK)
            except OSError as exc:
                self.cancel(rid)
                failure = error_for(exc, shown)
                self.send(
                    protocol.FrameType.ERROR,
                    rid,
                    protocol.dump_json({"code": failure.code, "message": failure.message}),
                )
                continue
            if chunk:
                self.downloads[rid] = (fd, sent + len(chunk), shown)
                self.send(protocol.FrameType.DATA, rid, chunk)
            else:
                self.cancel(rid)
                self.reply(rid, {"size": sent})

    def cancel(self, rid: int) -> bool:
        """Abandon the transfer of request ``rid`` (a partial upload is removed)."""
        download = self.downloads.pop(rid, None)
        if download is not None:
            close_quietly(download[0])
            return True
        upload = self.uploads.pop(rid, None)
        if upload is None:
            return False
        close_quietly(upload.fd)
        with contextlib.suppress(OSError), self.credentials():
            os.unlink(upload.temp, dir_fd=upload.parent)
        close_quietly(upload.parent)
        return True
