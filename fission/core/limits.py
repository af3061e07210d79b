"""Resource limits of one run, their defaults and accepted ranges (pure)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from fission.errors import InvalidInput, LimitOutOfRange

MB = 1024 * 1024


@dataclass(frozen=True)
class Range:
    """Accepted values of one limit, with the CLI option that sets it (for messages)."""

    option: str
    low: float
    high: float
    unit: str
    whole: bool = False


RANGES = {
    "timeout": Range("--timeout", 0.1, 3600, "seconds"),
    "memory_mb": Range("--memory", 32, 16384, "MB", whole=True),
    "cpus": Range("--cpus", 1, 32, "vCPUs", whole=True),
    "disk_mb": Range("--disk", 16, 65536, "MB", whole=True),
    "pids": Range("--pids", 8, 65536, "processes", whole=True),
    "output_limit_mb": Range("--output-limit", 0.001, 1024, "MB"),
}


@dataclass(frozen=True)
class Limits:
    """What one run may use. ``timeout`` is the program's wall-clock time, boot not included."""

    timeout: float = 30.0
    memory_mb: int = 256
    cpus: int = 1
    disk_mb: int = 512
    pids: int = 256
    output_limit_mb: float = 10.0

    def __post_init__(self) -> None:
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LimitOutOfRange(f"{allowed.option} must be a number, got {value!r}")
            if math.isnan(value) or not allowed.low <= value <= allowed.high:
                raise LimitOutOfRange(
                    f"{allowed.option} {value:g} is out of range: use {allowed.low:g} to "
                    f"{allowed.high:g} {allowed.unit}"
                )
            if allowed.whole:
                if value != int(value):
                    raise LimitOutOfRange(f"{allowed.option} must be a whole number, got {value:g}")
                object.__setattr__(self, name, int(value))
        host_cpus = os.cpu_count() or 1
        if self.cpus > host_cpus:
            raise LimitOutOfRange(f"--cpus {self.cpus} is more than this host's {host_cpus} CPUs")

    @property
    def output_limit_bytes(self) -> int:
        """The output cap (stdout and stderr together) in bytes."""
        return int(self.output_limit_mb * MB)

    def to_json(self) -> dict[str, float]:
        """The limits as JSON, under the names the API's request fields use."""
        return {
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "disk_mb": self.disk_mb,
            "pids": self.pids,
            "output_limit_mb": self.output_limit_mb,
        }


def parse_env(pairs: list[str]) -> dict[str, str]:
    """Turn ``["K=V", ...]`` into a dict; a pair without ``=`` or a bad name is InvalidInput."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--env {pair!r} is not KEY=VALUE")
        if not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise InvalidInput(
                f"--env name {key!r} must be letters, digits and _ and not start with a digit"
            )
        if "\0" in value:
            raise InvalidInput(f"--env {key} holds a NUL byte")
        env[key] = value
    return env
