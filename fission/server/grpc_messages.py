"""The gRPC API's translation layer (pure): requests to the core's types, answers to messages.

Every conversion mirrors the REST API: requests are validated by the same models
(``fission.server.models``), answers carry the fields of the REST JSON. Errors map to gRPC
statuses by their HTTP status (``STATUS_BY_HTTP``; anything else is INTERNAL), with the code
slug in the trailing metadata ``fission-error-code``. Unit-tested without a server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grpc

from fission.api import fission_pb2 as pb
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.core.snapshot_store import SnapshotRecord
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError, InvalidInput, QuotaExceeded
from fission.net.policy import NetworkPolicy
from fission.server.models import LimitsBody, SandboxCreate

MiB = 1024 * 1024
CHUNK_BYTES = MiB  # largest data chunk a ReadFile stream sends
MAX_PATH = 4096
DEFAULT_PAGE_SIZE = 50
ERROR_CODE_KEY = "fission-error-code"
RETRY_AFTER_KEY = "retry-after"

STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    501: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
STATE_TO_PB: dict[SandboxState, pb.SandboxState] = {
    SandboxState.RUNNING: pb.SANDBOX_STATE_RUNNING,
    SandboxState.PAUSED: pb.SANDBOX_STATE_PAUSED,
    SandboxState.DELETED: pb.SANDBOX_STATE_DELETED,
    SandboxState.LOST: pb.SANDBOX_STATE_LOST,
}
PB_TO_STATE: dict[int, SandboxState] = {value: state for state, value in STATE_TO_PB.items()}
STREAM_TO_PB: dict[str, pb.Stream] = {"stdout": pb.STREAM_STDOUT, "stderr": pb.STREAM_STDERR}


# -- errors ------------------------------------------------------------------------------------
def status_of(error: FissionError) -> grpc.StatusCode:
    """The gRPC status a FissionError is answered with."""
    return STATUS_BY_HTTP.get(error.http_status, grpc.StatusCode.INTERNAL)


def error_metadata(error: FissionError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of an error: its code slug, and when a rate limit lets a retry succeed."""
    items = [(ERROR_CODE_KEY, error.code)]
    if isinstance(error, QuotaExceeded) and error.retry_after is not None:
        items.append((RETRY_AFTER_KEY, str(max(1, math.ceil(error.retry_after)))))
    return tuple(items)


# -- messages to core types ----------------------------------------------------------------------
def set_fields(message: Any) -> dict[str, Any]:
    """The fields of ``message`` that the sender set (so unset ones take the REST defaults)."""
    return {field.name: value for field, value in message.ListFields()}


def optional(message: Any, name: str) -> Any:
    """An ``optional`` field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def run_spec(request: pb.RunRequest) -> RunSpec:
    """A one-shot run as the core's RunSpec (validated like REST's ``RunRequest``)."""
    limits = LimitsBody(**set_fields(request.limits)).to_limits()
    language = resolve_language(request.language or "python")
    stdin = optional(request, "stdin")
    network = network_policy(request.network) if request.HasField("network") else None
    return RunSpec(
        language,
        request.code,
        limits,
        dict(request.env),
        stdin,
        network or NetworkPolicy(),
        template=optional(request, "template"),
    )


def network_policy(message: pb.NetworkPolicy) -> NetworkPolicy:
    """A network policy message as the core's policy (validated like REST's)."""
    return NetworkPolicy.from_json(
        {
            "enabled": message.enabled,
            "allow_hosts": list(message.allow_hosts),
            "max_connections": optional(message, "max_connections"),
            "max_bytes": optional(message, "max_bytes"),
        }
    )


def network_message(policy: dict[str, Any]) -> pb.NetworkPolicy:
    """A policy's JSON form (``NetworkPolicy.to_json``) as a message."""
    return pb.NetworkPolicy(**policy)


def sandbox_spec(request: pb.CreateSandboxRequest) -> SandboxSpec:
    """A sandbox request as the core's SandboxSpec, through REST's ``SandboxCreate``."""
    fields = set_fields(request.limits)
    if request.HasField("ttl"):
        fields["ttl"] = request.ttl
    body = SandboxCreate(
        language=request.language or "python",
        env=dict(request.env),
        metadata=dict(request.metadata),
        network=(
            network_policy(request.network_policy).to_json()
            if request.HasField("network_policy")
            else request.network or "none"
        ),
        on_timeout=request.on_timeout or "delete",
        **fields,
    )
    return body.to_spec()


