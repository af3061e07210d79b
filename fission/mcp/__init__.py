"""fission over MCP (Model Context Protocol): tools an LLM client calls to run code in microVMs.

``fission mcp`` serves them over stdio or streamable HTTP with the official ``mcp`` SDK::

    errors.py    FissionError -> MCP tool error (code, message, next step)
    files.py     inline file contents (capped) and the shared host directory
    outputs.py   what the tools return (structured, with schemas)
    runtime.py   the server's own Service, state dir and clean-up
    server.py    the MCPServer, its lifespan and the two transports
    tools.py     the tools: thin adapters over Service and SandboxManager
"""

from fission.mcp.runtime import McpOptions, build_options
from fission.mcp.server import build_server, serve

__all__ = ["McpOptions", "build_options", "build_server", "serve"]
