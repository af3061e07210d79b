"""Terminals: a shell in a sandbox over the daemon's WebSocket (``/v1/sandboxes/{id}/pty``).

``Terminal`` (blocking) and ``AsyncTerminal`` share the message handling here; only their I/O
differs (the ``websockets`` library's sync and asyncio clients, over TCP or the Unix socket).
Binary messages are the terminal's bytes; the daemon's text messages say how it ended
(``exit``) or why it was refused (``error``, raised as the same ``FissionError`` as on other
routes); opening one waits for the daemon's ``ready`` (the shell started) or its refusal.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from fission.errors import FissionError, RequestTimeout
from fission.sdk._connection import Connection
from fission.sdk._requests import error_from_response, sandbox_path

REFUSAL_BASE = 4000  # the daemon closes a refused terminal with this + an HTTP status


def pty_target(conn: Connection, sandbox_id: str, cols: int, rows: int) -> str:
    """The WebSocket URL of a sandbox's terminal."""
    query = urlencode({"cols": cols, "rows": rows})
    path = sandbox_path(sandbox_id, "/pty") + "?" + query
    return "ws" + conn.base_url.removeprefix("http") + path


def resize_message(cols: int, rows: int) -> str:
    """The control message that resizes the terminal."""
    return json.dumps({"type": "resize", "cols": cols, "rows": rows})


def as_bytes(data: bytes | str) -> bytes:
    """Keystrokes as bytes (text is sent as UTF-8)."""
    return data.encode() if isinstance(data, str) else bytes(data)


