"""Persistent sandboxes, the pure parts: what a sandbox is asked to be, its record, listing.

A sandbox is a VM that outlives one run: created with a language, limits, a lifetime (``ttl``),
env and metadata, then used for many runs, commands and file transfers until it is deleted or
its ttl runs out (then it is deleted, or paused with ``on_timeout="pause"``). ``Limits.timeout``
is the default deadline of each run inside it; ``ttl`` is the sandbox's whole life. A sandbox
whose VM ended while no daemon managed it, or whose saved state is gone, is ``lost``: listed
with the reason until deleted. ``spec_to_json``/``spec_from_json`` are the form the catalog
keeps. Nothing here does I/O.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fission.core.languages import Language, resolve_language
from fission.core.limits import Limits
from fission.errors import InvalidInput
from fission.net.policy import NetworkPolicy

__all__ = [
    "NetworkPolicy",
    "SandboxRecord",
    "SandboxSpec",
    "SandboxState",
    "spec_from_json",
    "spec_to_json",
]

DEFAULT_TTL = 300.0
MAX_TTL = 24 * 3600.0
MAX_METADATA_ENTRIES = 32
MAX_METADATA_TEXT = 256
MAX_PAGE_SIZE = 200
ID_PREFIX = "sbx_"


class SandboxState(StrEnum):
    """Where a sandbox is in its life."""

    RUNNING = "running"
    PAUSED = "paused"
    DELETED = "deleted"
    LOST = "lost"


ON_TIMEOUT = ("delete", "pause")  # what happens to a running sandbox when its ttl runs out


def new_sandbox_id() -> str:
    """A fresh, unguessable sandbox id."""
    return ID_PREFIX + secrets.token_hex(8)


def check_ttl(ttl: float, max_ttl: float = MAX_TTL) -> float:
    """``ttl`` if it is a finite number of seconds in (0, max_ttl]; InvalidInput otherwise."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise InvalidInput(f"ttl must be a number of seconds, got {ttl!r}")
    if not 1 <= ttl <= max_ttl:
        raise InvalidInput(f"ttl {ttl:g} s is out of range: use 1 to {max_ttl:g} seconds")
    return float(ttl)


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata as given if it is a small map of short strings; InvalidInput otherwise."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInput(f"metadata has {len(metadata)} entries; the most is 32")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput("metadata keys and values must be strings")
        if not key or len(key) > MAX_METADATA_TEXT or len(value) > MAX_METADATA_TEXT:
            raise InvalidInput(
                f"metadata {key[:40]!r}: keys must be 1 to {MAX_METADATA_TEXT} characters "
                f"and values at most {MAX_METADATA_TEXT}"
            )
    return dict(metadata)


@dataclass(frozen=True)
class SandboxSpec:
    """What a caller asks for when creating a sandbox."""

    language: Language
    limits: Limits = field(default_factory=Limits)
    ttl: float = DEFAULT_TTL
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    on_timeout: str = "delete"

    def __post_init__(self) -> None:
        check_ttl(self.ttl)
        check_metadata(self.metadata)
        if self.on_timeout not in ON_TIMEOUT:
            raise InvalidInput(
                f"on_timeout {self.on_timeout!r} is not one of {', '.join(ON_TIMEOUT)}"
            )


def spec_to_json(spec: SandboxSpec) -> dict[str, Any]:
    """The spec as JSON (the language by name), as the catalog stores it."""
    return {
        "language": spec.language.name,
        "limits": spec.limits.to_json(),
        "ttl": spec.ttl,
        "env": dict(spec.env),
        "metadata": dict(spec.metadata),
        "network": spec.network.to_json(),
        "on_timeout": spec.on_timeout,
    }


def spec_from_json(data: dict[str, Any]) -> SandboxSpec:
    """The spec ``spec_to_json`` wrote; InvalidInput (or UnknownLanguage) if it no longer fits."""
    return SandboxSpec(
        language=resolve_language(data["language"]),
        limits=Limits(**data.get("limits", {})),
        ttl=data.get("ttl", DEFAULT_TTL),
        env=dict(data.get("env", {})),
        metadata=dict(data.get("metadata", {})),
        network=NetworkPolicy.from_json(data.get("network")),
        on_timeout=data.get("on_timeout", "delete"),
    )


@dataclass
class SandboxRecord:
    """A sandbox's public facts; the manager keeps one per sandbox and updates it."""

    id: str
    spec: SandboxSpec
    owner: str | None
    created_at: float
    expires_at: float
    state: SandboxState = SandboxState.RUNNING
    lost_reason: str | None = None  # why a ``lost`` sandbox is lost

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, as the APIs return it."""
        limits = self.spec.limits
        return {
            "id": self.id,
            "language": self.spec.language.name,
            "state": self.state.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "ttl": self.spec.ttl,
            "metadata": dict(self.spec.metadata),
            "network": self.spec.network.value,
            "network_policy": self.spec.network.to_json(),
            "limits": limits.to_json(),
            "on_timeout": self.spec.on_timeout,
            "lost_reason": self.lost_reason,
        }


def matches(
    record: SandboxRecord,
    owner: str | None,
    state: SandboxState | None,
    metadata: dict[str, str] | None,
) -> bool:
    """True when ``record`` belongs to ``owner`` (None: any) and fits the filters."""
    if owner is not None and record.owner != owner:
        return False
    if state is not None and record.state != state:
        return False
    wanted = metadata or {}
    return all(record.spec.metadata.get(key) == value for key, value in wanted.items())


def page(
    records: list[SandboxRecord], limit: int, cursor: str | None
) -> tuple[list[SandboxRecord], str | None]:
    """One page of ``records`` (ordered by creation, then id) after ``cursor``, and the next one.

    The cursor names the position after the last record of the previous page (its creation
    time and id), so pages stay stable while sandboxes come and go, that one included.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit {limit} is out of range: use 1 to {MAX_PAGE_SIZE}")
    ordered = sorted(records, key=lambda r: (r.created_at, r.id))
    if cursor:
        position = parse_cursor(cursor)
        ordered = [r for r in ordered if (r.created_at, r.id) > position]
    chunk = ordered[:limit]
    next_cursor = None
    if len(ordered) > limit:
        next_cursor = f"{chunk[-1].created_at!r}~{chunk[-1].id}"
    return chunk, next_cursor


def parse_cursor(cursor: str) -> tuple[float, str]:
    """The (creation time, id) position a cursor names; InvalidInput if it is not one."""
    stamp, sep, sandbox_id = cursor.partition("~")
    try:
        created = float(stamp)
    except ValueError:
        created = math.nan
    if not sep or not math.isfinite(created) or not sandbox_id.startswith(ID_PREFIX):
        raise InvalidInput(f"cursor {cursor[:80]!r} is not one a listing returned")
    return created, sandbox_id
