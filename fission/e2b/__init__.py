"""E2B's API on the fission daemon: existing E2B SDK code runs unchanged against fission.

``create_e2b_app`` is one ASGI application, mounted at ``/e2b`` on the daemon's app, that
answers all three of the APIs E2B's SDKs call, told apart the way E2B's own edge does:

* no ``E2b-Sandbox-Id`` header: the control plane (``control``: create, connect, list,
  kill, timeout, pause; the SDK's ``X-API-Key`` is a fission API key);
* ``E2b-Sandbox-Id`` with ``E2b-Sandbox-Port: 49983``: envd, the in-sandbox API
  (``processes``, ``filesystem``: Connect RPC with the message classes the ``e2b`` package
  ships, and ``/files`` uploads and downloads);
* port 49999: the code interpreter's ``/execute`` and ``/contexts`` (``interpreter``).

Users point the SDK here with ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` both set to
``http://HOST:PORT/e2b`` and ``E2B_API_KEY`` set to a fission key (docs/e2b.md). The sandbox
calls are authorised by the per-sandbox ``X-Access-Token`` the control plane hands out
(``access``). Adapters only: every call goes to the daemon's ``SandboxManager``.
"""

from __future__ import annotations

from fission.e2b.app import create_e2b_app

__all__ = ["create_e2b_app"]
