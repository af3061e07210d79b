"""`fission shell SANDBOX`: the sandbox's shell in this terminal, until it exits or ``~.``.

The local terminal goes into raw mode (every key goes to the sandbox's shell, Ctrl-C included)
and is put back on every way out: the shell's exit, ``~.``, a lost daemon, SIGTERM or SIGHUP.
A window size change (SIGWINCH) resizes the remote terminal. As in ssh, ``~.`` typed at the start
of a line leaves (the shell is hung up), and ``~~`` sends one ``~``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from fission.cli.errors import EXIT_FISSION_FAILED, abort
from fission.errors import FissionError

ESCAPE = b"~"
LEAVE = b"."
LINE_ENDS = (b"\r", b"\n")
READ_SIZE = 4096
POLL_SECONDS = 0.2  # how often the key loop checks that the shell is still there


class EscapeReader:
    """Spots ``~.`` at the start of a line in the keys typed; passes everything else on."""

    def __init__(self) -> None:
        self.line_start = True
        self.held = False  # a ``~`` at a line's start, waiting for the next key

    def feed(self, keys: bytes) -> tuple[bytes, bool]:
        """(what to send to the shell, whether the user asked to leave)."""
        out = bytearray()
        for value in keys:
            key = bytes([value])
            if self.held:
                self.held = False
                if key == LEAVE:
                    return bytes(out), True
                out += key if key == ESCAPE else ESCAPE + key
            elif self.line_start and key == ESCAPE:
                self.held = True
                continue
            else:
                out += key
            self.line_start = key in LINE_ENDS
        return bytes(out), False


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on ``fd`` for the block, restored however it ends (also on SIGTERM, SIGHUP)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)

    def leave(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def window_size() -> tuple[int, int]:
    """This terminal's (cols, rows)."""
    size = shutil.get_terminal_size((80, 24))
    return size.columns, size.lines


def shell_command(
    sandbox: Annotated[str, typer.Argument(help="The sandbox's id.", show_default=False)],
    url: Annotated[
        str | None,
        typer.Option(help="The daemon: http://HOST:PORT or unix:/PATH (else FISSION_URL)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="An API key for a TCP daemon (else FISSION_API_KEY).")
    ] = None,
) -> None:
    """Open a shell in SANDBOX in this terminal; ~. at the start of a line leaves."""
    from fission.sdk._connection import resolve_connection
    from fission.sdk._pty import Terminal

    try:
        conn = resolve_connection(url, api_key)
        cols, rows = window_size()
        terminal = Terminal._open(conn, sandbox, cols, rows)
    except FissionError as exc:
        abort(exc)
    with terminal:
        code = attach(terminal)
    raise SystemExit(code)


def attach(terminal: Any) -> int:
    """Relay this terminal and the sandbox's until the shell exits (its code) or ``~.`` (0)."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    ended = threading.Event()
    failure: list[FissionError] = []

    def show_output() -> None:
        try:
            while data := terminal.read():
                os.write(stdout, data)
        except FissionError as exc:
            failure.append(exc)
        except OSError:
            pass
        finally:
            ended.set()

    def on_resize(*_: Any) -> None:
        with contextlib.suppress(Exception):
            terminal.resize(*window_size())

    previous = signal.signal(signal.SIGWINCH, on_resize)
    reader = threading.Thread(target=show_output, name="fission-shell-output", daemon=True)
    escapes = EscapeReader()
    left = False
    try:
        with raw_terminal(stdin):
            reader.start()
            while not ended.is_set():
                ready, _, _ = select.select([stdin], [], [], POLL_SECONDS)
                if not ready:
                    continue
                keys = os.read(stdin, READ_SIZE)
                if not keys:
                    break  # stdin closed: leave as ~. would
                data, left = escapes.feed(keys)
                if data:
                    terminal.send(data)
                if left:
                    break
    finally:
        signal.signal(signal.SIGWINCH, previous)
    if failure:
        abort(failure[0])
    if left or not ended.is_set():
        sys.stderr.write("fission: left the shell (it was hung up)\n")
        return 0
    if terminal.exit_code is None:
        sys.stderr.write("fission: the shell ended with its sandbox (it stopped or was deleted)\n")
        return EXIT_FISSION_FAILED
    return int(terminal.exit_code)
