"""A VM's way out when its policy allows one: the guest's proxy port, the tunnel, the proxy.

``attach`` asks the agent to listen on ``PROXY_PORT`` inside the guest and serves the tunnel's
streams with a fresh ``EgressProxy``; ``Egress.aclose`` ends every connection. The owner of the
VM closes it before destroying the VM, so nothing of it outlives the VM. ``proxy_env`` is what
a run's environment gets so that pip, git, curl, npm, urllib and requests use the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from fission.agent.client import AgentClient
from fission.agent.tunnel_streams import HostTunnel
from fission.net.policy import NetworkPolicy
from fission.net.proxy import EgressProxy, EventSink

PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
LISTEN_TIMEOUT = 10.0


def proxy_env(policy: NetworkPolicy, index_url: str | None = None) -> dict[str, str]:
    """Environment that points the guest's tools at the proxy (empty when the network is off)."""
    if not policy.enabled:
        return {}
    env = {
        name: PROXY_URL
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")
    }
    env |= {
        "NO_PROXY": "",
        "no_proxy": "",
        "npm_config_proxy": PROXY_URL,
        "npm_config_https_proxy": PROXY_URL,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.proxy",
        "GIT_CONFIG_VALUE_0": PROXY_URL,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    if index_url:
        env["PIP_INDEX_URL"] = index_url
        env["npm_config_registry"] = index_url
    return env


@dataclass
class Egress:
    """A running proxy for one VM."""

    proxy: EgressProxy
    tunnel: HostTunnel

    async def aclose(self) -> None:
        """End every connection and stop serving (safe twice)."""
        await self.tunnel.aclose()


async def attach(
    agent: AgentClient, policy: NetworkPolicy, on_event: EventSink | None = None
) -> Egress | None:
    """Give the VM of ``agent`` its way out under ``policy``; None when the network is off."""
    if not policy.enabled:
        return None
    proxy = EgressProxy(policy, on_event)
    # The proxy refuses (and records) connections beyond the cap; the tunnel's own cap, higher,
    # only bounds what a guest flooding the port can make the host hold.
    tunnel = agent.open_tunnel(proxy.handle, 2 * policy.max_connections)
    try:
        await agent.listen(PROXY_PORT, timeout=LISTEN_TIMEOUT)
    except BaseException:
        await tunnel.aclose()
        raise
    return Egress(proxy, tunnel)
