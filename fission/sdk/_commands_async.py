"""``sandbox.commands`` for asyncio: E2B's names (``run``, ``background=``, a handle to wait
on or kill) over fission's streamed commands. ``_commands`` is the blocking twin."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fission.errors import FissionError
from fission.sdk._models import AsyncOutputCallback, RunResult

if TYPE_CHECKING:
    from fission.sdk._async import AsyncSandbox


def killed_error() -> FissionError:
    """What waiting on a killed command raises."""
    return FissionError("the command was killed (its handle's kill()): it has no result")


class AsyncCommandHandle:
    """A command running in the background (``commands.run(..., background=True)``)."""

    def __init__(self, sandbox: AsyncSandbox, run: dict[str, Any]) -> None:
        self._task = asyncio.ensure_future(sandbox.exec(**run))
        self._killed = False

    async def wait(self, timeout: float | None = None) -> RunResult:
        """Wait (``timeout`` seconds at most; None: no limit) for the end; its RunResult."""
        if self._killed:
            raise killed_error()
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            raise TimeoutError(f"the command did not end within {timeout} s") from None

    async def kill(self) -> bool:
        """End the command and everything it started; False if it had ended already."""
        if self._task.done():
            return False
        self._killed = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return True


class AsyncCommands:
    """Commands of one sandbox (``sandbox.commands``), under the names E2B users know."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(
        self,
        cmd: str | builtins.list[str],
        *,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> RunResult | AsyncCommandHandle:
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
            return await self._sandbox.exec(**run)
        return AsyncCommandHandle(self._sandbox, run)
