"""Terminals without a VM: ``fission shell``'s escape keys, the WebSocket's control messages,
the guest's exit codes."""

from __future__ import annotations

import os
import signal

import pytest

from fission.cli.shell import EscapeReader
from fission.errors import InvalidInput
from fission.guest.tunnel import exit_code_of
from fission.server.pty_api import parse_control


@pytest.mark.parametrize(
    ("typed", "sent", "leave"),
    [
        (b"~.", b"", True),  # at the start of the session
        (b"ls\r~.", b"ls\r", True),
        (b"a~.", b"a~.", False),  # not at a line's start: passed on
        (b"~~", b"~", False),
        (b"\n~x", b"\n~x", False),
    ],
)
def test_escape_only_at_a_line_start(typed: bytes, sent: bytes, leave: bool) -> None:
    assert EscapeReader().feed(typed) == (sent, leave)


def test_escape_split_across_reads() -> None:
    reader = EscapeReader()
    assert reader.feed(b"echo\r~") == (b"echo\r", False)
    assert reader.feed(b".") == (b"", True)


def test_control_messages() -> None:
    assert parse_control('{"type": "resize", "cols": 120, "rows": 40}') == (120, 40)
    for bad in ("nope", '{"type": "paste"}', '{"type": "resize", "cols": 0, "rows": 5}'):
        with pytest.raises(InvalidInput):
            parse_control(bad)


def test_exit_codes_as_a_shell_reports_them() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert exit_code_of(os.waitpid(pid, 0)[1]) == 7
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    assert exit_code_of(os.waitpid(pid, 0)[1]) == 128 + signal.SIGKILL
