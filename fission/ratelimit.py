"""The one token bucket (pure, no I/O): ``rate`` tokens a second, at most ``capacity`` banked.

Two ways to spend, for the two kinds of callers:

* ``try_take`` spends only what the bucket holds and otherwise says how long until it will: a
  request is refused with that as its ``retry_after`` (``auth.quotas``);
* ``take`` always spends, going into debt, and says how long until the debt is paid: the caller
  waits that long before going on (``agent.throttle`` slows a guest that floods its channel).

A bucket starts full. ``clock`` returns seconds on a monotonic scale (``time.monotonic`` unless a
test injects one); a clock that steps back earns nothing. ``rate`` and ``capacity`` may be
changed between calls: the next refill earns at the new rate and clamps to the new capacity.
Not locked: a caller shared between threads holds its own lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Tokens earned at ``rate`` per second up to ``capacity``; starts full."""

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or capacity < 0:
            raise ValueError(f"need rate > 0 and capacity >= 0, got {rate} and {capacity}")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._updated = clock()

    def _refill(self) -> float:
        """Add what the time since the last count earned (capped); the tokens held now."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now
        return self._tokens

    @property
    def tokens(self) -> float:
        """Tokens held now (negative while in debt)."""
        return self._refill()

    def try_take(self, amount: float = 1.0) -> float:
        """Spend ``amount`` if the bucket holds it and return 0.0; else spend nothing and return
        the seconds until it will hold it (always more than 0)."""
        short = amount - self._refill()
        if short > 0:
            return short / self.rate
        self._tokens -= amount
        return 0.0

    def take(self, amount: float) -> float:
        """Spend ``amount`` now, into debt if need be; seconds until the debt is paid (or 0.0)."""
        self._tokens = self._refill() - amount
        return max(0.0, -self._tokens) / self.rate
