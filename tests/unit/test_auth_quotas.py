"""Per-key quotas: token-bucket rate limits with an injected clock, and concurrent sandbox slots."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.auth.quotas import ConcurrencyTracker, RateLimiter
from fission.errors import QuotaExceeded


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock)


def test_a_fresh_key_may_spend_a_minutes_allowance(limiter: RateLimiter) -> None:
    for _ in range(60):
        limiter.consume("k", 60)
    with pytest.raises(QuotaExceeded) as caught:
        limiter.consume("k", 60)
    error = caught.value
    assert error.http_status == 429
    assert error.code == "quota_exceeded"
    assert error.retry_after == pytest.approx(1.0)
    assert "60 requests per minute" in error.message
    assert "fission keys limits k --rate-per-minute" in error.message


def test_refill_with_the_clock(limiter: RateLimiter, clock: FakeClock) -> None:
    for _ in range(6):
        limiter.consume("k", 6)  # one token every 10 s
    with pytest.raises(QuotaExceeded):
        limiter.consume("k", 6)
    clock.advance(9.9)
    with pytest.raises(QuotaExceeded) as caught:
        limiter.consume("k", 6)
    assert caught.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    limiter.consume("k", 6)
    with pytest.raises(QuotaExceeded):
        limiter.consume("k", 6)


def test_refill_stops_at_one_minutes_worth(limiter: RateLimiter, clock: FakeClock) -> None:
    limiter.consume("k", 3)
    clock.advance(3600)
    assert limiter.remaining("k", 3) == 3
    for _ in range(3):
        limiter.consume("k", 3)
    with pytest.raises(QuotaExceeded):
        limiter.consume("k", 3)


def test_keys_have_their_own_buckets(limiter: RateLimiter) -> None:
    limiter.consume("a", 1)
    with pytest.raises(QuotaExceeded):
        limiter.consume("a", 1)
    limiter.consume("b", 1)


def test_a_lowered_limit_applies_at_once(limiter: RateLimiter) -> None:
    limiter.consume("k", 600)
    assert limiter.remaining("k", 600) == 599
    assert limiter.remaining("k", 2) == 2  # the bucket shrinks to the new capacity
    limiter.consume("k", 2)
    limiter.consume("k", 2)
    with pytest.raises(QuotaExceeded):
        limiter.consume("k", 2)


def test_a_clock_that_steps_back_earns_nothing(limiter: RateLimiter, clock: FakeClock) -> None:
    limiter.consume("k", 1)
    clock.advance(-500)
    with pytest.raises(QuotaExceeded):
        limiter.consume("k", 1)
    clock.advance(60)  # a minute after the step back
    limiter.consume("k", 1)


def test_forget(limiter: RateLimiter) -> None:
    limiter.consume("k", 1)
    limiter.forget("k")
    limiter.forget("k")
    limiter.consume("k", 1)


def test_a_rate_below_one_is_a_bug(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        limiter.consume("k", 0)


def test_the_real_clock_by_default() -> None:
    limiter = RateLimiter()
    limiter.consume("k", 1)
    with pytest.raises(QuotaExceeded) as caught:
        limiter.consume("k", 1)
    assert caught.value.retry_after is not None
    assert 59.0 < caught.value.retry_after <= 60.0


@given(
    rate=st.integers(min_value=1, max_value=1000),
    steps=st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), max_size=60),
)
def test_never_more_than_the_bucket_plus_what_time_earned(rate: int, steps: list[float]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    allowed = 0
    for step in steps:
        clock.advance(step)
        for _ in range(3):
            try:
                limiter.consume("k", rate)
                allowed += 1
            except QuotaExceeded as exc:
                assert exc.retry_after is not None
                assert 0 < exc.retry_after <= 60.0 / rate + 1e-9
    assert allowed <= rate + sum(steps) * rate / 60 + 1e-6


def test_slots_up_to_the_limit() -> None:
    tracker = ConcurrencyTracker()
    slots = [tracker.acquire("k", 3) for _ in range(3)]
    assert tracker.in_use("k") == 3
    with pytest.raises(QuotaExceeded) as caught:
        tracker.acquire("k", 3)
    error = caught.value
    assert error.http_status == 429
    assert error.retry_after is None
    assert "3 of its 3 concurrent sandboxes" in error.message
    assert "fission keys limits k --max-sandboxes" in error.message
    slots[0].release()
    assert tracker.in_use("k") == 2
    tracker.acquire("k", 3)


def test_release_is_idempotent() -> None:
    tracker = ConcurrencyTracker()
    first = tracker.acquire("k", 5)
    second = tracker.acquire("k", 5)
    first.release()
    first.release()
    assert first.released and not second.released
    assert tracker.in_use("k") == 1
    second.release()
    assert tracker.in_use("k") == 0
    assert tracker.usage() == {}


def test_slot_as_a_context_manager() -> None:
    tracker = ConcurrencyTracker()
    with pytest.raises(RuntimeError), tracker.acquire("k", 1) as slot:
        assert tracker.in_use("k") == 1
        raise RuntimeError("the run failed")
    assert slot.released
    assert tracker.in_use("k") == 0


def test_keys_are_counted_apart() -> None:
    tracker = ConcurrencyTracker()
    tracker.acquire("a", 1)
    tracker.acquire("b", 2)
    tracker.acquire("b", 2)
    assert tracker.usage() == {"a": 1, "b": 2}
    with pytest.raises(QuotaExceeded):
        tracker.acquire("a", 1)


def test_a_lowered_limit_refuses_until_enough_end() -> None:
    tracker = ConcurrencyTracker()
    slots = [tracker.acquire("k", 4) for _ in range(4)]
    with pytest.raises(QuotaExceeded, match="4 of its 2"):
        tracker.acquire("k", 2)
    for slot in slots[:3]:
        slot.release()
    tracker.acquire("k", 2)


def test_threads_never_exceed_the_limit() -> None:
    tracker = ConcurrencyTracker()
    limit, peak, lock = 4, [0], threading.Lock()

    def work() -> None:
        for _ in range(200):
            try:
                slot = tracker.acquire("k", limit)
            except QuotaExceeded:
                continue
            with lock:
                peak[0] = max(peak[0], tracker.in_use("k"))
            slot.release()
            slot.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= peak[0] <= limit
    assert tracker.in_use("k") == 0


def test_quota_errors_cross_the_wire() -> None:
    from fission.api.run_stream import error_body, error_from_body

    error = error_from_body(error_body(QuotaExceeded("over", retry_after=2.0)))
    assert type(error) is QuotaExceeded
    assert (error.message, error.http_status) == ("over", 429)
