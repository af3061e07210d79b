"""The SDK's value types: output events, sandbox facts and file facts (frozen dataclasses)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fission.core.spec import RunResult

__all__ = [
    "AsyncOutputCallback",
    "FileInfo",
    "OutputCallback",
    "OutputEvent",
    "RunResult",
    "SandboxInfo",
    "SnapshotInfo",
    "StreamEvent",
]


@dataclass(frozen=True)
class OutputEvent:
    """One chunk a program printed: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: str
    data: bytes


StreamEvent = OutputEvent | RunResult
"""What ``run_stream`` and ``exec_stream`` yield: output chunks in order, then one RunResult."""

OutputCallback = Callable[[bytes], object]
"""Called with each chunk of one stream as it arrives."""

AsyncOutputCallback = Callable[[bytes], object | Awaitable[object]]
"""Like OutputCallback; the async SDK awaits what it returns when that is awaitable."""


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched directory (``files.watch``); paths are relative to it.

    ``type`` is create, modify, delete, move (``to``: the new name, when it stays under the
    watch), chmod, or overflow (changes were lost: the sandbox's queue filled).
    """

    type: str
    path: str = ""
    to: str = ""  # empty unless a move whose new name is under the watch


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox's facts as the daemon reports them; times are Unix seconds."""

    id: str
    language: str
    state: str
    created_at: float
    expires_at: float
    ttl: float
    timeout: float
    memory_mb: int
    cpus: int
    disk_mb: int
    metadata: dict[str, str] = field(default_factory=dict)
    network: str = "none"
    on_timeout: str = "delete"  # what the end of its ttl does: "delete" or "pause"
    lost_reason: str = ""  # why a "lost" sandbox is lost (empty otherwise)


@dataclass(frozen=True)
class SnapshotInfo:
    """A saved sandbox (memory and disk): ``kind`` is snapshot, checkpoint or fork; times are
    Unix seconds, ``size_bytes`` what it takes on the daemon's disk."""

    id: str
    name: str | None
    kind: str
    sandbox_id: str
    language: str
    size_bytes: int
    created_at: float
    last_used_at: float


@dataclass(frozen=True)
class ExposedPort:
    """A port of a sandbox reachable through the daemon: ``url`` (HTTP and WebSocket) needs the
    owner's API key, or a token from ``port_token``."""

    sandbox_id: str
    port: int
    path: str
    url: str


@dataclass(frozen=True)
class PortToken:
    """A revocable token for one exposed port: send it as the ``X-Fission-Port-Token`` header,
    or open ``preview_url`` in a browser (it then keeps a cookie for that port's path)."""

    token_id: str
    token: str
    port: int
    url: str
    preview_url: str


@dataclass(frozen=True)
class FileInfo:
    """A file or directory in a sandbox; ``kind`` is file, dir, symlink or other."""

    path: str
    name: str
    kind: str
    size: int
    mode: int = 0
    mtime: float = 0.0

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.kind in ("dir", "directory")
