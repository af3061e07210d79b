"""The one token bucket: refill with an injected clock, the two ways to spend, changed limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.ratelimit import TokenBucket


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_starts_full_and_refills_up_to_its_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.tokens == 4.0
    assert [bucket.try_take() for _ in range(5)] == [0.0, 0.0, 0.0, 0.0, pytest.approx(0.5)]
    clock.now += 1.0
    assert bucket.tokens == pytest.approx(2.0)
    clock.now += 100.0
    assert bucket.tokens == 4.0


def test_try_take_spends_nothing_when_short() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=3.0, clock=clock)
    assert bucket.try_take(2.5) == 0.0
    assert bucket.try_take(2.0) == pytest.approx(1.5)  # 0.5 held, 2.0 wanted, 1 a second
    assert bucket.tokens == pytest.approx(0.5)
    clock.now += 1.5
    assert bucket.try_take(2.0) == 0.0
    assert bucket.tokens == pytest.approx(0.0)


def test_take_goes_into_debt_and_says_how_long_to_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10.0, capacity=5.0, clock=clock)
    assert bucket.take(5) == 0.0
    assert bucket.take(3) == pytest.approx(0.3)
    assert bucket.tokens == pytest.approx(-3.0)
    clock.now += 0.3
    assert bucket.take(0) == pytest.approx(0.0)


def test_a_clock_that_steps_back_earns_nothing() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=1.0, clock=clock)
    assert bucket.try_take() == 0.0
    clock.now -= 1000.0
    assert bucket.try_take() == pytest.approx(1.0)
    clock.now += 1.0  # a second after the step back
    assert bucket.try_take() == 0.0


def test_changed_limits_apply_from_the_next_call() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=100.0, clock=clock)
    bucket.take(100)
    bucket.rate = 10.0
    clock.now += 1.0
    assert bucket.tokens == pytest.approx(10.0)  # earned at the new rate
    bucket.capacity = 3.0
    assert bucket.tokens == 3.0  # clamped to the new capacity


@pytest.mark.parametrize(("rate", "capacity"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -1.0)])
def test_nonsense_limits_are_a_bug(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity)


def test_the_real_clock_by_default() -> None:
    bucket = TokenBucket(rate=1.0, capacity=1.0)
    assert bucket.try_take() == 0.0
    assert 0.9 < bucket.try_take() <= 1.0


@given(
    rate=st.floats(0.1, 1000),
    capacity=st.floats(0, 1000),
    steps=st.lists(st.tuples(st.floats(0, 10), st.floats(0, 50)), max_size=100),
)
def test_never_more_spent_than_the_bucket_plus_what_time_earned(
    rate: float, capacity: float, steps: list[tuple[float, float]]
) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, capacity, clock)
    spent = 0.0
    for gap, amount in steps:
        clock.now += gap
        wait = bucket.try_take(amount)
        if wait == 0.0:
            spent += amount
        else:
            assert 0 < wait <= amount / rate + 1e-9
    assert spent <= capacity + sum(gap for gap, _ in steps) * rate + 1e-6


@given(steps=st.lists(st.tuples(st.floats(0, 2), st.floats(0, 1 << 20)), max_size=200))
def test_paying_every_debt_holds_a_flood_to_the_rate(steps: list[tuple[float, float]]) -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000.0, capacity=100.0, clock=clock)
    started, total = clock.now, 0.0
    for gap, amount in steps:
        clock.now += gap
        clock.now += bucket.take(amount)  # the caller waits as told
        total += amount
    assert total <= 100.0 + (clock.now - started) * 1000.0 + 1e-6 * max(1.0, total)
