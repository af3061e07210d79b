"""The guest agent's pure parts: stdlib-only imports, Python 3.9 syntax, the program's env,
and the warm path (traces, the choice of a warm child, reseeding, hand-over)."""

from __future__ import annotations

import ast
import json
import os
import select
import selectors
import socket
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fission.guest import confine, context
from fission.guest.agent import DEFAULT_PATH, SANDBOX_HOME, Agent, build_env, stderr_first
from fission.guest.confine import write_file
from fission.guest.protocol import FrameType
from fission.guest.runs import MAX_TRACE_STEPS, Execution, write_script
from fission.guest.warm import ForkServers, stdlib_only
from fission.guest.zygote import (
    CHILD_STEPS,
    WarmChild,
    Zygote,
    ZygoteHandle,
    child_steps,
    recv_with_fds,
)
from fission.images.store import AGENT_FILES

AGENT_DIR = Path(__file__).resolve().parents[2] / "fission" / "guest"
# Modules shipped beside agent.py in the image; the agent imports them by bare name when run
# as a script and relatively when imported as a package.
SHIPPED = {name.removesuffix(".py") for name in AGENT_FILES}


def imported_roots(source: str) -> tuple[set[str], set[str]]:
    """(top-level modules imported absolutely, modules imported relatively) in ``source``."""
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                relative.add(node.module.split(".")[0])
            else:
                relative |= {alias.name for alias in node.names}
    return absolute, relative


def non_stdlib(source: str) -> set[str]:
    """Modules ``source`` imports that are neither stdlib nor shipped with the agent."""
    absolute, relative = imported_roots(source)
    outside = {name for name in absolute if name not in sys.stdlib_module_names}
    return (outside - SHIPPED) | (relative - SHIPPED)


def test_the_import_check_catches_third_party_and_package_imports() -> None:
    assert non_stdlib("import os\nfrom . import protocol\nimport protocol\n") == set()
    assert non_stdlib("import requests") == {"requests"}
    assert non_stdlib("def f():\n    from fission.errors import VMError\n") == {"fission"}
    assert non_stdlib("from .helpers import x") == {"helpers"}


@pytest.mark.parametrize("name", ["agent.py", "protocol.py"])
def test_guest_and_protocol_import_only_the_standard_library(name: str) -> None:
    assert non_stdlib((AGENT_DIR / name).read_text()) == set()


@pytest.mark.parametrize("name", AGENT_FILES)
def test_every_shipped_agent_file_imports_only_the_standard_library(name: str) -> None:
    assert non_stdlib((AGENT_DIR / name).read_text()) == set()


def test_protocol_imports_nothing_but_the_standard_library() -> None:
    absolute, relative = imported_roots((AGENT_DIR / "protocol.py").read_text())
    assert relative == set()
    assert absolute <= set(sys.stdlib_module_names) | {"__future__"}


def test_every_agent_module_the_guest_imports_is_shipped() -> None:
    # A new agent module must be added to AGENT_FILES, or the image lacks it.
    for name in AGENT_FILES:
        absolute, relative = imported_roots((AGENT_DIR / name).read_text())
        local = {m for m in absolute | relative if (AGENT_DIR / f"{m}.py").exists()}
        assert local <= SHIPPED, f"{name} imports {local - SHIPPED}"


@pytest.mark.parametrize("name", AGENT_FILES)
def test_agent_files_parse_as_python_3_9(name: str) -> None:
    # The guest image's python3 may be as old as 3.9.
    ast.parse((AGENT_DIR / name).read_text(), feature_version=(3, 9))


def test_build_env_defaults() -> None:
    env = build_env({})
    assert env["PATH"] == DEFAULT_PATH and "/usr/bin" in env["PATH"].split(":")
    assert env["HOME"] == SANDBOX_HOME == "/home/sandbox"
    assert env["USER"] == env["LOGNAME"] == "sandbox"
    assert env["LANG"] == "C.UTF-8" and env["TMPDIR"] == "/tmp"


def test_build_env_never_copies_the_agents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISSION_SECRET_TOKEN", "s3cret")
    env = build_env({"A": "1"})
    assert "FISSION_SECRET_TOKEN" not in env
    assert "s3cret" not in env.values()
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "A"}


def test_build_env_request_overrides_defaults() -> None:
    env = build_env({"HOME": "/tmp", "PATH": "/bin", "EXTRA": "x=y", "EMPTY": ""})
    assert env["HOME"] == "/tmp" and env["PATH"] == "/bin"
    assert env["EXTRA"] == "x=y" and env["EMPTY"] == ""
    assert env["USER"] == "sandbox"


