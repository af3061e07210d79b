"""Connect RPC helpers: fission's errors as the codes E2B's SDK maps to exceptions; ``oneof``."""

from __future__ import annotations

from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from fission.errors import (
    Busy,
    Conflict,
    FileNotFound,
    FissionError,
    InvalidInput,
    PathNotAllowed,
    QuotaExceeded,
    RequestTimeout,
    SandboxNotFound,
    Unauthorized,
)

# Most specific first: PathNotAllowed is an InvalidInput, FileNotFound a NotFound.
CODES: tuple[tuple[type[FissionError], Code], ...] = (
    (SandboxNotFound, Code.NOT_FOUND),
    (FileNotFound, Code.NOT_FOUND),
    (PathNotAllowed, Code.PERMISSION_DENIED),
    (InvalidInput, Code.INVALID_ARGUMENT),
    (Unauthorized, Code.UNAUTHENTICATED),
    (QuotaExceeded, Code.RESOURCE_EXHAUSTED),
    (Busy, Code.RESOURCE_EXHAUSTED),
    (Conflict, Code.FAILED_PRECONDITION),
    (RequestTimeout, Code.DEADLINE_EXCEEDED),
)


def rpc_error(exc: FissionError) -> ConnectError:
    """The ConnectError for ``exc`` (INTERNAL for anything not in ``CODES``)."""
    for cls, code in CODES:
        if isinstance(exc, cls):
            return ConnectError(code, str(exc))
    return ConnectError(Code.INTERNAL, str(exc))


def oneof(name: str, value: Any) -> Any:
    """A oneof field's value (typed loosely: the generated classes want each name a literal)."""
    return Oneof(name, value)
