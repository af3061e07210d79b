"""fission errors as MCP tool errors: the one place the MCP adapter converts them.

A ``FissionError`` raised by a tool becomes a ``ToolError``, which the SDK returns to the client
as a result with ``isError`` set and the text ``<code>: <message>``, followed for some codes by
the tool to call next. Anything else a tool raises is a crash: the SDK logs it and the client
sees only ``Error executing tool <name>``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from mcp.server.mcpserver.exceptions import ToolError

from fission.errors import FissionError

P = ParamSpec("P")
T = TypeVar("T")

# What an LLM should do next, in the tools' own terms; the core's message says what was wrong.
NEXT_STEP = {
    "sandbox_not_found": "Create a new one with sandbox_create; sandbox_list shows the live ones.",
    "sandbox_not_running": "Call sandbox_resume, then retry.",
    "file_not_found": "sandbox_list_files shows what exists.",
    "path_not_allowed": "Use a path under /home/sandbox (relative paths start there).",
    "busy": "Retry later, or delete or pause sandboxes you no longer need.",
    "quota_exceeded": "Delete sandboxes you no longer need, then retry.",
    "images_not_built": "The operator must run `fission images build` on the MCP server's host.",
    "missing_tool": "The operator must run `make setup` on the MCP server's host.",
}


def tool_error(error: FissionError) -> ToolError:
    """The ToolError an MCP client sees for ``error``: its code, message and next step."""
    text = f"{error.code}: {error.message}"
    step = NEXT_STEP.get(error.code)
    if step:
        text = f"{text}. {step}" if text[-1:] not in ".!?" else f"{text} {step}"
    return ToolError(text)


def translating_errors(tool: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``tool`` with every FissionError it raises turned into a ToolError."""

    @functools.wraps(tool)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await tool(*args, **kwargs)
        except FissionError as exc:
            raise tool_error(exc) from exc

    return wrapper
