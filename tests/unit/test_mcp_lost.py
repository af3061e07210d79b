"""MCP tools show why a lost sandbox is lost (``lost_reason``), on the fake driver."""

from __future__ import annotations

from pathlib import Path

from mcp import Client

from fission.core.languages import resolve_language
from fission.core.sandbox_restore import lose
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.mcp import McpOptions, build_server
from fission.mcp.outputs import sandbox_info
from tests.unit.test_mcp_tools import ObservedService, call, data, fake_factory, no_vm_left, runtime

__all__ = ["no_vm_left", "runtime"]  # fixtures, shared with test_mcp_tools


def test_sandbox_info_carries_the_reason_of_a_lost_sandbox_only() -> None:
    spec = SandboxSpec(resolve_language("bash"))
    lost = SandboxRecord("sbx_1", spec, None, 0.0, 10.0, SandboxState.LOST, "its VM ended")
    info = sandbox_info(lost, now=5.0)
    assert (info.state, info.lost_reason, info.expires_at) == ("lost", "its VM ended", None)
    running = SandboxRecord("sbx_2", spec, None, 0.0, 10.0, SandboxState.RUNNING)
    assert sandbox_info(running, now=5.0).lost_reason is None


async def test_sandbox_list_shows_a_lost_sandbox_and_its_reason(runtime: Path) -> None:
    async with Client(build_server(McpOptions(), fake_factory)) as client:
        created = data(await call(client, "sandbox_create", language="bash", ttl=60))
        assert created["lost_reason"] is None
        manager = ObservedService.made[-1].sandboxes
        reason = "its VM (pid 4242) ended while no daemon managed it"
        await lose(manager, manager._box(created["id"], None), reason)
        (listed,) = data(await call(client, "sandbox_list"))["sandboxes"]
        assert (listed["id"], listed["state"]) == (created["id"], "lost")
        assert listed["lost_reason"] == reason
        refused = await call(client, "sandbox_run_code", sandbox_id=created["id"], code="echo")
        assert refused.is_error and reason in str(refused.content)
        data(await call(client, "sandbox_delete", sandbox_id=created["id"]))
