"""Request ids and structured logs on the fake VMM driver: REST and gRPC, logs, audit log.

A request id comes in (``X-Request-Id`` / ``x-request-id`` metadata) or is made, goes back out,
and is on every log line and audit event of the request, with the sandbox id and the key id.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from fission import log_context
from fission.api import fission_pb2 as pb
from fission.api import fission_pb2_grpc as pb_grpc
from fission.auth.keys import KeyStore
from fission.core.service import Service
from fission.errors import InvalidInput
from fission.server.app import create_app
from fission.server.auth import Gatekeeper
from fission.server.daemon import build_config
from fission.server.grpc_server import serving
from fission.server.logs import JsonFormatter, check_log_format, logging_config
from fission.server.metrics import ServiceMetrics
from fission.vmm.fake import FakeDriver
from tests.unit.conftest import ServiceStarter
from tests.unit.metrics_helpers import scrape

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest_asyncio.fixture(loop_scope="function")
async def audited(start_service: ServiceStarter, tmp_path: Path) -> Service:
    """A Service that writes an audit log."""
    return await start_service(audit_db=tmp_path / "audit.sqlite3")


@pytest_asyncio.fixture(loop_scope="function")
async def api(audited: Service, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A TCP listener's app over ``audited`` and a key for it (its id is returned)."""
    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        record, key = store.create("ci")
    app = create_app(audited, keys_db=db)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://fission", headers=headers
    ) as client:
        yield client, record.id
    app.state.gate.close()


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The JSON log lines of the ``fission`` loggers at INFO, as the daemon writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(log_context.ContextFilter())
    logger = logging.getLogger("fission")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- REST ---------------------------------------------------------------------------------------


async def test_a_valid_request_id_comes_back_and_others_are_replaced(
    api: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = api
    kept = await client.get("/v1/pools", headers={"X-Request-Id": "trace-42:a.b_c-d"})
    assert kept.headers["x-request-id"] == "trace-42:a.b_c-d"
    for bad in ("a" * 129, "has space", "semi;colon", "é".encode(), b"\x00", ""):
        answer = await client.get("/v1/pools", headers={"X-Request-Id": bad})
        assert GENERATED.fullmatch(answer.headers["x-request-id"]), bad
    one, two = await client.get("/v1/health"), await client.get("/v1/pools")
    assert GENERATED.fullmatch(one.headers["x-request-id"])
    assert one.headers["x-request-id"] != two.headers["x-request-id"]
    refused = await client.get("/v1/pools", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and GENERATED.fullmatch(refused.headers["x-request-id"])


async def test_log_lines_of_a_sandbox_call_carry_request_sandbox_and_key_ids(
    api: tuple[httpx.AsyncClient, str], json_lines: io.StringIO
) -> None:
    client, key_id = api
    created = await client.post(
        "/v1/sandboxes", json={"language": "bash"}, headers={"X-Request-Id": "req-create"}
    )
    sandbox_id = created.json()["id"]
    ran = await client.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"command": "echo hi"},
        headers={"X-Request-Id": "req-exec"},
    )
    assert ran.status_code == 200 and ran.headers["x-request-id"] == "req-exec"
    await client.delete(f"/v1/sandboxes/{sandbox_id}", headers={"X-Request-Id": "req-delete"})
    lines = parsed(json_lines)
    ended = {line["message"].split()[0]: line for line in lines if " ended: " in line["message"]}
    for action, request_id in (
        ("sandbox.create", "req-create"),
        ("sandbox.exec", "req-exec"),
        ("sandbox.delete", "req-delete"),
    ):
        line = ended[action]
        assert (line["request_id"], line["sandbox_id"], line["key_id"]) == (
            request_id,
            sandbox_id,
            key_id,
        ), line
        assert line["level"] == "info" and line["logger"] == "fission.sandboxes"
    requests = [line for line in lines if line["logger"] == "fission.requests"]
    assert {line["request_id"] for line in requests} >= {"req-create", "req-exec", "req-delete"}
    assert all(line["key_id"] == key_id for line in requests)


