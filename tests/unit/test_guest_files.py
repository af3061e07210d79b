"""The guest's file operations, run on the host against a temporary tree (openat2 is the host's).

The roots are temporary directories; credentials are switched only in the test that runs as
root (as the agent does), everything else runs with the test's own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fission.guest import files, protocol
from fission.guest.files import FileOps, display_path, error_for, split_path
from fission.guest.protocol import AgentError, FrameType

ROOTS = ("/home/sandbox", "/tmp", "/data")


# split_path / display_path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root", "rest", "shown"),
    [
        ("a.txt", "/home/sandbox", "a.txt", "a.txt"),
        ("./a/../b//c/", "/home/sandbox", "b/c", "b/c"),
        (".", "/home/sandbox", ".", "."),
        ("/home/sandbox", "/home/sandbox", ".", "."),
        ("/home/sandbox/x/y", "/home/sandbox", "x/y", "x/y"),
        ("//tmp//x", "/tmp", "x", "/tmp/x"),
        ("/tmp", "/tmp", ".", "/tmp"),
        ("/data/d/../e", "/data", "e", "/data/e"),
        ("a/..", "/home/sandbox", ".", "."),
    ],
)
def test_split_path_resolves_under_a_root(path: str, root: str, rest: str, shown: str) -> None:
    assert split_path(path, ROOTS) == (root, rest)
    assert display_path(root, rest, ROOTS) == shown


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../x",
        "a/../../x",
        "../../etc/passwd",
        "/etc/passwd",
        "/proc/self/environ",
        "/",
        "/home",
        "/home/sandboxed",
        "/data/../etc/shadow",
        "/tmp/..",
        "/home/sandbox/../../etc",
    ],
)
def test_split_path_refuses_escapes(path: str) -> None:
    with pytest.raises(AgentError) as caught:
        split_path(path, ROOTS)
    assert caught.value.code == protocol.PATH_NOT_ALLOWED


@pytest.mark.parametrize("path", ["", None, 3, "a\0b", "x" * 5000])
def test_split_path_refuses_malformed_paths(path: object) -> None:
    with pytest.raises(AgentError) as caught:
        split_path(path, ROOTS)
    assert caught.value.code == protocol.INVALID_INPUT


@pytest.mark.parametrize(
    ("code", "expected", "words"),
    [
        (errno.EXDEV, protocol.PATH_NOT_ALLOWED, "leads out"),
        (errno.ELOOP, protocol.PATH_NOT_ALLOWED, "leads out"),
        (errno.EACCES, protocol.PATH_NOT_ALLOWED, "permission denied"),
        (errno.EPERM, protocol.PATH_NOT_ALLOWED, "permission denied"),
        (errno.ENOENT, protocol.FILE_NOT_FOUND, "no such file"),
        (errno.EISDIR, protocol.INVALID_INPUT, "is a directory"),
        (errno.ENOTDIR, protocol.INVALID_INPUT, "not a directory"),
        (errno.EEXIST, protocol.INVALID_INPUT, "already exists"),
        (errno.ENOTEMPTY, protocol.INVALID_INPUT, "recursive=True"),
        (errno.ENOSPC, protocol.INVALID_INPUT, "disk is full"),
        (errno.EDQUOT, protocol.INVALID_INPUT, "disk is full"),
        (errno.EIO, protocol.INVALID_INPUT, "error"),
    ],
)
def test_error_for_names_the_problem(code: int, expected: str, words: str) -> None:
    error = error_for(OSError(code, os.strerror(code)), "some/path")
    assert error.code == expected
    assert error.message.startswith("some/path: ") and words in error.message


# FileOps on a temporary tree ---------------------------------------------------------------


class Guest:
    """FileOps with a recording ``send``; ``call`` returns what one request answered."""

    def __init__(self, roots: tuple[str, ...], uid: int | None = None) -> None:
        self.sent: list[tuple[FrameType, int, bytes]] = []
        self.ops = FileOps(lambda t, r, p: self.sent.append((t, r, p)), roots, uid, uid)

    def call(self, rid: int, **message: Any) -> list[tuple[str, Any]]:
        self.sent.clear()
        self.ops.handle(rid, message)
        return self.answers()

    def answers(self) -> list[tuple[str, Any]]:
        out = [(t.name, p if t == FrameType.DATA else json.loads(p)) for t, _, p in self.sent]
        self.sent.clear()
        return out

    def refused(self, rid: int, **message: Any) -> AgentError:
        with pytest.raises(AgentError) as caught:
            self.call(rid, **message)
        return caught.value

    def upload(self, rid: int, path: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
        assert self.call(rid, op="write", path=path, mode=mode) == []
        for start in range(0, len(data), 1000):
            self.ops.data(rid, data[start : start + 1000])
        self.ops.data(rid, b"")
        [(kind, answer)] = self.answers()
        assert kind == "RESULT"
        return dict(answer["info"])

    def download(self, rid: int, path: str) -> bytes:
        assert self.call(rid, op="read", path=path) == []
        got = b""
        while self.ops.downloads:
            self.ops.pump()
        answers = self.answers()
        for kind, payload in answers[:-1]:
            assert kind == "DATA" and len(payload) <= protocol.FILE_CHUNK
            got += payload
        assert answers[-1] == ("RESULT", {"size": len(got)})
        return got


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, Guest]]:
    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    other.mkdir()
    yield home, other, Guest((str(home), str(other)))


def test_write_read_stat_round_trip(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    data = os.urandom(3 * protocol.FILE_CHUNK + 17)
    info = guest.upload(1, "deep/er/f.bin", data, mode=0o600)
    assert (info["name"], info["kind"], info["size"], info["mode"]) == (
        "f.bin",
        "file",
        len(data),
        0o600,
    )
    assert (home / "deep/er/f.bin").read_bytes() == data
    assert [p.name for p in (home / "deep/er").iterdir()] == ["f.bin"]  # no temporary left
    assert guest.download(2, "deep/er/f.bin") == data
    [(kind, answer)] = guest.call(3, op="stat", path="deep")
    assert (kind, answer["info"]["kind"], answer["info"]["mode"]) == ("RESULT", "dir", 0o755)


def test_list_pages_and_sorts(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    for i in range(files.ENTRIES_PER_FRAME + 5):
        (home / f"n{i:03d}").write_text("x")
    os.symlink("n000", home / "zlink")
    pages = guest.call(1, op="list", path=".")
    assert [more for _, page in pages for more in [page["more"]]] == [True, False]
    names = [entry["name"] for _, page in pages for entry in page["entries"]]
    assert names == sorted(names) and len(names) == files.ENTRIES_PER_FRAME + 6
    assert pages[-1][1]["entries"][-1]["kind"] == "symlink"
    (home / "empty").mkdir()
    assert guest.call(2, op="list", path="empty") == [("RESULT", {"entries": [], "more": False})]


def test_mkdir_and_remove(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    guest.call(1, op="mkdir", path="a/b/c")
    assert (home / "a/b/c").is_dir()
    (home / "a/b/c/f").write_text("x")
    os.symlink("/etc", home / "a/b/etc")
    assert guest.refused(2, op="remove", path="a").code == protocol.INVALID_INPUT
    assert guest.call(3, op="remove", path="a", recursive=True) == [("RESULT", {})]
    assert not (home / "a").exists() and Path("/etc/passwd").exists()
    assert guest.refused(4, op="remove", path=".", recursive=True).code == protocol.INVALID_INPUT
    (home / "file").write_text("x")
    error = guest.refused(5, op="mkdir", path="file")
    assert error.code == protocol.INVALID_INPUT and "not a directory" in error.message


def test_symlinks_out_of_the_root_are_refused(tree: tuple[Path, Path, Guest]) -> None:
    home, other, guest = tree
    os.symlink("/etc", home / "link")
    os.symlink("/proc/self/root", home / "procroot")
    os.symlink("../other", home / "sibling")  # another allowed root, but outside this one
    os.symlink(str(other), home / "absolute")
    (home / "in").mkdir()
    (home / "in/real").write_text("inside")
    os.symlink("real", home / "in/alias")
    os.symlink("../in/real", home / "in/up-and-in")
    for path in ("link/passwd", "procroot/etc/passwd", "sibling/x", "absolute/x"):
        for message in ({"op": "read"}, {"op": "stat"}, {"op": "list"}, {"op": "mkdir"}):
            error = guest.refused(1, path=path, **message)
            assert error.code == protocol.PATH_NOT_ALLOWED, (path, message)
        error = guest.refused(2, op="write", path=path + "/new")
        assert error.code == protocol.PATH_NOT_ALLOWED
    assert list(other.iterdir()) == []
    assert guest.download(3, "in/alias") == b"inside"
    assert guest.download(4, "in/up-and-in") == b"inside"


def test_a_fifo_is_refused_without_blocking(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    os.mkfifo(home / "pipe")
    error = guest.refused(1, op="read", path="pipe")
    assert error.code == protocol.INVALID_INPUT and "not a regular file" in error.message
    assert guest.refused(2, op="read", path=".").message.endswith("is a directory")


def test_a_cancelled_upload_leaves_nothing(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    guest.call(1, op="write", path="half.bin")
    guest.ops.data(1, b"x" * 5000)
    assert len(list(home.iterdir())) == 1  # the temporary file
    assert guest.ops.cancel(1) is True
    assert list(home.iterdir()) == [] and guest.ops.uploads == {}
    guest.ops.data(1, b"more")  # the rest of a cancelled upload is dropped
    guest.ops.data(1, b"")
    assert guest.answers() == [] and list(home.iterdir()) == []
    assert guest.ops.cancel(1) is False


def test_writing_over_a_directory_fails_before_any_data(tree: tuple[Path, Path, Guest]) -> None:
    home, _, guest = tree
    (home / "d").mkdir()
    assert "is a directory" in guest.refused(1, op="write", path="d").message
    assert "is a directory" in guest.refused(2, op="write", path=".").message
    assert guest.refused(3, op="write", path="x", mode=0o4755).code == protocol.INVALID_INPUT
    assert guest.refused(4, op="chmod", path="x").code == protocol.INVALID_INPUT


@pytest.mark.skipif(os.geteuid() != 0, reason="switching file credentials needs root")
def test_operations_take_the_sandbox_users_credentials() -> None:
    base = Path(tempfile.mkdtemp(prefix="fission-files-", dir="/tmp"))  # uid 1000 may enter
    try:
        check_credentials(base)
    finally:
        shutil.rmtree(base)


def check_credentials(base: Path) -> None:
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    (home / "locked").write_text("secret")
    os.chown(home / "locked", 1000, 1000)
    os.chmod(home / "locked", 0)
    (home / "roots").write_text("secret")
    os.chmod(home / "roots", 0o600)
    guest = Guest((str(home),), uid=1000)
    for path in ("locked", "roots"):
        error = guest.refused(1, op="read", path=path)
        assert error.code == protocol.PATH_NOT_ALLOWED and "permission denied" in error.message
    guest.upload(2, "mine.txt", b"x")
    st = os.stat(home / "mine.txt")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    # The agent's own credentials are back after each operation.
    assert (home / "roots").read_text() == "secret"
