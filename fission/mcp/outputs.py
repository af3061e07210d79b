"""What the MCP tools return: pydantic models, so clients get structured content and a schema.

Each model is built from a core object by one function; field descriptions end up in the tools'
output schemas, where an LLM reads them.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from fission.core.sandbox_spec import SandboxRecord, SandboxState
from fission.core.snapshot_store import SnapshotRecord
from fission.core.spec import RunResult


class RunOutput(BaseModel):
    """How a program or command ended and what it printed."""

    stdout: str = Field(description="Standard output (UTF-8; undecodable bytes replaced).")
    stderr: str = Field(description="Standard error (UTF-8; undecodable bytes replaced).")
    exit_code: int = Field(description="Exit status: 0 is success; 124 when it timed out.")
    timed_out: bool = Field(description="True when it ran past its timeout and was killed.")
    oom: bool = Field(description="True when it was killed for using more memory than allowed.")
    truncated: bool = Field(
        description="True when stdout and stderr together passed the output cap; the rest was "
        "dropped."
    )
    duration_ms: float = Field(description="How long it ran, in milliseconds.")


def run_output(result: RunResult) -> RunOutput:
    """The tool output of a run or command."""
    return RunOutput(
        stdout=result.stdout.decode("utf-8", errors="replace"),
        stderr=result.stderr.decode("utf-8", errors="replace"),
        exit_code=result.exit_code,
        timed_out=result.timed_out,
        oom=result.oom,
        truncated=result.truncated,
        duration_ms=round(result.duration_ms, 1),
    )


class StepOutput(RunOutput):
    """How code or a command in a sandbox ended, and the checkpoint taken after it, if any."""

    checkpoint_id: str | None = Field(
        None, description="With checkpoint=true: pass it to sandbox_rewind to come back here."
    )


def step_output(result: RunResult) -> StepOutput:
    """The tool output of a step in a sandbox."""
    return StepOutput(**run_output(result).model_dump(), checkpoint_id=result.checkpoint_id)


class SnapshotInfo(BaseModel):
    """A saved sandbox: memory (variables, running contexts) and files."""

    id: str = Field(description="Pass it as from_snapshot to sandbox_create (or to rewind).")
    name: str | None
    kind: str = Field(description="snapshot, checkpoint or fork.")
    sandbox_id: str = Field(description="The sandbox it was taken from.")
    size_mb: float = Field(description="Disk it takes on the host, in MB.")
    created_at: str = Field(description="When it was taken (ISO 8601, UTC).")


def snapshot_info(record: SnapshotRecord) -> SnapshotInfo:
    """The tool output describing a snapshot."""
    return SnapshotInfo(
        id=record.id,
        name=record.name,
        kind=record.kind,
        sandbox_id=record.sandbox_id,
        size_mb=round(record.size_bytes / 1e6, 2),
        created_at=iso_time(record.created_at),
    )


class SnapshotList(BaseModel):
    """Saved sandboxes, oldest first."""

    snapshots: list[SnapshotInfo]


class SandboxInfo(BaseModel):
    """A persistent sandbox."""

    id: str = Field(description="Pass this as sandbox_id to the other sandbox_* tools.")
    language: str = Field(
        description="The language sandbox_run_code runs: python, node, bash or go."
    )
    state: str = Field(
        description="running; paused (resume it before using it); or lost (its VM or saved "
        "state is gone, see lost_reason: delete it and create another)."
    )
    ttl: float = Field(description="Seconds the sandbox lives after creation or resume.")
    expires_at: str | None = Field(
        description="When it will be deleted (ISO 8601, UTC); null while paused: paused "
        "sandboxes do not expire."
    )
    expires_in_seconds: float | None = Field(
        description="Seconds left before it is deleted; null while paused."
    )
    memory_mb: int = Field(description="Memory for programs in the sandbox, in MB.")
    metadata: dict[str, str] = Field(description="The labels given at creation.")
    lost_reason: str | None = Field(
        default=None, description="Why a lost sandbox is lost; null unless state is lost."
    )


def iso_time(stamp: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def sandbox_info(record: SandboxRecord, now: float | None = None) -> SandboxInfo:
    """The tool output describing a sandbox."""
    running = record.state == SandboxState.RUNNING
    left = max(0.0, record.expires_at - (time.time() if now is None else now))
    return SandboxInfo(
        id=record.id,
        language=record.spec.language.name,
        state=record.state.value,
        ttl=record.spec.ttl,
        expires_at=iso_time(record.expires_at) if running else None,
        expires_in_seconds=round(left, 1) if running else None,
        memory_mb=record.spec.limits.memory_mb,
        metadata=dict(record.spec.metadata),
        lost_reason=record.lost_reason if record.state == SandboxState.LOST else None,
    )


class Forked(BaseModel):
    """The outcome of sandbox_fork."""

    snapshot: SnapshotInfo
    sandboxes: list[SandboxInfo] = Field(description="The new sandboxes; delete each when done.")


class SandboxList(BaseModel):
    """The live sandboxes of this server."""

    sandboxes: list[SandboxInfo]
    more: bool = Field(description="True when there were more sandboxes than listed here.")


class Deleted(BaseModel):
    """The outcome of sandbox_delete."""

    id: str
    deleted: bool = Field(description="True: the sandbox, its VM and its files are gone.")


class FileWritten(BaseModel):
    """A file written into a sandbox."""

    path: str = Field(description="The path as given (relative paths are under /home/sandbox).")
    size: int = Field(description="Bytes written.")


class FileContent(BaseModel):
    """A file read from a sandbox."""

    path: str
    encoding: str = Field(description="utf-8 (text) or base64 (bytes).")
    content: str = Field(description="The file's content, or its first part when truncated.")
    size: int = Field(description="Bytes of the file included in content.")
    truncated: bool = Field(
        description="True when the file is larger than what one call returns; read the rest "
        "with sandbox_exec (e.g. tail, head -c, grep) or sandbox_download."
    )


class FileList(BaseModel):
    """The entries of a directory in a sandbox."""

    path: str
    entries: list[dict[str, Any]] = Field(
        description="One object per entry: its name, kind (file, dir, symlink, other), size, "
        "mode and mtime."
    )


def file_entry(info: Any) -> dict[str, Any]:
    """One directory entry (a dataclass from the agent client) as JSON."""
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        return dataclasses.asdict(info)
    return dict(info) if isinstance(info, dict) else {"value": str(info)}


class Transfer(BaseModel):
    """A file moved between the MCP server's host and a sandbox."""

    path: str = Field(description="The path in the sandbox.")
    host_path: str = Field(description="The absolute path on the MCP server's host.")
    size: int = Field(description="Bytes moved.")
    sha256: str = Field(description="SHA-256 of the bytes moved, in hex.")
