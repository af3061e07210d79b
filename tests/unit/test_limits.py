"""Resource limits: defaults, ranges whose errors name the CLI option, and --env parsing."""

from __future__ import annotations

import math
import os

import pytest

from fission.core.limits import MB, RANGES, Limits, parse_env
from fission.errors import InvalidInput, LimitOutOfRange

OPTIONS = {
    "timeout": "--timeout",
    "memory_mb": "--memory",
    "cpus": "--cpus",
    "disk_mb": "--disk",
    "pids": "--pids",
    "output_limit_mb": "--output-limit",
}


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with more CPUs than any range allows, so only the range itself is tested."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1024)


def test_every_limit_has_a_range_naming_its_option() -> None:
    assert {name: r.option for name, r in RANGES.items()} == OPTIONS


def test_defaults_are_valid_and_documented() -> None:
    limits = Limits()
    assert (limits.timeout, limits.memory_mb, limits.cpus) == (30.0, 256, 1)
    assert (limits.disk_mb, limits.pids, limits.output_limit_mb) == (512, 256, 10.0)
    assert limits.output_limit_bytes == 10 * MB


@pytest.mark.usefixtures("many_cpus")
@pytest.mark.parametrize("name", list(RANGES))
def test_the_ends_of_each_range_are_accepted(name: str) -> None:
    low, high = RANGES[name].low, RANGES[name].high
    if isinstance(getattr(Limits(), name), int):
        low, high = int(low), int(high)
    assert getattr(Limits(**{name: low}), name) == low  # type: ignore[arg-type]
    assert getattr(Limits(**{name: high}), name) == high  # type: ignore[arg-type]


def outside(name: str) -> list[tuple[str, float]]:
    allowed = RANGES[name]
    step = 1 if isinstance(getattr(Limits(), name), int) else allowed.low / 10
    return [
        (name, allowed.low - step),
        (name, allowed.high + step),
        (name, -1),
        (name, 0),
        (name, math.inf),
        (name, -math.inf),
    ]


@pytest.mark.usefixtures("many_cpus")
@pytest.mark.parametrize(("name", "value"), [case for name in RANGES for case in outside(name)])
def test_values_outside_the_range_name_their_option(name: str, value: float) -> None:
    with pytest.raises(LimitOutOfRange, match=f"^{OPTIONS[name]} .*out of range") as caught:
        Limits(**{name: value})  # type: ignore[arg-type]
    # The message says what is accepted.
    assert f"{RANGES[name].low:g}" in str(caught.value)
    assert RANGES[name].unit in str(caught.value)


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("value", [math.nan, True, False, "1", None, [1], 1j])
def test_nan_bools_and_non_numbers_are_refused(name: str, value: object) -> None:
    with pytest.raises(LimitOutOfRange, match=f"^{OPTIONS[name]} "):
        Limits(**{name: value})  # type: ignore[arg-type]


def test_limit_errors_are_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        Limits(memory_mb=1)


def test_cpus_beyond_this_host_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert Limits(cpus=2).cpus == 2
    with pytest.raises(LimitOutOfRange, match="--cpus 3 is more than this host's 2 CPUs"):
        Limits(cpus=3)


def test_an_unknown_cpu_count_allows_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert Limits(cpus=1).cpus == 1
    with pytest.raises(LimitOutOfRange, match="--cpus"):
        Limits(cpus=2)


@pytest.mark.parametrize(("mb", "expected"), [(0.001, 1048), (1, MB), (2.5, 5 * MB // 2)])
def test_output_limit_bytes(mb: float, expected: int) -> None:
    assert Limits(output_limit_mb=mb).output_limit_bytes == expected


@pytest.mark.usefixtures("many_cpus")
@pytest.mark.parametrize(
    ("name", "value"), [("cpus", 1.5), ("memory_mb", 256.5), ("disk_mb", 100.25), ("pids", 64.5)]
)
def test_whole_number_limits_refuse_fractions(name: str, value: float) -> None:
    with pytest.raises(LimitOutOfRange, match=OPTIONS[name]):
        Limits(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], {}),
        (["A=1"], {"A": "1"}),
        (["_x=2", "B_2=x=y", "C="], {"_x": "2", "B_2": "x=y", "C": ""}),
        (["lower=ok", "MIXED_Case9=v"], {"lower": "ok", "MIXED_Case9": "v"}),
        (["A=with spaces and \u00e9"], {"A": "with spaces and \u00e9"}),
        (["A=1", "A=2"], {"A": "2"}),
    ],
)
def test_parse_env_accepts_key_value_pairs(pairs: list[str], expected: dict[str, str]) -> None:
    assert parse_env(pairs) == expected


@pytest.mark.parametrize("bad", ["NOEQ", "", "=v", "="])
def test_parse_env_needs_a_key_and_an_equals_sign(bad: str) -> None:
    with pytest.raises(InvalidInput, match="is not KEY=VALUE"):
        parse_env(["GOOD=1", bad])


@pytest.mark.parametrize("bad", ["1A=v", "9=v", "A-B=v", "A B=v", "A.B=v", " A=v", "A\0=v", "$A=v"])
def test_parse_env_refuses_bad_names(bad: str) -> None:
    with pytest.raises(InvalidInput, match="--env name"):
        parse_env([bad])


@pytest.mark.parametrize("bad", ["A=\0", "A=x\0y", "A=\0\0"])
def test_parse_env_refuses_nul_in_values(bad: str) -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        parse_env([bad])
