"""``ClusterService`` stands in for ``Service`` behind every adapter: it has each method and
attribute the adapters (server, MCP, dashboard, metrics) use of ``Service``, of
``Service.sandboxes`` and of ``.snapshots``, and each method takes the parameters the real one
takes, so the adapters need no change to serve a fleet."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from fission.core.sandbox_snapshots import SandboxSnapshots
from fission.core.sandboxes import SandboxManager
from fission.core.service import Service
from fission.fleet.cluster_service import ClusterService
from fission.fleet.host_agent import HostSettings

PACKAGE = Path(__file__).resolve().parents[2] / "fission"
ADAPTERS = [*(PACKAGE / "server").rglob("*.py"), *(PACKAGE / "mcp").rglob("*.py")]
# How the adapters name a Service, its sandboxes and their snapshots.
SERVICE = re.compile(r"\bservice\.(\w+)")
MANAGER = re.compile(r"(?:\bmanager|\bservice\.sandboxes|\bsandboxes)\.(\w+)")
SNAPSHOTS = re.compile(r"(?:\bsnapshots|manager\.snapshots|sandboxes\.snapshots)\.(\w+)")


def used(pattern: re.Pattern[str], real: type) -> set[str]:
    """Names the adapters use through ``pattern`` that ``real`` has (class or instance)."""
    members = set(dir(real)) | assigned_in_init(real)
    text = "\n".join(path.read_text() for path in ADAPTERS)
    return {name for name in pattern.findall(text) if name in members}


def assigned_in_init(cls: type) -> set[str]:
    tree = ast.parse(inspect.getsource(cls.__init__).strip())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def cluster_service() -> ClusterService:
    return ClusterService(None, HostSettings(state_root=Path("/nonexistent")))


def check(real: type, stand_in: Any, names: set[str]) -> list[str]:
    wrong = []
    for name in sorted(names):
        if not hasattr(stand_in, name):
            wrong.append(f"{type(stand_in).__name__} has no {name}")
            continue
        mine, theirs = getattr(stand_in, name), getattr(real, name, None)
        if callable(theirs) and inspect.isfunction(theirs):
            wanted = list(inspect.signature(theirs).parameters)[1:]
            given = inspect.signature(mine).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in given.values())
            missing = [p for p in wanted if p not in given and not takes_any]
            if missing:
                wrong.append(f"{type(stand_in).__name__}.{name} lacks {missing}")
            async_differs = inspect.iscoroutinefunction(theirs) != inspect.iscoroutinefunction(mine)
            if async_differs and not inspect.isasyncgenfunction(mine):
                wrong.append(f"{type(stand_in).__name__}.{name}: sync/async differs")
    return wrong


def test_the_adapters_use_names_the_cluster_service_has() -> None:
    service = cluster_service()
    names = used(SERVICE, Service)
    assert {"run", "acquire", "dispose", "status", "sandboxes", "telemetry"} <= names
    assert check(Service, service, names) == []


def test_the_cluster_sandboxes_take_what_the_manager_takes() -> None:
    names = used(MANAGER, SandboxManager)
    assert {"create", "get", "list_sandboxes", "read_file", "pause", "resume"} <= names
    assert check(SandboxManager, cluster_service().sandboxes, names) == []


def test_the_cluster_snapshots_take_what_the_snapshots_take() -> None:
    names = used(SNAPSHOTS, SandboxSnapshots)
    assert {"snapshot", "fork", "create_from", "list_snapshots", "store"} <= names
    assert check(SandboxSnapshots, cluster_service().sandboxes.snapshots, names) == []


def test_cluster_status_is_served_in_both_modes() -> None:
    assert inspect.iscoroutinefunction(Service.cluster_status)
    assert inspect.iscoroutinefunction(ClusterService.cluster_status)


def test_exposed_ports_through_a_fleet_front_end_say_where_to_go() -> None:
    from fission.errors import Unsupported

    ports = cluster_service().sandboxes.ports
    for use in (lambda: ports.expose, lambda: ports.admit):
        with pytest.raises(Unsupported, match="on the daemon of the sandbox's host"):
            use()