@pytest.mark.parametrize(
    "bad",
    [
        {"A=B": "1"},
        {"=": "1"},
        {"": "1"},
        {"A\0B": "1"},
        {"A": "x\0y"},
        {"A": "\0"},
        {"A": 1},
        {1: "a"},
        {"A": None},
    ],
)
def test_build_env_refuses_bad_entries(bad: dict[object, object]) -> None:
    with pytest.raises(ValueError):
        build_env(bad)  # type: ignore[arg-type]


def test_build_env_does_not_change_the_request() -> None:
    requested = {"A": "1"}
    build_env(requested)
    assert requested == {"A": "1"}


# The warm path: traces, the choice of a warm child, reseeding, hand-over ---------------------


def execution(request: dict[str, Any], read_at: float = 0.0) -> Execution:
    """An Execution parsed from ``request``, with no agent behind it (nothing is started)."""
    return Execution(None, 7, {"argv": ["python3"]} | request, read_at)


def test_steps_are_traced_only_when_asked() -> None:
    assert execution({}).trace is None
    traced = execution({"trace": True}, read_at=time.monotonic() - 0.002)
    assert traced.trace is not None
    [(name, ms)] = traced.trace
    assert name == "parsed" and 2.0 <= ms < 1000.0
    traced.mark("child_woke", traced.trace_base - 0.5)  # prepared before the request came
    assert traced.trace[-1] == ["child_woke", -500.0]


def test_a_trace_never_grows_past_what_the_host_accepts() -> None:
    traced = execution({"trace": "yes"})
    assert traced.trace is None  # only a true boolean asks for one
    traced = execution({"trace": True})
    for _ in range(2 * MAX_TRACE_STEPS):
        traced.mark("step")
    assert traced.trace is not None and len(traced.trace) == MAX_TRACE_STEPS


def test_a_run_is_the_vms_last_only_when_it_says_so() -> None:
    assert execution({}).warm_next is True
    assert execution({"last_run": False}).warm_next is True
    assert execution({"last_run": True}).warm_next is False
    assert execution({"last_run": 1}).warm_next is True


def test_a_childs_report_gives_named_times() -> None:
    report = b"0 " + b" ".join(b"%d.5" % i for i in range(len(CHILD_STEPS)))
    assert child_steps(report) == [(name, i + 0.5) for i, name in enumerate(CHILD_STEPS)]
    assert child_steps(b"3") == []
    assert child_steps(b"0 1.0 2.0") == [(CHILD_STEPS[0], 1.0), (CHILD_STEPS[1], 2.0)]
    extra = b"0" + b" 1.0" * (len(CHILD_STEPS) + 5)
    assert len(child_steps(extra)) == len(CHILD_STEPS)


@pytest.mark.parametrize("report", [b"0 nan", b"0 inf 1.0", b"0 -inf", b"0 1.0 x", b"0 1e999"])
def test_a_hostile_report_gives_no_times(report: bytes) -> None:
    # User code runs in the child and can write anything on its status pipe.
    assert child_steps(report) == []


@pytest.mark.parametrize(
    ("script", "lean"),
    [
        ("print(42)", True),
        ("import os, sys\nfrom json import dumps\nimport os.path as p\n", True),
        ("def f():\n    import collections.abc\n", True),
        ("# import numpy\nx = 'import numpy'\n", True),
        ("from . import sibling\n", True),
        ("import numpy as np\n", False),
        ("import os, pandas\n", False),
        ("from sklearn.linear_model import LinearRegression\n", False),
        ("if True:\n\timport requests\n", False),
    ],
)
def test_scripts_that_import_only_the_standard_library_take_a_lean_child(
    script: str, lean: bool
) -> None:
    assert stdlib_only(script) is lean


class FakeServer:
    """Stands for a ZygoteHandle: children ready now, children that a wait would bring."""

    def __init__(self, name: str, ready: int = 0, coming: int = 0) -> None:
        self.name, self.ready, self.coming = name, ready, coming
        self.waited: list[float] = []

    def take_warm(self, wait: float = 0.0) -> str | None:
        if self.ready:
            self.ready -= 1
            return self.name
        if wait > 0:
            self.waited.append(wait)
            if self.coming:
                self.coming -= 1
                return self.name
        return None


def servers(full: FakeServer | None, lean: FakeServer | None) -> ForkServers:
    forks = ForkServers(selectors.DefaultSelector(), None)  # starts nothing
    forks.full, forks.lean = cast(Any, full), cast(Any, lean)
    return forks


def test_a_stdlib_script_takes_whichever_child_is_ready_lean_first() -> None:
    full, lean = FakeServer("full", ready=1), FakeServer("lean", ready=1)
    forks = servers(full, lean)
    assert forks.take_python("print(1)", 2.0) == "lean"
    assert forks.take_python("print(1)", 2.0) == "full"  # ready at once beats waiting
    assert full.waited == lean.waited == []
    lean.coming = 1
    assert forks.take_python("print(1)", 2.0) == "lean"  # then the lean one is waited for


