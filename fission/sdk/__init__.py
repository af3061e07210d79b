"""The Python SDK: one-shot runs and persistent sandboxes, through the fission daemon.

::

    import fission

    result = fission.run("print(6 * 7)")              # a fresh microVM, destroyed after
    with fission.sandbox("python", ttl=600) as s:     # one VM for many runs, deleted at the end
        s.run("x = 6 * 7", context="main")
        s.exec("ls -la", on_stdout=sys.stdout.buffer.write)
        s.files.write("data.csv", b"a,b\\n1,2\\n")
    async with fission.AsyncSandbox("python") as s:   # the same methods, awaited
        await s.run("print(1)")

Durations are seconds and never share a name: ``ttl`` is a sandbox's life, ``timeout`` one
run's or command's, ``request_timeout`` one HTTP call's. The daemon is at ``url`` (else
``FISSION_URL``, else the local socket of ``fission serve``); ``api_key`` (else
``FISSION_API_KEY``) is needed on TCP. Every failure is a ``FissionError`` from
``fission.errors`` (re-exported here), mapped from the daemon's error codes; a program that
exits non-zero is a ``RunResult``, not an error.
"""

from fission.errors import (
    AgentProtocolError,
    BootTimeout,
    Busy,
    Conflict,
    FileNotFound,
    FissionError,
    Forbidden,
    ImageBuildFailed,
    ImagesNotBuilt,
    IntegrityError,
    InvalidInput,
    LimitOutOfRange,
    MissingTool,
    NotFound,
    NotReady,
    PathNotAllowed,
    PortNotExposed,
    PortUnreachable,
    QuotaExceeded,
    RequestTimeout,
    SandboxNotFound,
    SandboxNotRunning,
    SnapshotNotFound,
    Unauthorized,
    UnknownLanguage,
    Unsupported,
    VMError,
    VMStartFailed,
)
from fission.sdk._async import AsyncFiles, AsyncSandbox
from fission.sdk._commands import CommandHandle, Commands
from fission.sdk._commands_async import AsyncCommandHandle, AsyncCommands
from fission.sdk._models import (
    AsyncOutputCallback,
    ExposedPort,
    FileInfo,
    OutputCallback,
    OutputEvent,
    PortToken,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
    StreamEvent,
    WatchEvent,
)
from fission.sdk._oneshot import run
from fission.sdk._pty import AsyncTerminal, Terminal
from fission.sdk._sync import Files, Sandbox
from fission.sdk._watch import WatchStream
from fission.sdk._watch_async import AsyncWatchStream

sandbox = Sandbox.create
"""Create a sandbox now; ``with fission.sandbox(...) as s:`` deletes it at the end."""

__all__ = [
    "AgentProtocolError",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncOutputCallback",
    "AsyncSandbox",
    "AsyncTerminal",
    "AsyncWatchStream",
    "BootTimeout",
    "Busy",
    "CommandHandle",
    "Commands",
    "Conflict",
    "ExposedPort",
    "FileInfo",
    "FileNotFound",
    "Files",
    "FissionError",
    "Forbidden",
    "ImageBuildFailed",
    "ImagesNotBuilt",
    "IntegrityError",
    "InvalidInput",
    "LimitOutOfRange",
    "MissingTool",
    "NotFound",
    "NotReady",
    "OutputCallback",
    "OutputEvent",
    "PathNotAllowed",
    "PortNotExposed",
    "PortToken",
    "PortUnreachable",
    "QuotaExceeded",
    "RequestTimeout",
    "RunResult",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SnapshotInfo",
    "SnapshotNotFound",
    "StreamEvent",
    "Terminal",
    "Unauthorized",
    "UnknownLanguage",
    "Unsupported",
    "VMError",
    "VMStartFailed",
    "WatchEvent",
    "WatchStream",
    "run",
    "sandbox",
]