class _TerminalState:
    """What both clients remember: how the shell ended, and reading the daemon's messages."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.exit_code: int | None = None  # the shell's, once it exited
        self.ended = False
        self.ready = False  # the daemon said the shell started

    def _take(self, message: str | bytes) -> bytes | None:
        """Output bytes, or None for a control message (``exit`` ends; ``error`` raises)."""
        if isinstance(message, bytes):
            return message
        body: Any = json.loads(message)
        if body.get("type") == "ready":
            self.ready = True
        elif body.get("type") == "exit":
            self.exit_code = body.get("exit_code")
            self.ended = True
        elif body.get("type") == "error":
            raise error_from_response(
                400, json.dumps({"error": body.get("error")}).encode(), {}, self._conn.where
            )
        return None

    def _closed(self, code: int | None, reason: str) -> FissionError | None:
        """The error a close code stands for, or None when the terminal just ended."""
        self.ended = True
        if code is not None and code >= REFUSAL_BASE:
            error = {"code": "refused", "message": reason or f"refused ({code})"}
            return error_from_response(
                code - REFUSAL_BASE, json.dumps({"error": error}).encode(), {}, self._conn.where
            )
        return None

    def _lost(self) -> FissionError:
        return FissionError(f"the daemon at {self._conn.where} closed the terminal at once")

    def _timeout(self, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"the terminal sent nothing for {timeout:g} s: raise read's timeout, or wait longer"
        )


class Terminal(_TerminalState):
    """A shell on a terminal in a sandbox (blocking): ``send`` keystrokes, ``read`` the screen's
    bytes, ``resize``, ``close``; a context manager. ``exit_code`` is set once the shell exits."""

    def __init__(self, conn: Connection, ws: Any) -> None:
        super().__init__(conn)
        self._ws = ws
        self._pending: list[bytes] = []

    @classmethod
    def _open(cls, conn: Connection, sandbox_id: str, cols: int, rows: int) -> Terminal:
        """Open a terminal; the daemon's refusal raised as its FissionError."""
        from websockets.sync.client import connect, unix_connect

        uri = pty_target(conn, sandbox_id, cols, rows)
        try:
            if conn.socket is not None:
                ws = unix_connect(
                    str(conn.socket), uri, additional_headers=conn.headers, max_size=None
                )
            else:
                ws = connect(uri, additional_headers=conn.headers, max_size=None)
        except OSError as exc:
            raise FissionError(f"cannot open a terminal at {conn.where}: {exc}") from exc
        # Entered as a context manager here (websockets 17 warns otherwise); ``close`` leaves it.
        terminal = cls(conn, ws.__enter__())
        terminal._pending = terminal._first_refusal()
        return terminal

    def _first_refusal(self) -> list[bytes]:
        """Wait for the daemon's ``ready`` (the shell started); its refusal raised."""
        from websockets.exceptions import ConnectionClosed

        try:
            while not self.ready:
                data = self._take(self._ws.recv(timeout=self._conn.request_timeout))
                if data:
                    return [data]
        except TimeoutError:
            self._ws.close()
            raise self._timeout(self._conn.request_timeout) from None
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
            raise self._closed(code, reason) or self._lost() from None
        except FissionError:
            self._ws.close()
            raise
        return []

    def send(self, data: bytes | str) -> None:
        """Type ``data`` into the terminal (text is sent as UTF-8; b"\\x03" is Ctrl-C)."""
        self._ws.send(as_bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """Tell the shell its window is now ``cols`` x ``rows`` (it gets SIGWINCH)."""
        self._ws.send(resize_message(cols, rows))

    def read(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the shell ended. ``timeout`` (seconds, None: no
        limit) raises RequestTimeout when nothing comes in time."""
        from websockets.exceptions import ConnectionClosed

        if self._pending:
            return self._pending.pop(0)
        while not self.ended:
            try:
                message = self._ws.recv(timeout=timeout)
            except TimeoutError:
                raise self._timeout(timeout or 0) from None
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
                error = self._closed(code, reason)
                if error is not None:
                    raise error from None
                return b""
            data = self._take(message)
            if data:
                return data
        return b""

    def wait(self, timeout: float | None = None) -> int | None:
        """Read (and drop) output until the shell exits; its exit code."""
        while self.read(timeout):
            pass
        return self.exit_code

    def close(self) -> None:
        """Hang the terminal up (the shell and what it started are killed); safe twice."""
        self._ws.close()
        self.ended = True

    def __enter__(self) -> Terminal:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncTerminal(_TerminalState):
    """A shell on a terminal in a sandbox (asyncio): ``async with await sandbox.pty() as
    term``. The same methods as ``Terminal``, awaited."""

    def __init__(self, conn: Connection, ws: Any) -> None:
        super().__init__(conn)
        self._ws = ws
        self._pending: list[bytes] = []

    @classmethod
    async def _open(cls, conn: Connection, sandbox_id: str, cols: int, rows: int) -> AsyncTerminal:
        """Open a terminal; the daemon's refusal raised as its FissionError."""
        from websockets.asyncio.client import connect, unix_connect

        uri = pty_target(conn, sandbox_id, cols, rows)
        try:
            if conn.socket is not None:
                ws = await unix_connect(
                    str(conn.socket), uri, additional_headers=conn.headers, max_size=None
                )
            else:
                ws = await connect(uri, additional_headers=conn.headers, max_size=None)
        except OSError as exc:
            raise FissionError(f"cannot open a terminal at {conn.where}: {exc}") from exc
        terminal = cls(conn, ws)
        await terminal._first_refusal()
        return terminal

    async def _first_refusal(self) -> None:
        """Wait for the daemon's ``ready`` (the shell started); its refusal raised."""
        import asyncio

        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(self._conn.request_timeout):
                while not self.ready:
                    data = self._take(await self._ws.recv())
                    if data:
                        self._pending.append(data)
                        return
        except TimeoutError:
            await self._ws.close()
            raise self._timeout(self._conn.request_timeout) from None
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
            raise self._closed(code, reason) or self._lost() from None
        except FissionError:
            await self._ws.close()
            raise

    async def send(self, data: bytes | str) -> None:
        """Type ``data`` into the terminal (text is sent as UTF-8; b"\\x03" is Ctrl-C)."""
        await self._ws.send(as_bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell the shell its window is now ``cols`` x ``rows`` (it gets SIGWINCH)."""
        await self._ws.send(resize_message(cols, rows))

    async def read(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the shell ended. ``timeout`` (seconds, None: no
        limit) raises RequestTimeout when nothing comes in time."""
        import asyncio

        from websockets.exceptions import ConnectionClosed

        if self._pending:
            return self._pending.pop(0)
        while not self.ended:
            try:
                async with asyncio.timeout(timeout):
                    message = await self._ws.recv()
            except TimeoutError:
                raise self._timeout(timeout or 0) from None
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
                error = self._closed(code, reason)
                if error is not None:
                    raise error from None
                return b""
            data = self._take(message)
            if data:
                return data
        return b""

    async def wait(self, timeout: float | None = None) -> int | None:
        """Read (and drop) output until the shell exits; its exit code."""
        while await self.read(timeout):
            pass
        return self.exit_code

    async def close(self) -> None:
        """Hang the terminal up (the shell and what it started are killed); safe twice."""
        await self._ws.close()
        self.ended = True

    async def __aenter__(self) -> AsyncTerminal:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
