"""Per-key quotas, pure logic without I/O: request rate (token buckets) and concurrent sandboxes.

Both are in-process and keyed by API key id; limits are passed on each call, so a changed limit
(`fission keys limits`) applies from the key's next request. Each keeps its state behind a
``threading.Lock`` held for a few arithmetic steps and never across an ``await``, so they are
safe from threads and from the event loop of one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from fission.errors import QuotaExceeded
from fission.ratelimit import TokenBucket


class RateLimiter:
    """One token bucket per key: ``rate_per_minute`` tokens a minute, at most that many banked.

    A key that was idle may therefore spend a whole minute's allowance at once; over any long
    stretch it gets ``rate_per_minute`` requests a minute. ``clock`` returns seconds on a
    monotonic scale (``time.monotonic`` unless a test injects one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, key_id: str, rate_per_minute: int) -> TokenBucket:
        """The key's bucket at the key's current limit (lock held); a new key's starts full."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = TokenBucket(rate_per_minute / 60.0, rate_per_minute, self._clock)
            self._buckets[key_id] = bucket
        # Limits come with each call: a changed one applies from this request on.
        bucket.rate, bucket.capacity = rate_per_minute / 60.0, float(rate_per_minute)
        return bucket

    def consume(self, key_id: str, rate_per_minute: int) -> None:
        """Count one request for ``key_id``; QuotaExceeded (with ``retry_after``) when over."""
        if rate_per_minute < 1:
            raise ValueError(f"rate_per_minute must be at least 1, got {rate_per_minute}")
        with self._lock:
            bucket = self._bucket(key_id, rate_per_minute)
            retry_after = bucket.try_take()
            if not retry_after:
                return
        raise QuotaExceeded(
            f"API key {key_id} is over its rate limit of {rate_per_minute} requests per minute: "
            f"retry in {retry_after:.2f} s, or raise the limit with "
            f"`fission keys limits {key_id} --rate-per-minute N`",
            retry_after=retry_after,
        )

    def remaining(self, key_id: str, rate_per_minute: int) -> int:
        """Requests ``key_id`` could make right now (for a RateLimit-Remaining header)."""
        with self._lock:
            return int(self._bucket(key_id, rate_per_minute).tokens)

    def forget(self, key_id: str) -> None:
        """Drop a key's bucket (after revoking it); its next request starts with a full one."""
        with self._lock:
            self._buckets.pop(key_id, None)


class Slot:
    """One sandbox's hold on its key's concurrency quota; ``release`` is safe to call twice."""

    def __init__(self, tracker: ConcurrencyTracker, key_id: str) -> None:
        self.key_id = key_id
        self.released = False
        self._tracker = tracker

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        self._tracker._release(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ConcurrencyTracker:
    """How many sandboxes each key holds, refusing a new one beyond the key's limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def acquire(self, key_id: str, limit: int) -> Slot:
        """A slot for one more sandbox of ``key_id``; QuotaExceeded when ``limit`` are held."""
        with self._lock:
            held = self._held.get(key_id, 0)
            if held < limit:
                self._held[key_id] = held + 1
                return Slot(self, key_id)
        raise QuotaExceeded(
            f"API key {key_id} already has {held} of its {limit} concurrent sandboxes: end one "
            f"first, or raise the limit with `fission keys limits {key_id} --max-sandboxes N`"
        )

    def _release(self, slot: Slot) -> None:
        """Count ``slot``'s sandbox as ended, once (only ``Slot.release`` calls this)."""
        with self._lock:
            if slot.released:
                return
            slot.released = True
            held = self._held.get(slot.key_id, 0) - 1
            if held > 0:
                self._held[slot.key_id] = held
            else:
                self._held.pop(slot.key_id, None)

    def in_use(self, key_id: str) -> int:
        """Sandboxes ``key_id`` holds now."""
        with self._lock:
            return self._held.get(key_id, 0)

    def usage(self) -> dict[str, int]:
        """Sandboxes held now, per key id (keys holding none are left out)."""
        with self._lock:
            return dict(self._held)
