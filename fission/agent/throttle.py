"""A token bucket for what one guest may send the host: frames and bytes per second (pure).

A guest that floods the agent channel (millions of tiny frames, or output as fast as it can)
must not take the host's CPU from everyone else. The channel asks ``delay`` after each frame
and sleeps that long before reading the next: the guest's writes then block in the virtio
queue, so the flood slows down in the guest instead of piling up on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fission.ratelimit import TokenBucket

FRAMES_PER_SECOND = 20_000.0
FRAME_BURST = 4_000.0
BYTES_PER_SECOND = 128.0 * 1024 * 1024
BYTE_BURST = 32.0 * 1024 * 1024


@dataclass
class Throttle:
    """Two token buckets (frames, bytes); ``delay`` says how long to wait before reading on."""

    frames_per_second: float = FRAMES_PER_SECOND
    frame_burst: float = FRAME_BURST
    bytes_per_second: float = BYTES_PER_SECOND
    byte_burst: float = BYTE_BURST
    clock: Callable[[], float] = time.monotonic
    _frames: TokenBucket = field(init=False)
    _bytes: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self._frames = TokenBucket(self.frames_per_second, self.frame_burst, self.clock)
        self._bytes = TokenBucket(self.bytes_per_second, self.byte_burst, self.clock)

    def delay(self, size: int) -> float:
        """Account one frame of ``size`` payload bytes; seconds to wait before the next read."""
        # A frame already read is spent even when over the limit: the debt is the wait.
        return max(self._frames.take(1), self._bytes.take(size))
