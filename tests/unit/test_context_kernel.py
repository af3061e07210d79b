"""The code-context kernel's pure parts: cells, their display value, errors and context ids."""

from __future__ import annotations

import builtins
import json
import socket
from typing import Any

import pytest

from fission.guest import context
from fission.guest.context import Context, check_context_id, compile_cell, run_cell
from fission.guest.protocol import AgentError


def namespace() -> dict[str, Any]:
    return {"__name__": "__main__", "__builtins__": builtins}


def test_state_survives_between_cells(capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace()
    assert run_cell("x = 41", ns, "<cell 1>") == 0
    assert run_cell("import math\ndef f(n):\n    return math.factorial(n)", ns, "<cell 2>") == 0
    assert run_cell("x + 1", ns, "<cell 3>") == 0
    assert run_cell("f(4)", ns, "<cell 4>") == 0
    assert capsys.readouterr().out == "42\n24\n"


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("1 + 1", "2\n"),
        ("'text'", "'text'\n"),
        ("None", ""),
        ("print('once')", "once\n"),
        ("x = 3", ""),
        ("x = 3\nx * 2", "6\n"),
        ("for i in range(2):\n    i", ""),
        ("", ""),
        ("# only a comment", ""),
        ("[1, 2]\n[3]", "[3]\n"),
    ],
)
def test_only_a_last_expression_is_shown(
    source: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cell(source, namespace(), "<cell>") == 0
    assert capsys.readouterr().out == shown


def test_compile_cell_splits_off_the_last_expression() -> None:
    body, last = compile_cell("a = 1\na + 1", "<c>")
    ns = namespace()
    exec(body, ns)
    assert last is not None and eval(last, ns) == 2
    assert compile_cell("a = 1", "<c>")[1] is None


def test_an_exception_prints_only_the_users_frames(capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace()
    assert run_cell("def g():\n    return 1 / 0", ns, "<cell 1>") == 0
    assert run_cell("g()", ns, "<cell 2>") == 1
    err = capsys.readouterr().err
    assert err.startswith('Traceback (most recent call last):\n  File "<cell 2>"')
    assert "return 1 / 0" in err  # the earlier cell's source is still known
    assert "ZeroDivisionError" in err and "context.py" not in err
    assert run_cell("g", ns, "<cell 3>") == 0  # the namespace survived


def test_syntax_errors_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace()
    assert run_cell("x = (", ns, "<cell 1>") == 1
    assert "SyntaxError" in capsys.readouterr().err
    assert run_cell("raise SystemExit(3)", ns, "<cell 2>") == 3
    assert run_cell("raise SystemExit", ns, "<cell 3>") == 0
    assert run_cell("raise SystemExit('bye')", ns, "<cell 4>") == 1
    assert "bye" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a", "ctx-1", "A.b_c", "x" * 64])
def test_good_context_ids(name: str) -> None:
    assert check_context_id(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "é", None, 3, "a\n", ["a"]])
def test_bad_context_ids(name: object) -> None:
    with pytest.raises(AgentError, match="context id"):
        check_context_id(name)


def test_the_agent_side_reads_done_messages_and_notices_a_dead_kernel() -> None:
    agent_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctx = Context("c", 1, "/nonexistent", agent_end, warm=True)
    try:
        assert ctx.receive() is None and ctx.alive  # nothing there yet
        kernel_end.send(context.WAITING)
        assert ctx.receive() is None and ctx.alive  # a fork-server child's notice
        kernel_end.send(json.dumps({"done": 7}).encode())
        assert ctx.receive() == 7 and ctx.alive
        kernel_end.send(json.dumps({"done": 999}).encode())
        assert ctx.receive() is None and not ctx.alive  # garbled: the kernel is given up
        ctx.alive = True
        kernel_end.close()
        assert ctx.receive() is None and not ctx.alive
    finally:
        agent_end.close()
        kernel_end.close()
