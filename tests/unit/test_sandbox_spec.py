"""Pure parts of persistent sandboxes: ttl and metadata checks, filters, pagination."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import (
    MAX_TTL,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    check_metadata,
    check_ttl,
    matches,
    new_sandbox_id,
    page,
    parse_cursor,
)
from fission.errors import InvalidInput

PYTHON = resolve_language("python")


def record(n: int, owner: str | None = None, **metadata: str) -> SandboxRecord:
    """A record created at time ``n``."""
    spec = SandboxSpec(PYTHON, metadata=metadata)
    return SandboxRecord(f"sbx_{n:016x}", spec, owner, float(n), float(n) + spec.ttl)


def test_ids_are_prefixed_and_unique() -> None:
    ids = {new_sandbox_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("sbx_") and len(i) == 20 for i in ids)


@pytest.mark.parametrize("ttl", [1, 60, 300.5, MAX_TTL])
def test_good_ttls(ttl: float) -> None:
    assert check_ttl(ttl) == ttl


@pytest.mark.parametrize("ttl", [0, 0.5, -1, MAX_TTL + 1, math.nan, math.inf, True, "60"])
def test_bad_ttls_name_the_range(ttl: object) -> None:
    with pytest.raises(InvalidInput, match="ttl"):
        check_ttl(ttl)  # type: ignore[arg-type]


def test_a_spec_checks_its_ttl_and_metadata() -> None:
    with pytest.raises(InvalidInput, match="ttl"):
        SandboxSpec(PYTHON, ttl=0)
    with pytest.raises(InvalidInput, match="metadata"):
        SandboxSpec(PYTHON, metadata={"": "x"})


@pytest.mark.parametrize(
    "metadata",
    [{str(i): "v" for i in range(33)}, {"k": "v" * 257}, {"k" * 257: "v"}, {"k": 1}],
)
def test_bad_metadata(metadata: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="metadata"):
        check_metadata(metadata)


def test_filters_by_owner_state_and_metadata() -> None:
    mine = record(1, "key1", team="ml", job="7")
    assert matches(mine, None, None, None)
    assert matches(mine, "key1", SandboxState.RUNNING, {"team": "ml"})
    assert not matches(mine, "key2", None, None)
    assert not matches(mine, None, SandboxState.PAUSED, None)
    assert not matches(mine, None, None, {"team": "web"})
    assert not matches(mine, None, None, {"missing": ""})


def test_json_form_has_the_documented_fields() -> None:
    body = record(3, team="ml").to_json()
    assert body["id"] == "sbx_0000000000000003" and body["state"] == "running"
    assert body["metadata"] == {"team": "ml"} and body["language"] == "python"
    assert set(body["limits"]) == {"timeout", "memory_mb", "cpus", "disk_mb", "pids", "output_limit_mb"}


def test_pages_walk_every_record_once_in_creation_order() -> None:
    records = [record(n) for n in (5, 1, 4, 2, 3)]
    seen, cursor = [], None
    while True:
        chunk, cursor = page(records, 2, cursor)
        seen += [r.id for r in chunk]
        if cursor is None:
            break
    assert seen == [record(n).id for n in (1, 2, 3, 4, 5)]


def test_a_page_continues_after_its_last_record_was_deleted() -> None:
    records = [record(n) for n in range(1, 6)]
    first, cursor = page(records, 2, None)
    remaining = [r for r in records if r.id != first[-1].id]
    second, _ = page(remaining, 2, cursor)
    assert [r.id for r in second] == [record(3).id, record(4).id]


@pytest.mark.parametrize("cursor", ["nonsense", "1.0~abc", "nan~sbx_1", "x~sbx_1", "~"])
def test_bad_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidInput, match="cursor"):
        parse_cursor(cursor)


@pytest.mark.parametrize("limit", [0, -1, 201])
def test_page_size_is_bounded(limit: int) -> None:
    with pytest.raises(InvalidInput, match="limit"):
        page([], limit, None)


@given(st.lists(st.integers(0, 10**6), unique=True, max_size=40), st.integers(1, 7))
def test_paging_is_a_partition(times: list[int], size: int) -> None:
    records = [record(n) for n in times]
    seen, cursor = [], None
    for _ in range(len(records) + 2):
        chunk, cursor = page(records, size, cursor)
        assert len(chunk) <= size
        seen += [r.id for r in chunk]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r.id for r in records) and len(seen) == len(set(seen))
