"""Request bodies of the HTTP API (pydantic), each turned into the core's own types."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, Field

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.sandbox_spec import DEFAULT_TTL, NetworkPolicy, SandboxSpec
from fission.core.spec import RunSpec
from fission.core.transfers import Upload
from fission.errors import InvalidInput


def decode_stdin(stdin_b64: str | None) -> bytes | None:
    """The bytes of a base64 ``stdin_b64`` field (None when absent)."""
    if not stdin_b64:
        return None
    try:
        return base64.b64decode(stdin_b64, validate=True)
    except ValueError as exc:
        raise InvalidInput(f"stdin_b64 is not valid base64: {exc}") from exc


class LimitsBody(BaseModel):
    """Resource limits; each run inside a sandbox defaults to ``timeout`` seconds."""

    timeout: float = 30.0
    memory_mb: int = 256
    cpus: int = 1
    disk_mb: int = 512
    pids: int = 256
    output_limit_mb: float = 10.0

    def to_limits(self) -> Limits:
        """Validate into Limits (raises LimitOutOfRange)."""
        return Limits(
            timeout=self.timeout,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            disk_mb=self.disk_mb,
            pids=self.pids,
            output_limit_mb=self.output_limit_mb,
        )


CHECKPOINT_HELP = "Take a checkpoint after this step; its id comes back as checkpoint_id."
NETWORK_HELP = (
    '"none" (the default: no network at all) or {"enabled": true, "allow_hosts": '
    '["HOST[:PORT]", "*.example.com"], "max_connections": 16, "max_bytes": N}'
)


class FileBody(BaseModel):
    """A file for the VM: its guest path and its bytes in base64."""

    path: str
    data_b64: str

    def to_upload(self) -> Upload:
        """The upload it stands for (InvalidInput when the base64 is broken)."""
        try:
            data = base64.b64decode(self.data_b64, validate=True)
        except ValueError as exc:
            raise InvalidInput(f"the file {self.path!r}: data_b64 is not valid base64") from exc
        return Upload(self.path, data)


def to_uploads(files: list[FileBody]) -> tuple[Upload, ...]:
    """The uploads of a request body."""
    return tuple(file.to_upload() for file in files)


class RunRequest(LimitsBody):
    """A one-shot run: the program, its language and its limits."""

    language: str = "python"
    code: str
    env: dict[str, str] = Field(default_factory=dict)
    stdin_b64: str | None = None
    network: str | dict[str, Any] | None = Field(None, description=NETWORK_HELP)
    uploads: list[FileBody] = Field(
        default_factory=list, description="files written into the VM before the program starts"
    )
    downloads: list[str] = Field(
        default_factory=list,
        description="guest paths read out after the run, streamed back as file lines",
    )
    template: str | None = Field(
        None,
        description="a built template's name: the run starts from its snapshot, with its "
        "language, env and the limits left at their defaults",
    )

    def to_spec(self) -> RunSpec:
        """Validate into a RunSpec (raises InvalidInput subclasses)."""
        language = resolve_language(self.language)
        network = NetworkPolicy.from_json(self.network)
        return RunSpec(
            language,
            self.code,
            self.to_limits(),
            self.env,
            decode_stdin(self.stdin_b64),
            network,
            template=self.template,
        )


class InstallRequest(BaseModel):
    """``fission install``: packages through the allowlist (cached per set), then a command."""

    language: str = "python"
    packages: list[str]
    command: str
    timeout: float = 30.0
    index_url: str | None = None
    allow_hosts: list[str] = Field(default_factory=list)


class RepoRequest(BaseModel):
    """``fission repo``: clone ``url`` (or use ``files`` in the workdir), then a command."""

    language: str = "python"
    url: str | None = None
    command: str
    timeout: float = 60.0
    ref: str | None = None
    allow_hosts: list[str] = Field(default_factory=list)
    files: list[FileBody] = Field(default_factory=list)


class SandboxCreate(LimitsBody):
    """A new persistent sandbox."""

    language: str = "python"
    ttl: float = Field(DEFAULT_TTL, description="Seconds the sandbox lives unless extended.")
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    network: str | dict[str, Any] | None = Field("none", description=NETWORK_HELP)
    from_snapshot: str | None = Field(
        None,
        description="Start from this snapshot (its language, limits, env, memory and files); "
        "ttl and metadata apply when given.",
    )
    template: str | None = Field(
        None,
        description="Start from this built template (`fission template build`): its language, "
        "files and packages, its env under this one, its limits where these are defaults.",
    )
    on_timeout: str = Field(
        "delete", description='At the end of the ttl: "delete" the sandbox, or "pause" it.'
    )

    def to_spec(self) -> SandboxSpec:
        """Validate into a SandboxSpec."""
        network = NetworkPolicy.from_json(self.network)
        language = resolve_language(self.language)
        RunSpec(language, "", self.to_limits(), self.env)  # the env is checked like a run's
        return SandboxSpec(
            language,
            self.to_limits(),
            self.ttl,
            self.env,
            self.metadata,
            network,
            on_timeout=self.on_timeout,
        )


class RunCodeRequest(BaseModel):
    """Code to run in a sandbox, optionally in a persistent context (a notebook-like kernel)."""

    code: str
    timeout: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    context: str | None = Field(None, description="Context id; runs in it share variables.")
    fresh_context: bool = False
    checkpoint: bool = Field(False, description=CHECKPOINT_HELP)


class ExecBody(BaseModel):
    """A command in a sandbox: a shell line (string) or an argv (list)."""

    command: str | list[str]
    timeout: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    stdin_b64: str | None = None
    checkpoint: bool = Field(False, description=CHECKPOINT_HELP)


class SnapshotBody(BaseModel):
    """A snapshot to take of a running sandbox."""

    name: str | None = Field(None, description="A name of your own (1 to 128 characters).")


class ForkBody(BaseModel):
    """How many sandboxes to start from a snapshot of this one."""

    n: int = Field(1, description="1 to 16 new sandboxes.")


class RewindBody(BaseModel):
    """The checkpoint (or snapshot of this sandbox) to go back to."""

    checkpoint_id: str


class GcBody(BaseModel):
    """``fission gc``: reclaim snapshot space."""

    dry_run: bool = False
    budget_mb: int | None = Field(
        None, ge=0, description="Evict down to this (default: the daemon's --snapshot-budget)."
    )


class TtlBody(BaseModel):
    """A new lifetime, counted from now."""

    ttl: float


class PathBody(BaseModel):
    """A path inside the sandbox."""

    path: str
