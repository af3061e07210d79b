"""Stateful Python code contexts: a long-lived interpreter per context id, like a notebook kernel.

Guest side, stdlib only. A run that names a context executes its script in that context's
process, in globals that survive between runs; the last statement, if it is an expression whose
value is not None, has its repr printed (as a notebook displays it); an uncaught exception
prints its traceback and gives exit code 1 but keeps the context. The process is confined like
any run (sandbox user, cgroup of its own with the run's limits); it is a fork-server child when
one is waiting (numpy and pandas already imported), else ``python3 context.py FD``. If the
process dies (the run's timeout, OOM, ``os._exit``) the context is lost and the next run in
that id starts afresh, which its EXIT reports as ``context_reset``.

Agent <-> kernel, over a SOCK_SEQPACKET socket, JSON:
  agent -> fork-server child  {"context": true, "reseed": bool}   become a kernel, not run once
  agent -> kernel  {"path", "env", "cwd"} + fds [stdin, stdout, stderr]   run one script
  kernel -> agent  {"done": exit_code}   after closing its copies of the run's streams
The agent closing the socket ends the kernel.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import linecache
import os
import re
import selectors
import signal
import socket
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

if __package__:
    from . import confine
    from .protocol import INVALID_INPUT, AgentError
else:  # run as a script inside the guest, with its modules beside it
    import confine  # type: ignore[no-redef]
    from protocol import INVALID_INPUT, AgentError  # type: ignore[no-redef]

MAX_MESSAGE = 64 * 1024
WAITING = b"W"  # what a fork-server child sends once confined and warmed up
MAX_CONTEXTS = 16
CONTEXT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
KERNEL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def check_context_id(name: object) -> str:
    """The context id if well formed (1-64 of ``A-Za-z0-9_.-``), else AgentError."""
    if not isinstance(name, str) or not CONTEXT_ID.match(name):
        raise AgentError(
            INVALID_INPUT, f"bad context id {name!r}: use 1 to 64 letters, digits, '_', '.', '-'"
        )
    return name


# -- inside the kernel ------------------------------------------------------------------------
def compile_cell(source: str, filename: str) -> tuple[types.CodeType, types.CodeType | None]:
    """The cell's code, split off its last statement when that is an expression."""
    tree = ast.parse(source, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        del tree.body[-1]
    body = compile(tree, filename, "exec")
    return body, None if last is None else compile(last, filename, "eval")


def user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback without the kernel's own frames at its top."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def run_cell(source: str, namespace: dict[str, Any], filename: str) -> int:
    """Run ``source`` in ``namespace``, print the last expression's repr; return the exit code."""
    # Registered so tracebacks show source lines of this cell, now and in later runs.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        body, last = compile_cell(source, filename)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
    except SystemExit as exc:
        return confine.exit_code_of(exc)
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, user_traceback(exc.__traceback__))
        return 1
    return 0


def serve(sock: socket.socket) -> None:
    """Run scripts sent over ``sock`` in one namespace until the agent closes it; never returns."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.modules.pop("context", None)  # leave the name to the user's own module
    sys.path[0] = ""  # imports from the working directory, as in a notebook
    null = os.open(os.devnull, os.O_RDWR)
    cells = 0
    while True:
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 3)
        if not message or len(fds) != 3:
            os._exit(0)
        request = json.loads(message)
        confine.attach_stdio(fds[0], fds[1], fds[2])
        env = request["env"]
        os.environ.clear()
        os.environ.update(env)
        try:
            os.chdir(request["cwd"])
        except OSError as exc:
            print(f"fission: cannot enter {request['cwd']}: {exc}", file=sys.stderr)
        confine.fresh_stdio(env)
        confine.add_user_site(env)
        cells += 1
        with open(request["path"], encoding="utf-8") as f:
            source = f.read()
        code = run_cell(source, main.__dict__, f"<cell {cells}>")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        for fd in (0, 1, 2):  # the run's pipes close here, so the agent sees their end
            os.dup2(null, fd)
        sock.send(json.dumps({"done": code}).encode())


def main() -> None:
    """Entry point of an exec'd kernel: ``context.py FD``."""
    try:
        serve(socket.socket(fileno=int(sys.argv[1])))
    except BaseException:
        os._exit(1)


