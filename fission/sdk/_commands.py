"""``sandbox.commands``: E2B's names (``run``, ``background=``, a handle to wait on or kill)
over fission's streamed commands. A background command runs on a private event loop in a
thread of its own (the async client's machinery), so that ``kill`` can cancel it cleanly: the
daemon sees the stream close and kills the command in the guest."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fission.sdk._commands_async import killed_error
from fission.sdk._models import OutputCallback, RunResult

if TYPE_CHECKING:
    from fission.sdk._sync import Sandbox


class CommandHandle:
    """A command running in the background (``commands.run(..., background=True)``)."""

    def __init__(self, sandbox: Sandbox, run: dict[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[RunResult] | None = None
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._killed = False
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sandbox, run, started), daemon=True, name="fission-command"
        )
        self._thread.start()
        started.wait()

    def _serve(self, sandbox: Sandbox, run: dict[str, Any], started: threading.Event) -> None:
        from fission.sdk._async import AsyncSandbox

        async def main() -> RunResult:
            box = AsyncSandbox.__new__(AsyncSandbox)
            box._attach(sandbox._conn, sandbox.id)
            try:
                return await box.exec(**run)
            finally:
                await box._http.close()

        try:
            self._task = self._loop.create_task(main())
            started.set()
            self._result = self._loop.run_until_complete(self._task)
        except BaseException as exc:  # the caller gets it from wait()
            self._error = exc
        finally:
            started.set()
            self._loop.close()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait (``timeout`` seconds at most; None: no limit) for the end; its RunResult."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the command did not end within {timeout} s")
        if self._killed:
            raise killed_error()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def kill(self) -> bool:
        """End the command and everything it started; False if it had ended already."""
        if not self._thread.is_alive() or self._task is None:
            return False
        self._killed = True
        task = self._task
        self._loop.call_soon_threadsafe(task.cancel)
        self._thread.join()
        return True


class Commands:
    """Commands of one sandbox (``sandbox.commands``), under the names E2B users know."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(
        self,
        cmd: str | builtins.list[str],
        *,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> RunResult | CommandHandle:
        """Run a shell line (or an argv); its RunResult, or with ``background`` a handle.

        ``timeout``: seconds (default: the sandbox's). ``on_stdout``/``on_stderr`` get each
        chunk (bytes) as it is printed. Unlike E2B, a non-zero exit is a result, not an error.
        """
        run: dict[str, Any] = {
            "command": cmd,
            "env": envs,
            "cwd": cwd,
            "timeout": timeout,
            "on_stdout": on_stdout,
            "on_stderr": on_stderr,
        }
        if not background:
            return self._sandbox.exec(**run)
        return CommandHandle(self._sandbox, run)