async def test_a_runs_log_line_and_audit_events_carry_its_request_id(
    api: tuple[httpx.AsyncClient, str],
    audited: Service,
    json_lines: io.StringIO,
    fake_driver: FakeDriver,
) -> None:
    client, key_id = api
    answer = await client.post(
        "/v1/run", json={"code": "print(1)"}, headers={"X-Request-Id": "req-run"}
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "req-run"
    (line,) = [line for line in parsed(json_lines) if line["message"].startswith("python run")]
    assert (line["request_id"], line["key_id"]) == ("req-run", key_id)
    (vm,) = fake_driver.vms
    assert line["sandbox_id"] == vm.config.vm_id  # a one-shot run is named by its VM
    assert audited.audit is not None
    (event,) = audited.audit.query(action="run")
    assert event.detail is not None and event.detail["request_id"] == "req-run"
    assert event.detail["code_bytes"] == len("print(1)")  # the detail it had is kept
    created = await client.post(
        "/v1/sandboxes", json={"language": "bash"}, headers={"X-Request-Id": "req-sb"}
    )
    (create,) = audited.audit.query(action="sandbox.create")
    assert create.detail == {"sandbox": created.json()["id"], "request_id": "req-sb"}
    await client.delete(f"/v1/sandboxes/{created.json()['id']}")


async def test_without_a_request_the_audit_detail_has_no_request_id(audited: Service) -> None:
    from fission.core.languages import resolve_language
    from fission.core.spec import RunSpec

    await audited.run(RunSpec(resolve_language("python"), "print(1)"))
    assert audited.audit is not None
    (event,) = audited.audit.query(action="run")
    assert event.detail is not None and "request_id" not in event.detail


# -- gRPC -----------------------------------------------------------------------------------------


async def test_grpc_calls_get_a_request_id_in_metadata_and_are_counted(
    audited: Service,
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="fg-", dir="/tmp"))
    db = directory / "keys.sqlite3"
    with KeyStore(db) as store:
        _, key = store.create("ci")
    gate = Gatekeeper(db)
    metrics = ServiceMetrics(audited)
    address = f"unix:{directory}/g.sock"
    auth = ("authorization", f"Bearer {key}")
    try:
        async with (
            serving(audited, address, gate, metrics),
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = pb_grpc.FissionStub(channel)
            call = stub.Pools(pb.PoolsRequest(), metadata=(auth, ("x-request-id", "grpc-1")))
            await call
            assert dict(await call.initial_metadata())["x-request-id"] == "grpc-1"
            call = stub.Pools(pb.PoolsRequest(), metadata=(auth, ("x-request-id", "bad id")))
            await call
            assert GENERATED.fullmatch(dict(await call.initial_metadata())["x-request-id"])
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Pools(pb.PoolsRequest())
            assert GENERATED.fullmatch(dict(refused.value.initial_metadata())["x-request-id"])
            run = stub.Run(
                pb.RunRequest(language="python", code="print(1)"),
                metadata=(auth, ("x-request-id", "grpc-run")),
            )
            events = [event async for event in run]
            assert events[-1].WhichOneof("event") == "result"
            assert dict(await run.initial_metadata())["x-request-id"] == "grpc-run"
    finally:
        gate.close()
        shutil.rmtree(directory, ignore_errors=True)
    after = await scrape(metrics)
    count = "fission_api_requests_total"
    pools = {"api": "grpc", "method": "POST", "route": "/fission.v1.Fission/Pools"}
    assert after.value(count, **pools, status="OK") == 2
    assert after.value(count, **pools, status="UNAUTHENTICATED") == 1
    assert (
        after.value(count, api="grpc", method="POST", route="/fission.v1.Fission/Run", status="OK")
        == 1
    )
    assert audited.audit is not None
    (event,) = audited.audit.query(action="run")
    assert event.detail is not None and event.detail["request_id"] == "grpc-run"


# -- the daemon's log configuration -----------------------------------------------------------


@pytest.fixture
def restored_loggers() -> Iterator[None]:
    """Put the loggers ``logging_config`` touches back as they were."""
    names = ("fission", "uvicorn", "uvicorn.error")
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
        )
        for name in names
    }
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_daemons_log_config_writes_the_ids(
    log_format: str, restored_loggers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.config.dictConfig(logging_config(log_format, "info"))
    token = log_context.request_id.set("req-7")
    try:
        logging.getLogger("fission.service").info("python run ended: ok")
        logging.getLogger("fission.service").debug("not at info")
    finally:
        log_context.request_id.reset(token)
    (line,) = capsys.readouterr().err.splitlines()
    if log_format == "json":
        record = json.loads(line)
        assert record["request_id"] == "req-7" and record["sandbox_id"] is None
        assert (record["message"], record["level"]) == ("python run ended: ok", "info")
    else:
        assert "request_id=req-7 sandbox_id=- key_id=-" in line and line.endswith("ended: ok")


def test_bad_log_settings_are_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="--log-format 'xml'"):
        check_log_format("xml")
    common: dict[str, Any] = {
        "config_file": None,
        "pools": [],
        "memory_budget_mb": None,
        "acquire_timeout": None,
        "socket": tmp_path / "s.sock",
        "host": None,
        "port": None,
        "state_dir": tmp_path,
    }
    with pytest.raises(InvalidInput, match="--log-level 'loud'"):
        build_config(**common, log_level="loud")
    with pytest.raises(InvalidInput, match="--metrics-port"):
        build_config(**common, metrics_port=0)
    config = build_config(**common, log_format="json", log_level="info", metrics_port=9464)
    assert (config.log_format, config.log_level, config.metrics_port) == ("json", "info", 9464)
