"""The E2B API's one ASGI application: routes each request to the API it is for.

E2B's SDK sends the control plane's calls to ``E2B_API_URL`` and every in-sandbox call to
``E2B_SANDBOX_URL`` with the headers ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` (49983:
envd; 49999: the code interpreter). Pointing both URLs at this app (mounted at ``/e2b``)
lets one daemon port serve them all; the headers say which is which.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from e2b.envd.filesystem.filesystem_connect import FilesystemASGIApplication
from e2b.envd.process.process_connect import ProcessASGIApplication

from fission.core.sandboxes import SandboxManager
from fission.e2b.access import ENVD_PORT, JUPYTER_PORT, Admit, SandboxAccess
from fission.e2b.control import create_control_app
from fission.e2b.envd_http import create_envd_http
from fission.e2b.filesystem import FilesystemService
from fission.e2b.interpreter import create_interpreter_app
from fission.e2b.processes import ProcessService

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CONNECT_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")


class E2BApp:
    """Dispatches by the E2B headers: control plane, envd (Connect RPC or HTTP), interpreter."""

    def __init__(self, manager: SandboxManager, admit: Admit) -> None:
        self.access = SandboxAccess(manager)
        self.processes = ProcessService(manager, self.access)
        self.filesystem = FilesystemService(manager, self.access)
        self.control = create_control_app(manager, self.access, admit)
        self.envd_http = create_envd_http(manager, self.access)
        self.interpreter = create_interpreter_app(manager, self.access)
        self.process_rpc = ProcessASGIApplication(self.processes)
        self.filesystem_rpc = FilesystemASGIApplication(self.filesystem)

    def route(self, scope: Scope) -> ASGIApp:
        """The application that serves a request with this scope."""
        headers = dict(scope.get("headers") or ())
        port = headers.get(b"e2b-sandbox-port")
        if b"e2b-sandbox-id" not in headers:
            return self.control
        if port == str(JUPYTER_PORT).encode():
            return self.interpreter
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path.startswith(CONNECT_PREFIXES[0]):
            return self.process_rpc
        if path.startswith(CONNECT_PREFIXES[1]):
            return self.filesystem_rpc
        if port in (None, str(ENVD_PORT).encode()):
            return self.envd_http
        return self.envd_http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # the daemon's lifespan is its own app's; E2B has no WebSocket calls here
        await self.route(scope)(scope, receive, send)


def create_e2b_app(manager: SandboxManager, admit: Admit) -> E2BApp:
    """The E2B API over ``manager``; ``admit`` checks a caller's fission API key."""
    return E2BApp(manager, admit)
