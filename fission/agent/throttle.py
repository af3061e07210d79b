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
    _frames: float = field(init=False)
    _bytes: float = field(init=False)
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._frames, self._bytes = self.frame_burst, self.byte_burst
        self._last = self.clock()

    def delay(self, size: int) -> float:
        """Account one frame of ``size`` payload bytes; seconds to wait before the next read."""
        now = self.clock()
        elapsed, self._last = max(0.0, now - self._last), now
        self._frames = min(self.frame_burst, self._frames + elapsed * self.frames_per_second)
        self._bytes = min(self.byte_burst, self._bytes + elapsed * self.bytes_per_second)
        self._frames -= 1
        self._bytes -= size
        return max(
            -self._frames / self.frames_per_second if self._frames < 0 else 0.0,
            -self._bytes / self.bytes_per_second if self._bytes < 0 else 0.0,
        )