def test_a_script_needing_the_preloads_waits_for_a_full_child() -> None:
    full, lean = FakeServer("full", coming=1), FakeServer("lean", ready=1)
    forks = servers(full, lean)
    assert forks.take_python("import numpy", 2.0) == "full"
    assert full.waited == [2.0] and lean.ready == 1
    assert servers(None, FakeServer("lean", ready=1)).take_python("import numpy", 2.0) == "lean"


def test_commands_take_lean_children_and_contexts_full_ones() -> None:
    forks = servers(FakeServer("full", ready=1), FakeServer("lean", ready=1))
    assert forks.take_exec(1.0) == "lean" and forks.take_context(1.0) == "full"
    assert servers(FakeServer("full", ready=1), None).take_exec(1.0) is None


def handle_without_a_process() -> ZygoteHandle:
    handle = ZygoteHandle.__new__(ZygoteHandle)
    handle.warm, handle.exits = [], []
    handle.fork_requested, handle.reseed_next, handle.rehearse = False, False, True
    return handle


def test_an_init_makes_every_waiting_or_coming_child_reseed() -> None:
    handle = handle_without_a_process()
    a, b = socket.socketpair()
    waiting = WarmChild(10, "/sys/fs/cgroup/warm-1-1", a, False, handle)
    handle.warm = [waiting]
    handle.fork_requested = True  # a child is being forked as the VM is restored
    handle.mark_reseed()
    assert waiting.reseed is True and handle.reseed_next is True
    handle.fork_requested, handle.reseed_next = False, False
    handle.mark_reseed()
    assert handle.reseed_next is False  # nothing on its way: later children are fresh
    a.close()
    b.close()


def test_a_hand_over_says_reseed_only_to_a_child_from_before_the_init() -> None:
    for reseed in (False, True):
        ours, childs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = WarmChild(os.getpid(), "/nowhere", ours, reseed, handle_without_a_process())
        r, w = os.pipe()
        assert child.hand_over({"path": "/run/fission/1/main.py"}, [r, w]) is True
        message, fds, _, _ = socket.recv_fds(childs, 4096, 4)
        assert json.loads(message).get("reseed", False) is reseed and len(fds) == 2
        for fd in (r, w, *fds):
            os.close(fd)
        childs.close()


def test_a_hand_over_to_a_child_that_died_says_so() -> None:
    ours, childs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    childs.close()
    child = WarmChild(os.getpid(), "/nowhere", ours, False, handle_without_a_process())
    r, w = os.pipe()
    assert child.hand_over({"argv": ["true"]}, [r, w]) is False
    os.close(r)
    os.close(w)


class CgroupMoves:
    """Stands in for cgroup writes and ``fork`` (the parent's side only): records each move
    into a cgroup, and whether the agent's end of ``sock`` had a message by then."""

    CHILD = 4242

    def __init__(self, monkeypatch: pytest.MonkeyPatch, agent_end: socket.socket | None) -> None:
        self.agent_end = agent_end
        self.moves: list[tuple[str, str, bool]] = []
        monkeypatch.setattr(confine, "new_cgroup", lambda path: None)
        monkeypatch.setattr(confine, "lower_priority", lambda pid=0: None)
        monkeypatch.setattr(confine, "wake", lambda pid: None)
        monkeypatch.setattr(confine, "write_file", self.write)
        monkeypatch.setattr(os, "fork", lambda: self.CHILD)

    def write(self, path: str, text: str) -> None:
        announced = self.agent_end is not None and bool(
            select.select([self.agent_end], [], [], 0)[0]
        )
        self.moves.append((path, text, announced))


def test_a_warm_child_is_in_its_cgroup_before_the_agent_learns_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Else a KILL right after its run's EXEC writes cgroup.kill while the child, preparing at
    # idle priority, has not moved itself there yet: the kill misses, and the program runs on.
    zygote_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    moves = CgroupMoves(monkeypatch, agent_end)
    server = Zygote.__new__(Zygote)
    server.sock, server.forked = zygote_end, 0
    server.fork_warm()
    message, fds = recv_with_fds(agent_end, 0)
    cgroup = json.loads(message)["cgroup"]
    assert json.loads(message)["warm"] == CgroupMoves.CHILD and len(fds) == 1
    assert moves.moves == [(f"{cgroup}/cgroup.procs", str(CgroupMoves.CHILD), False)]
    for fd in fds:
        os.close(fd)
    zygote_end.close()
    agent_end.close()


