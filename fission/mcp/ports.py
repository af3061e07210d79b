"""The MCP tools of exposed ports: expose a sandbox's port and get a URL, list, unexpose.

The MCP server has no REST API of its own: ``fission mcp`` serves exposed ports on a loopback
listener (``ports_url``, started by the command), where only port tokens admit. So
``sandbox_expose`` mints a token and returns a URL that carries it (a browser keeps it in a
cookie after the first visit); whoever has the URL reaches the port, until it is unexposed.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from pydantic import BaseModel, Field

from fission.core.service import Service
from fission.errors import NotReady

Port = Annotated[
    int,
    Field(ge=1, le=65535, description="A TCP port a program in the sandbox listens on."),
]
SandboxIdArg = Annotated[str, Field(description="The sandbox's id (sbx_...).")]


class ExposedPortInfo(BaseModel):
    """An exposed port of a sandbox."""

    sandbox_id: str
    port: int
    url: str | None = Field(
        default=None,
        description="Open this URL (HTTP or WebSocket) to reach the port; it carries a token.",
    )
    path: str = Field(description="The port's path on the listener, without a token.")


class PortList(BaseModel):
    """A sandbox's exposed ports."""

    ports: list[ExposedPortInfo]


class PortsGone(BaseModel):
    """The outcome of sandbox_unexpose."""

    sandbox_id: str
    port: int
    unexposed: bool = Field(description="True: the URL and its tokens no longer open the port.")


class PortTools:
    """The exposed-port tools; ``ports_url`` is the loopback listener's base URL, if any."""

    ports_url: str | None = None

    @property
    def service(self) -> Service:  # provided by FissionTools
        raise NotImplementedError

    def _listener(self) -> str:
        if self.ports_url is None:
            raise NotReady(
                "this MCP server has no listener for exposed ports (run it with `fission mcp`)"
            )
        return self.ports_url

    async def sandbox_expose(self, sandbox_id: SandboxIdArg, port: Port) -> ExposedPortInfo:
        """Make a port of a sandbox reachable from this machine: start a server listening on
        127.0.0.1:PORT in the sandbox (e.g. with sandbox_exec and `nohup ... &`), then open the
        returned URL (HTTP or WebSocket). The URL works until sandbox_unexpose or the sandbox
        ends; share it only with who may use the program."""
        base = self._listener()
        ports = self.service.sandboxes.ports
        exposure = ports.expose(sandbox_id, port)
        minted = ports.mint_token(sandbox_id, port)
        url = f"{base}{exposure['path']}?{urlencode({'fission_token': minted['token']})}"
        return ExposedPortInfo(sandbox_id=sandbox_id, port=port, url=url, path=exposure["path"])

    async def sandbox_ports(self, sandbox_id: SandboxIdArg) -> PortList:
        """List a sandbox's exposed ports (their URLs were given by sandbox_expose)."""
        found = self.service.sandboxes.ports.list_ports(sandbox_id)
        return PortList(
            ports=[
                ExposedPortInfo(sandbox_id=sandbox_id, port=item["port"], path=item["path"])
                for item in found
            ]
        )

    async def sandbox_unexpose(self, sandbox_id: SandboxIdArg, port: Port) -> PortsGone:
        """Stop exposing a port: its URLs stop working and open connections end."""
        await self.service.sandboxes.ports.unexpose(sandbox_id, port)
        return PortsGone(sandbox_id=sandbox_id, port=port, unexposed=True)
