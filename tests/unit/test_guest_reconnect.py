"""The guest agent when the host side leaves mid-stream (a daemon dies; the next re-attaches).

The agent runs here on a socketpair standing in for its virtio-serial port: what it does on
EOF is what matters (start the frame decoder over, send nothing until a host is back).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator

import pytest

from fission.guest import agent, protocol


@pytest.fixture
def channel() -> Iterator[tuple[agent.Agent, socket.socket]]:
    guest_end, host_end = socket.socketpair()
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield agent.Agent(guest_end.fileno()), host_end
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, previous)
        guest_end.close()
        host_end.close()


def test_a_partial_frame_is_forgotten_when_the_host_leaves(
    channel: tuple[agent.Agent, socket.socket],
) -> None:
    guest, host = channel
    ping = protocol.encode_json(protocol.FrameType.PING, 7, {})
    host.sendall(ping[:5])  # the host dies in the middle of a frame
    guest.on_channel()
    host.shutdown(socket.SHUT_WR)
    guest.on_channel()
    assert guest.connected is False
    # The next host's first frame is read from its first byte, not after the stale five.
    assert guest.decoder.feed(ping) == [protocol.Frame(protocol.FrameType.PING, 7, b"{}")]


def test_nothing_is_sent_while_no_host_is_connected(
    channel: tuple[agent.Agent, socket.socket],
) -> None:
    guest, host = channel
    guest.send_json(protocol.FrameType.PONG, 1, {})
    assert host.recv(100) == protocol.encode_json(protocol.FrameType.PONG, 1, {})
    host.shutdown(socket.SHUT_WR)
    guest.on_channel()
    guest.orphans.add(5)
    guest.send_json(protocol.FrameType.EXIT, 5, {"exit_code": 0})
    guest.send_json(protocol.FrameType.PONG, 2, {})
    host.setblocking(False)
    with pytest.raises(BlockingIOError):
        host.recv(100)