# -- the agent's side -------------------------------------------------------------------------
class Context:
    """The agent's handle on one context's kernel process."""

    def __init__(self, name: str, pid: int, cgroup: str, sock: socket.socket, warm: bool):
        self.name = name
        self.pid = pid
        self.cgroup = cgroup
        self.sock = sock
        self.warm = warm  # started from a fork-server child (preloads imported)
        self.alive = True
        self.execution: Any = None  # the run in progress, if any

    def begin(self, request: dict[str, Any], fds: list[int]) -> None:
        """Send one run (script path, env, cwd) with its three streams."""
        socket.send_fds(self.sock, [json.dumps(request).encode()], fds)

    def receive(self) -> int | None:
        """The exit code of the finished run, or None; a closed or garbled socket ends ``alive``."""
        try:
            data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data == WAITING:  # a fork-server child's notice that it is ready: nothing to do
            return None
        try:
            code = json.loads(data)["done"] if data else None
        except (ValueError, TypeError, KeyError):
            code = None
        if type(code) is int and 0 <= code <= 255:
            return code
        self.alive = False
        return None

    def kill(self) -> None:
        """Kill every process of the context (its whole cgroup)."""
        try:
            with open(os.path.join(self.cgroup, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


def spawn_kernel(cgroup: str) -> tuple[int, socket.socket]:
    """Start ``python3 context.py FD`` confined in the new cgroup ``cgroup``: (pid, socket).

    A fresh interpreter seeds its generators from the kernel: no reseeding needed.
    """
    confine.new_cgroup(cgroup)
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            parent_end.close()
            fd = child_end.fileno()
            confine.confine_process(os.path.join(cgroup, "cgroup.procs"), keep_fds=(fd,))
            os.set_inheritable(fd, True)
            argv = [sys.executable, "-E", "-s", os.path.abspath(__file__), str(fd)]
            os.execve(sys.executable, argv, {"PATH": KERNEL_PATH})
        finally:
            os._exit(127)
    confine.move_to_cgroup(cgroup, pid)  # a kill of the context from now on reaches it
    child_end.close()
    return pid, parent_end


class Contexts:
    """The agent's live contexts by id, and the ids whose process was lost."""

    def __init__(
        self, selector: selectors.BaseSelector, remove_cgroup: Callable[[str], None]
    ) -> None:
        self.selector = selector
        self.remove_cgroup = remove_cgroup
        self.live: dict[str, Context] = {}
        self.lost: set[str] = set()

    def enter(self, execution: Any, take_warm: Callable[[], Any]) -> Context:
        """The context ``execution`` names: the live one, or a new one in its place.

        Sets the run's ``warm`` (an interpreter was waiting) and ``context_reset`` (the id's
        previous process was lost, so this run starts afresh).
        """
        name = execution.context
        ctx = self.live.get(name)
        if ctx is not None and ctx.execution is not None:
            raise AgentError(
                INVALID_INPUT,
                f"context {name!r} is busy with request {ctx.execution.request_id}: "
                "wait for that run or use another context",
            )
        if ctx is not None and execution.fresh_context:
            self.end(ctx, lost=False)
            ctx = None
        if ctx is not None:
            execution.warm = True
            return ctx
        if len(self.live) >= MAX_CONTEXTS:
            raise AgentError(
                INVALID_INPUT, f"{MAX_CONTEXTS} contexts are open: drop one before starting another"
            )
        execution.context_reset = name in self.lost and not execution.fresh_context
        ctx = self.start(name, take_warm(), execution.cgroup)
        execution.warm = ctx.warm
        return ctx

    def on_event(self, ctx: Context) -> None:
        """A kernel finished a run, or went away (then its processes are killed)."""
        code = ctx.receive()
        execution = ctx.execution
        if code is not None and execution is not None and execution.status is None:
            execution.keep_processes = True
            execution.set_status(code << 8, "status_read")  # as a wait status: exited with code
        elif not ctx.alive:
            # Without its socket a kernel is useless; a run in it ends when the kill lands.
            self.end(ctx, lost=True)

    def start(self, name: str, warm_child: Any, cgroup: str) -> Context:
        """A new context: the fork-server child ``warm_child`` if given, else an exec'd kernel."""
        if warm_child is not None:
            sock = warm_child.sock
            sock.send(json.dumps({"context": True, "reseed": warm_child.reseed}).encode())
            confine.wake(warm_child.pid)
            ctx = Context(name, warm_child.pid, warm_child.cgroup, sock, warm=True)
        else:
            pid, sock = spawn_kernel(cgroup)
            ctx = Context(name, pid, cgroup, sock, warm=False)
        self.live[name] = ctx
        self.lost.discard(name)
        self.selector.register(ctx.sock.fileno(), selectors.EVENT_READ, ("context", ctx))
        return ctx

    def end(self, ctx: Context, lost: bool) -> None:
        """Forget ``ctx`` and kill its processes; ``lost`` marks its id for a context_reset."""
        if self.live.get(ctx.name) is ctx:
            del self.live[ctx.name]
            if lost:
                self.lost.add(ctx.name)
        if ctx.sock.fileno() >= 0:
            self.selector.unregister(ctx.sock.fileno())
            ctx.sock.close()
        ctx.alive = False
        ctx.kill()
        if ctx.execution is None:
            self.remove_cgroup(ctx.cgroup)

    def drop(self, name: str) -> bool:
        """End the context ``name`` (and any run in it); False if there was none."""
        self.lost.discard(name)
        ctx = self.live.get(name)
        if ctx is None:
            return False
        self.end(ctx, lost=False)
        return True


if __name__ == "__main__":
    main()