def test_a_child_gone_before_its_move_is_still_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    zygote_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    CgroupMoves(monkeypatch, agent_end)

    def gone(path: str, text: str) -> None:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(confine, "write_file", gone)
    server = Zygote.__new__(Zygote)
    server.sock, server.forked = zygote_end, 0
    server.fork_warm()  # the agent then finds the child dead (its hand-over fails, it forks)
    message, fds = recv_with_fds(agent_end, 0)
    assert json.loads(message)["warm"] == CgroupMoves.CHILD
    for fd in fds:
        os.close(fd)
    zygote_end.close()
    agent_end.close()


def test_a_context_kernel_started_afresh_is_in_its_cgroup_on_return(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moves = CgroupMoves(monkeypatch, None)
    pid, sock = context.spawn_kernel("/sys/fs/cgroup/run-7")
    sock.close()
    assert pid == CgroupMoves.CHILD
    assert moves.moves == [("/sys/fs/cgroup/run-7/cgroup.procs", str(pid), False)]


def test_a_script_is_written_once_readable_by_the_sandbox_user(tmp_path: Path) -> None:
    path = str(tmp_path / "main.py")
    write_script(path, "print('é')\n" * 1000)
    assert Path(path).read_text(encoding="utf-8") == "print('é')\n" * 1000
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(FileExistsError):
        write_script(path, "again")


def test_write_file_writes_in_place(tmp_path: Path) -> None:
    target = tmp_path / "memory.max"
    target.write_text("max\n")
    write_file(str(target), "268435456")
    assert target.read_text() == "268435456"
    with pytest.raises(FileNotFoundError):  # a cgroup file is never created
        write_file(str(tmp_path / "absent"), "1")


def test_a_runs_stderr_is_read_first_when_both_streams_wait() -> None:
    run = execution({})
    run.out_fds = {11: FrameType.STDOUT, 12: FrameType.STDERR}

    def event(fd: int, kind: str, owner: object) -> tuple[selectors.SelectorKey, int]:
        return selectors.SelectorKey(fd, fd, selectors.EVENT_READ, (kind, owner)), 1

    events = [event(3, "channel", None), event(11, "out", run), event(12, "out", run)]
    assert [key.fd for key, _ in sorted(events, key=stderr_first)] == [12, 3, 11]


def test_lean_children_skip_the_python_rehearsal_while_commands_take_them() -> None:
    lean = handle_without_a_process()
    lean.ready, lean.alive, lean.warm = True, True, []
    forks = servers(None, None)
    forks.lean = lean
    lean.take_warm = lambda wait=0.0: None  # type: ignore[method-assign]
    forks.take_exec(0.0)
    assert lean.rehearse is False
    forks.take_python("print(1)", 0.0)
    assert lean.rehearse is True


def test_a_lean_server_that_died_is_not_started_again() -> None:
    lean = handle_without_a_process()
    lean.alive = True
    forks = servers(None, None)
    forks.lean = lean
    forks.selector = cast(Any, SimpleNamespace(unregister=lambda fd: None))
    lean.fileno = lambda: 99  # type: ignore[method-assign]
    lean.receive = lambda block=False: setattr(lean, "alive", False)  # type: ignore[method-assign]
    lean.sock = cast(Any, SimpleNamespace(close=lambda: None))
    assert forks.on_message(lean) is False
    assert forks.lean is None and forks.lean_lost
    forks.start_lean()  # would fork a new server: it must not
    assert forks.lean is None


@pytest.mark.parametrize(
    ("message", "reseeds"), [({}, True), ({"restored": True}, True), ({"restored": False}, False)]
)
def test_an_init_marks_prepared_children_unless_the_vm_was_only_stopped(
    message: dict[str, Any], reseeds: bool
) -> None:
    marked = []
    agent = Agent.__new__(Agent)
    agent.forks = cast(Any, SimpleNamespace(mark_reseed=lambda: marked.append(True)))
    agent.init(message)  # no clock, no seed: only the marking
    assert bool(marked) is reseeds


def test_unread_stdin_is_bounded_and_then_closed() -> None:
    """Input streamed to a program that does not read it stops at MAX_PENDING_STDIN: the
    program's stdin is closed then (it sees EOF after what it read), the agent keeps nothing."""
    from fission.guest import runs

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    run = execution({})
    run.stdin_fd = write_end
    try:
        chunk = b"x" * (1024 * 1024)
        fed = 0
        while run.stdin_fd >= 0 and fed <= 2 * runs.MAX_PENDING_STDIN:
            run.feed_stdin(chunk)
            fed += len(chunk)
            assert len(run.stdin_buffer) <= runs.MAX_PENDING_STDIN
        assert run.stdin_fd == -1 and not run.stdin_buffer  # closed, nothing kept
        assert fed <= runs.MAX_PENDING_STDIN + 2 * len(chunk)
    finally:
        os.close(read_end)
        if run.stdin_fd >= 0:
            os.close(run.stdin_fd)