def command_of(request: pb.ExecRequest) -> str | list[str]:
    """The command of an Exec: an argv (list) or a shell line (string)."""
    which = request.WhichOneof("command")
    if which == "argv":
        return list(request.argv.args)
    if which == "shell":
        return str(request.shell)
    raise InvalidInput("the command is missing: set argv (a program and its arguments) or shell")


def file_path(path: str) -> str:
    """A path in the sandbox as the REST routes accept it (1 to 4096 characters)."""
    if not 1 <= len(path) <= MAX_PATH:
        raise InvalidInput(f"path must be 1 to {MAX_PATH} characters: name a path in the sandbox")
    return path


def state_filter(state: int) -> SandboxState | None:
    """A List filter's state; UNSPECIFIED means any."""
    if state == pb.SANDBOX_STATE_UNSPECIFIED:
        return None
    if state not in PB_TO_STATE:
        raise InvalidInput(f"state {state} is not a SandboxState")
    return PB_TO_STATE[state]


# -- core types to messages ----------------------------------------------------------------------
def known_fields(message_type: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``message_type`` has a field for, None left out."""
    names = message_type.DESCRIPTOR.fields_by_name
    return {key: value for key, value in values.items() if key in names and value is not None}


def sandbox_message(record: SandboxRecord) -> pb.Sandbox:
    """A sandbox record, mirroring its REST JSON."""
    body = record.to_json()
    return pb.Sandbox(
        id=body["id"],
        language=body["language"],
        state=STATE_TO_PB[record.state],
        created_at=body["created_at"],
        expires_at=body["expires_at"],
        ttl=body["ttl"],
        metadata=body["metadata"],
        network=body["network"],
        limits=pb.Limits(**body["limits"]),
        network_policy=network_message(body["network_policy"]),
        on_timeout=body["on_timeout"],
        lost_reason=body["lost_reason"],
    )


def snapshot_message(record: SnapshotRecord) -> pb.SnapshotInfo:
    """A snapshot record, mirroring its REST JSON."""
    body = record.to_json()
    return pb.SnapshotInfo(
        id=body["id"],
        name=body["name"],
        kind=body["kind"],
        sandbox_id=body["sandbox_id"],
        language=body["language"],
        limits=pb.Limits(**body["limits"]),
        size_bytes=body["size_bytes"],
        created_at=body["created_at"],
        last_used_at=body["last_used_at"],
    )


def output_event(stream: str, data: bytes) -> pb.RunEvent:
    """One chunk of output."""
    return pb.RunEvent(output=pb.Output(stream=STREAM_TO_PB[stream], data=data))


def result_event(result: RunResult) -> pb.RunEvent:
    """The closing event of a run (its output was streamed before)."""
    return pb.RunEvent(
        result=pb.Result(
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            oom=result.oom,
            truncated=result.truncated,
            duration_ms=result.duration_ms,
            boot_ms=result.boot_ms,
            total_ms=result.total_ms,
            checkpoint_id=result.checkpoint_id,
        )
    )


def pools_message(status: dict[str, Any]) -> pb.PoolsResponse:
    """``Service.status()`` as a message."""
    return pb.PoolsResponse(
        pools=[pb.PoolStatus(**known_fields(pb.PoolStatus, pool)) for pool in status["pools"]],
        memory_budget_mb=status["memory_budget_mb"],
        memory_reserved_mb=status["memory_reserved_mb"],
        reconciled=status["reconciled"],
        sandboxes=status["sandboxes"],
    )


def file_info_message(info: Any) -> pb.FileInfo:
    """A FileInfo of the agent client (a dataclass), like the REST files routes' JSON."""
    is_record = dataclasses.is_dataclass(info) and not isinstance(info, type)
    values = dataclasses.asdict(info) if is_record else dict(info)
    return pb.FileInfo(**known_fields(pb.FileInfo, values))


def chunks_of(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (nothing for empty data)."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])
