"""Exposed ports on real VMs: a guest web server and a guest WebSocket server, reached through
the daemon's URL; other keys, forged and revoked tokens refused; streams end with the sandbox.

One keyed daemon on loopback TCP and one sandbox serve the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.integration.servers import TcpDaemon

pytestmark = pytest.mark.vm

# A WebSocket echo server in the stdlib only (the image has no websockets package).
ECHO_SERVER = r"""
import base64, hashlib, socket, struct, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def frame(op, data):
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n))
    return head + data
def serve(conn):
    f = conn.makefile("rb")
    key = b""
    while (line := f.readline().strip()):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while True:
        b1, b2 = f.read(2)
        n = b2 & 0x7F
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        mask = f.read(4)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(f.read(n)))
        op = b1 & 0x0F
        if op == 8:
            conn.sendall(frame(8, data)); return
        conn.sendall(frame(op, b"echo:" + data))
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765)); s.listen(8)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[TcpDaemon, str, str]]:
    server = TcpDaemon("--pool", "python=0")
    owner = server.create_key("owner")
    other = server.create_key("other")
    server.start()
    try:
        yield server, owner, other
    finally:
        server.stop()


@pytest.fixture(scope="module")
def box(daemon: tuple[TcpDaemon, str, str]) -> Iterator[str]:
    server, owner, _ = daemon
    with server.client(owner) as client:
        made = client.post("/v1/sandboxes", json={"language": "python", "ttl": 600})
        assert made.status_code == 201, made.text
        sandbox_id = made.json()["id"]
        client.put(
            f"/v1/sandboxes/{sandbox_id}/files",
            params={"path": "/home/sandbox/site/hello.txt"},
            content=b"hello from the guest\n",
        )
        client.put(
            f"/v1/sandboxes/{sandbox_id}/files",
            params={"path": "/home/sandbox/echo.py"},
            content=ECHO_SERVER.encode(),
        )
        # A run's leftover processes are killed when it ends: each server is a run of its own
        # that lasts until the sandbox goes (its exec then ends with the sandbox).
        for command in (
            "cd site && exec python3 -m http.server 8000 --bind 127.0.0.1",
            "exec python3 echo.py",
        ):
            threading.Thread(
                target=run_forever, args=(server, owner, sandbox_id, command), daemon=True
            ).start()
        for port in (8000, 8765):
            exposed = client.post(f"/v1/sandboxes/{sandbox_id}/expose", json={"port": port})
            assert exposed.status_code == 201, exposed.text
        yield sandbox_id


def run_forever(server: TcpDaemon, key: str, sandbox_id: str, command: str) -> None:
    """Run ``command`` in the sandbox until it (or the sandbox) ends."""
    with server.client(key) as client, contextlib.suppress(httpx.HTTPError):
        client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": command, "timeout": 900})


def wait_for(client: httpx.Client, url: str) -> httpx.Response:
    """GET ``url`` until the guest server answers (it may still be starting), 60 s at most."""
    deadline = time.monotonic() + 60
    while True:
        response = client.get(url)
        if response.status_code != 502 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def test_a_guest_http_server_through_the_daemon(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, other = daemon
    url = f"/v1/sandboxes/{box}/ports/8000/hello.txt"
    with server.client(owner) as client:
        answer = wait_for(client, url)
        assert answer.status_code == 200, answer.text
        assert answer.text == "hello from the guest\n"
        listing = client.get(f"/v1/sandboxes/{box}/ports/8000/")
        assert listing.status_code == 200 and "hello.txt" in listing.text
        missing = client.get(f"/v1/sandboxes/{box}/ports/8000/nope")
        assert missing.status_code == 404  # the guest server's own 404
        closed = client.post(f"/v1/sandboxes/{box}/expose", json={"port": 8001})
        assert closed.status_code == 201
        nothing = client.get(f"/v1/sandboxes/{box}/ports/8001/")
        assert nothing.status_code == 502 and nothing.json()["error"]["code"] == "port_unreachable"
    with server.client(other) as stranger:
        assert stranger.get(url).status_code == 404  # another key: not its sandbox
    with server.client(None) as nobody:
        assert nobody.get(url).status_code == 401


def test_a_port_token_lets_a_browser_in_until_revoked(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, _ = daemon
    with server.client(owner) as client:
        wait_for(client, f"/v1/sandboxes/{box}/ports/8000/hello.txt")
        minted = client.post(f"/v1/sandboxes/{box}/exposed/8000/tokens").json()
    with httpx.Client(base_url=server.url, follow_redirects=True, timeout=60) as browser:
        page = browser.get(
            f"/v1/sandboxes/{box}/ports/8000/hello.txt?fission_token={minted['token']}"
        )
        assert page.status_code == 200 and page.text == "hello from the guest\n"
        assert "fission_token" not in str(page.url)  # swapped for a cookie
        again = browser.get(f"/v1/sandboxes/{box}/ports/8000/hello.txt")  # the cookie alone
        assert again.status_code == 200
        forged = minted["token"][:-3] + "abc"
        with httpx.Client(base_url=server.url, timeout=60) as fresh:
            refused = fresh.get(
                f"/v1/sandboxes/{box}/ports/8000/", headers={"X-Fission-Port-Token": forged}
            )
            assert refused.status_code == 401
        with server.client(owner) as client:
            revoked = client.delete(f"/v1/sandboxes/{box}/exposed/8000/tokens/{minted['token_id']}")
            assert revoked.status_code == 204
        assert browser.get(f"/v1/sandboxes/{box}/ports/8000/hello.txt").status_code == 401


def test_a_guest_websocket_server_through_the_daemon(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, other = daemon
    ws_url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{box}/ports/8765/"

    async def talk() -> list[str | bytes]:
        headers = {"Authorization": f"Bearer {owner}"}
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            await ws.send("hi")
            await ws.send(b"\x00\x01")
            return [await ws.recv(), await ws.recv()]

    deadline = time.monotonic() + 60
    while True:
        try:
            assert asyncio.run(talk()) == ["echo:hi", b"echo:\x00\x01"]
            break
        except websockets.InvalidStatus:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

    async def stranger() -> None:
        headers = {"Authorization": f"Bearer {other}"}
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            await ws.recv()

    with pytest.raises((websockets.InvalidStatus, websockets.ConnectionClosed)):
        asyncio.run(stranger())


def test_the_daemon_port_is_not_reachable_from_other_interfaces(
    daemon: tuple[TcpDaemon, str, str],
) -> None:
    server, _, _ = daemon
    addresses = {
        info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: picks the outward address
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    outward = [a for a in addresses if not a.startswith("127.")]
    if not outward:
        pytest.skip("this host has no non-loopback IPv4 address")
    for address in outward:
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((address, server.port)) != 0, address


def test_streams_end_when_the_sandbox_is_deleted(
    daemon: tuple[TcpDaemon, str, str], box: str
) -> None:
    server, owner, _ = daemon
    ws_url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{box}/ports/8765/"

    async def hold_then_delete() -> None:
        headers = {"Authorization": f"Bearer {owner}"}
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            await ws.send("before")
            assert await ws.recv() == "echo:before"
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
                assert (await c.delete(f"/v1/sandboxes/{box}")).status_code == 204
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(30):
                    await ws.recv()

    asyncio.run(hold_then_delete())
    with server.client(owner) as client:
        assert client.get(f"/v1/sandboxes/{box}/ports/8000/").status_code == 404
