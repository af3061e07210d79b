"""The one error hierarchy of fission.

Every failure fission itself reports is a ``FissionError``; a program that exits non-zero inside a
sandbox is a result, not an error. Each class carries a short ``code`` slug (for the API and
``--json``) and the HTTP status a server answers with::

    FissionError                      internal (500)
    ├── InvalidInput                  invalid_input (400)
    │   ├── UnknownLanguage           unknown_language (400)
    │   └── LimitOutOfRange           limit_out_of_range (400)
    ├── NotReady                      not_ready (503)
    │   ├── ImagesNotBuilt            images_not_built (503)
    │   └── MissingTool               missing_tool (503)
    ├── ImageBuildFailed              image_build_failed (500)
    ├── VMError                       vm_error (500)
    │   ├── VMStartFailed             vm_start_failed (500)
    │   ├── BootTimeout               boot_timeout (504)
    │   └── AgentProtocolError        agent_protocol_error (502)
    ├── Busy                          busy (429)
    ├── Unauthorized                  unauthorized (401)
    ├── Forbidden                     forbidden (403)
    ├── Unsupported                   unsupported (501)
    ├── QuotaExceeded                 quota_exceeded (429)
    ├── PathNotAllowed                path_not_allowed (400)
    ├── NotFound                      not_found (404)
    │   ├── SandboxNotFound           sandbox_not_found (404)
    │   ├── FileNotFound              file_not_found (404)
    │   └── SnapshotNotFound          snapshot_not_found (404)
    ├── Conflict                      conflict (409)
    │   ├── SandboxNotRunning         sandbox_not_running (409)
    │   └── IntegrityError            integrity_error (409)
    └── RequestTimeout                request_timeout (504)
"""

from __future__ import annotations


class FissionError(Exception):
    """Root of every error fission raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(FissionError):
    """The caller asked for something that cannot be done as asked."""

    code = "invalid_input"
    http_status = 400


class UnknownLanguage(InvalidInput):
    """The language name is not one fission knows."""

    code = "unknown_language"


class LimitOutOfRange(InvalidInput):
    """A resource limit is outside the range fission accepts."""

    code = "limit_out_of_range"


class NotReady(FissionError):
    """The host lacks something fission needs before it can run code."""

    code = "not_ready"
    http_status = 503


class ImagesNotBuilt(NotReady):
    """The kernel, initramfs or root image for a language has not been built."""

    code = "images_not_built"


class MissingTool(NotReady):
    """A host program fission needs is not installed."""

    code = "missing_tool"


class ImageBuildFailed(FissionError):
    """Building a kernel, initramfs or root image failed."""

    code = "image_build_failed"


class VMError(FissionError):
    """A microVM failed in a way that is not the user program's doing."""

    code = "vm_error"


class VMStartFailed(VMError):
    """The VMM process could not be started or died while starting."""

    code = "vm_start_failed"


class BootTimeout(VMError):
    """The guest agent did not answer within the boot deadline."""

    code = "boot_timeout"
    http_status = 504


class AgentProtocolError(VMError):
    """The guest sent something that breaks the agent protocol; the VM is destroyed."""

    code = "agent_protocol_error"
    http_status = 502


class Busy(FissionError):
    """No capacity is free within the caller's deadline."""

    code = "busy"
    http_status = 429


class Unauthorized(FissionError):
    """The request carries no API key, or one that is malformed, unknown or revoked."""

    code = "unauthorized"
    http_status = 401


class Unsupported(FissionError):
    """This deployment does not offer the feature (e.g. exposed ports through a fleet front end)."""

    code = "unsupported"
    http_status = 501


class Forbidden(FissionError):
    """The caller is known but its role does not allow this (e.g. an admin-only route)."""

    code = "forbidden"
    http_status = 403


class QuotaExceeded(FissionError):
    """An API key is over one of its own limits (request rate or concurrent sandboxes).

    Unlike ``Busy`` (the whole service is full), this is the caller's limit; ``retry_after`` is
    the seconds until a retry can succeed, or None when only the caller can free capacity.
    """

    code = "quota_exceeded"
    http_status = 429

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PathNotAllowed(InvalidInput):
    """A sandbox file path leaves the sandbox's files (``..``, an absolute path, a symlink)."""

    code = "path_not_allowed"


class NotFound(FissionError):
    """The named thing does not exist."""

    code = "not_found"
    http_status = 404


class SandboxNotFound(NotFound):
    """No sandbox has this id (it never existed, was deleted or expired)."""

    code = "sandbox_not_found"


class FileNotFound(NotFound):
    """No file or directory at this path inside the sandbox."""

    code = "file_not_found"


class PortNotExposed(NotFound):
    """The sandbox's owner has not exposed this port (or unexposed it)."""

    code = "port_not_exposed"


class PortUnreachable(FissionError):
    """Nothing in the sandbox answers on an exposed port (no program listens on it)."""

    code = "port_unreachable"
    http_status = 502


class Conflict(FissionError):
    """The request does not fit the current state of what it names."""

    code = "conflict"
    http_status = 409


class SandboxNotRunning(Conflict):
    """The sandbox is paused (resume it first) or being deleted."""

    code = "sandbox_not_running"


class SnapshotNotFound(NotFound):
    """No snapshot with that id, or not the caller's."""

    code = "snapshot_not_found"


class IntegrityError(Conflict):
    """A saved VM state or disk no longer matches the checksum taken when it was saved."""

    code = "integrity_error"


class RequestTimeout(FissionError):
    """A client gave up waiting for the daemon (its ``request_timeout`` passed)."""

    code = "request_timeout"
    http_status = 504


ERRORS_BY_CODE: dict[str, type[FissionError]] = {
    cls.code: cls
    for cls in (
        FissionError,
        InvalidInput,
        UnknownLanguage,
        LimitOutOfRange,
        NotReady,
        ImagesNotBuilt,
        MissingTool,
        ImageBuildFailed,
        VMError,
        VMStartFailed,
        BootTimeout,
        AgentProtocolError,
        Busy,
        Unauthorized,
        Forbidden,
        Unsupported,
        QuotaExceeded,
        PathNotAllowed,
        NotFound,
        SandboxNotFound,
        FileNotFound,
        Conflict,
        SandboxNotRunning,
        SnapshotNotFound,
        IntegrityError,
        RequestTimeout,
    )
}
