"""A server stopping with a dashboard page open: its live streams end at once, so the daemon's
uvicorn Server (``daemon.server_for``) stops in well under the streams' 10 seconds.

A real uvicorn Server on a Unix socket over a fake-driver service (its lifespan off: the
fixture started the service), and a real HTTP client holding a live stream open.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import uvicorn

from fission.core.service import Service
from fission.server.app import create_app
from fission.server.daemon import server_for
from fission.server.dashboard.live import LIVE_STREAM_SECONDS

STOP_WITHIN = 2.0  # seconds; a live stream alone would hold the shutdown LIVE_STREAM_SECONDS


async def test_a_server_with_an_open_live_stream_stops_at_once(
    service: Service, tmp_path: Path
) -> None:
    app = create_app(service)  # the Unix socket's app: the local admin, no keys
    where = tmp_path / "d.sock"
    config = uvicorn.Config(app, uds=str(where), lifespan="off", log_level="warning")
    server = server_for(config, None, app.state.stopping.set)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start within 10 s"
        assert not serving.done(), serving
        await asyncio.sleep(0.01)
    transport = httpx.AsyncHTTPTransport(uds=str(where))
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        login = await client.get("/ui/login")  # on the local socket: a session at once
        assert login.status_code == 303
        async with client.stream("GET", "/ui/live/overview") as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            while "event: fragment" not in await anext(lines):
                pass  # the page's first fragment: the stream is open and live
            stopping_at = time.monotonic()
            server.should_exit = True  # what SIGTERM does
            rest = [line async for line in lines]  # the stream ends rather than run on
            await asyncio.wait_for(serving, LIVE_STREAM_SECONDS + 5)
    took = time.monotonic() - stopping_at
    assert took < STOP_WITHIN, f"stopping took {took:.1f} s with a live stream open"
    assert "event: logout" not in rest  # it ended because the server stopped, not the session
    assert app.state.stopping.is_set()
