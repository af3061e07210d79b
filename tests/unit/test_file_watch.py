"""File watches: the guest's inotify watcher (on the host's own inotify, through the fake guest)
and the host's checks of its events; the request parser fuzzed."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncGenerator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.agent.file_watch import EventQueue, WatchEvent, parse_watch_event
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service
from fission.errors import AgentProtocolError, FileNotFound, PathNotAllowed, SandboxNotFound
from fission.guest import watch
from fission.guest.protocol import AgentError
from fission.vmm.fake import FakeDriver
from tests.unit.conftest import eventually

BASH = SandboxSpec(resolve_language("bash"))


async def next_events(
    stream: AsyncGenerator[list[WatchEvent], None], wanted: int = 1, timeout: float = 10.0
) -> list[WatchEvent]:
    """At least ``wanted`` events from the stream."""
    seen: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        while len(seen) < wanted:
            seen += await anext(stream)
    return seen


async def test_watch_sees_create_modify_delete_and_moves(
    service: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    await sandboxes.make_dir(record.id, "w/sub")
    stream = sandboxes.watch_files(record.id, "w", recursive=True)
    assert await anext(stream) == []  # in place
    await sandboxes.write_file(record.id, "w/a.txt", b"1")
    events = await next_events(stream)
    # the write lands under a temporary name, then is renamed onto its own
    assert any(e.type == "move" and e.to == "a.txt" for e in events), events
    await sandboxes.exec_command(record.id, "echo more >> w/sub/b.txt; mkdir w/new")
    events = await next_events(stream, 2)
    assert WatchEvent("create", "sub/b.txt") in events and WatchEvent("create", "new") in events
    await sandboxes.exec_command(record.id, "touch w/new/deep; rm w/a.txt")
    events = await next_events(stream, 2)
    # a directory made after the watch started is watched too (recursive)
    assert WatchEvent("create", "new/deep") in events and WatchEvent("delete", "a.txt") in events
    await stream.aclose()
    guest = fake_driver.live[0].guest
    assert guest is not None
    await eventually(lambda: guest.watches.active == {}, "closing ends the watch in the guest")
    await sandboxes.delete(record.id)


async def test_watch_ends_when_the_sandbox_ends(service: Service) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    stream = sandboxes.watch_files(record.id, ".")
    assert await anext(stream) == []
    await sandboxes.delete(record.id)
    async with asyncio.timeout(10):
        assert [batch async for batch in stream] == []


async def test_watch_refuses_bad_paths(service: Service) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    with pytest.raises(PathNotAllowed):
        await anext(sandboxes.watch_files(record.id, "/etc"))
    with pytest.raises(PathNotAllowed):
        await anext(sandboxes.watch_files(record.id, "../.."))
    with pytest.raises(FileNotFound):
        await anext(sandboxes.watch_files(record.id, "missing"))
    with pytest.raises(SandboxNotFound):
        await anext(sandboxes.watch_files("sb-none", "."))
    # the sandbox still serves after refusals
    assert (await sandboxes.exec_command(record.id, "echo ok")).stdout == b"ok\n"
    await sandboxes.delete(record.id)


def test_guest_queue_is_bounded_and_coalesced() -> None:
    w = watch.Watch.__new__(watch.Watch)
    w.pending, w.queued, w.overflowed, w.moves = [], set(), False, {}
    for _ in range(3):
        w.push({"type": "modify", "path": "f"})
    assert w.pending == [{"type": "modify", "path": "f"}]
    for n in range(watch.MAX_PENDING + 50):
        w.push({"type": "create", "path": f"f{n}"})
    assert len(w.pending) == watch.MAX_PENDING and w.pending[-1] == {"type": "overflow"}
    sent = w.take()
    assert len(sent) == watch.EVENTS_PER_FRAME


def test_parse_events_reads_struct_inotify_event() -> None:
    raw = struct.pack("iIII", 1, watch.IN_CREATE, 0, 8) + b"ab\0\0\0\0\0\0"
    raw += struct.pack("iIII", 2, watch.IN_DELETE, 0, 0)
    assert watch.parse_events(raw) == [(1, watch.IN_CREATE, 0, "ab"), (2, watch.IN_DELETE, 0, "")]


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=30),
            lambda c: st.lists(c, max_size=3),
            max_leaves=5,
        ),
        max_size=4,
    )
)
def test_watch_request_parsing_never_crashes(message: dict[str, object]) -> None:
    try:
        path, recursive = watch.parse_request(message)
    except AgentError:
        return
    assert isinstance(path, str) and path and isinstance(recursive, bool)


@given(st.binary(max_size=200))
def test_inotify_event_parsing_never_crashes(raw: bytes) -> None:
    for event in watch.parse_events(raw):
        assert [type(part) for part in event] == [int, int, int, str] and "\0" not in event[3]


@given(st.fixed_dictionaries({"path": st.text(max_size=40), "recursive": st.booleans()}))
def test_watch_paths_are_confined(message: dict[str, object]) -> None:
    try:
        path, _ = watch.parse_request(message)
    except AgentError:
        return
    root, rest = watch.files.split_path(path)
    assert root in watch.files.ROOTS and not rest.startswith("..")


def test_host_checks_guest_events() -> None:
    assert parse_watch_event({"type": "move", "path": "a", "to": "b"}) == WatchEvent(
        "move", "a", "b"
    )
    assert parse_watch_event({"type": "overflow"}) == WatchEvent("overflow")
    for bad in (
        {"type": "exec", "path": "a"},
        {"type": "create"},
        {"type": "create", "path": 3},
        {"type": "create", "path": "a", "to": 5},
        [],
        {"type": "modify", "path": "x\0"},
    ):
        with pytest.raises(AgentProtocolError):
            parse_watch_event(bad)


async def test_host_queue_bounded_for_a_slow_consumer() -> None:
    queue = EventQueue(limit=3)
    for n in range(10):
        queue.put(WatchEvent("create", f"f{n}"))
    assert queue.take()[-1] == WatchEvent("overflow") and queue.take() == []


async def test_grpc_streams_a_watch(service: Service, fake_driver: FakeDriver) -> None:
    from fission.api import fission_pb2 as pb
    from tests.unit.test_grpc_servicers import bash_sandbox, harness, md

    async with harness(service) as h:
        sandbox_id, vm = await bash_sandbox(h, fake_driver)
        request = pb.WatchFilesRequest(sandbox_id=sandbox_id, path=".", recursive=True)
        stream = h.sandboxes.WatchFiles(request, metadata=md(h.key))
        first = await stream.read()
        assert (first.type, first.path) == ("ready", ".")
        (vm.home / "made.txt").write_bytes(b"x")  # a change in the guest's files
        async with asyncio.timeout(10):
            event = await stream.read()
        assert (event.type, event.path) == ("create", "made.txt")
        stream.cancel()
        await service.sandboxes.delete(sandbox_id)


async def test_rest_streams_a_watch_as_ndjson(service: Service, fake_driver: FakeDriver) -> None:
    import httpx
    import uvicorn

    from fission.server.app import create_app
    from tests.unit.test_e2b_api import free_port

    record = await service.sandboxes.create(BASH)
    port = free_port()
    # No keys: a local caller. The app's lifespan is not run (the service is started already).
    config = uvicorn.Config(create_app(service), port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            url = f"/v1/sandboxes/{record.id}/files/watch"
            missing = await client.get(url, params={"path": "no"})
            assert missing.status_code == 404
            params = {"path": ".", "recursive": "true"}
            async with client.stream("GET", url, params=params) as answer:
                lines = answer.aiter_lines()
                assert json.loads(await anext(lines)) == {"type": "ready", "path": "."}
                (fake_driver.live[0].home / "r.txt").write_bytes(b"1")
                async with asyncio.timeout(10):
                    change = json.loads(await anext(lines))
                assert change == {"type": "change", "event": "create", "path": "r.txt"}
    finally:
        server.should_exit = True
        await task
        await service.sandboxes.delete(record.id)
