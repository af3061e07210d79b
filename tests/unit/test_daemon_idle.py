"""`fission serve --idle-exit`: what counts as idle, and the option's checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fission.errors import InvalidInput
from fission.server.daemon import IdleWatch, build_config


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(idle_exit: float = 60.0, sandboxes: list[int] | None = None) -> tuple[IdleWatch, Clock]:
    clock = Clock()
    count = sandboxes if sandboxes is not None else [0]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await scope["work"]

    return IdleWatch(app, idle_exit, lambda: count[0], clock), clock


def request(path: str, work: asyncio.Future[None]) -> dict[str, Any]:
    return {"type": "http", "path": path, "work": work}


async def test_idle_after_the_time_with_no_request() -> None:
    idle, clock = watch(60)
    clock.now += 59.9
    assert not idle.expired()
    clock.now += 0.1
    assert idle.expired()


async def test_a_request_in_flight_keeps_it_and_its_end_restarts_the_clock() -> None:
    idle, clock = watch(60)
    work: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    served = asyncio.create_task(idle(request("/v1/run", work), None, None))
    await asyncio.sleep(0)
    clock.now += 600  # a long streamed run
    assert idle.in_flight == 1 and not idle.expired()
    work.set_result(None)
    await served
    clock.now += 59
    assert not idle.expired()
    clock.now += 1
    assert idle.expired()


async def test_health_probes_do_not_keep_it_alive() -> None:
    idle, clock = watch(60)
    for _ in range(10):
        clock.now += 10
        work: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        work.set_result(None)
        await idle(request("/v1/health", work), None, None)
    assert idle.expired()


async def test_the_lifespan_passes_through() -> None:
    idle, _ = watch(60)
    work: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    work.set_result(None)
    await idle({"type": "lifespan", "work": work}, None, None)
    assert idle.in_flight == 0


def test_a_sandbox_keeps_it_alive() -> None:
    sandboxes = [1]
    idle, clock = watch(60, sandboxes)
    clock.now += 3600
    assert not idle.expired()
    sandboxes[0] = 0  # deleted (or expired): idle from now on
    clock.now += 59
    assert not idle.expired()
    clock.now += 1
    assert idle.expired()


def config(tmp_path: Path, **options: Any) -> Any:
    arguments: dict[str, Any] = {
        "config_file": None,
        "pools": [],
        "memory_budget_mb": None,
        "acquire_timeout": None,
        "socket": tmp_path / "d.sock",
        "host": None,
        "port": None,
        "state_dir": tmp_path / "state",
        "db": tmp_path / "db",
    }
    return build_config(**{**arguments, **options})


def test_the_option_and_the_config_file(tmp_path: Path) -> None:
    assert config(tmp_path).idle_exit is None
    assert config(tmp_path, idle_exit=300).idle_exit == 300.0
    file = tmp_path / "fission.toml"
    file.write_text("idle_exit = 120\n")
    assert config(tmp_path, config_file=file).idle_exit == 120.0
    assert config(tmp_path, config_file=file, idle_exit=5.5).idle_exit == 5.5


@pytest.mark.parametrize("value", [0, -1, float("nan"), True, "10"])
def test_a_bad_idle_exit_is_refused(value: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="--idle-exit"):
        config(tmp_path, idle_exit=value)


def test_idle_exit_is_refused_beside_grpc(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot be used with gRPC"):
        config(tmp_path, idle_exit=60, grpc_port=50051)


def test_the_default_state_dir_is_the_runtime_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "rt"))
    assert config(tmp_path, state_dir=None).service.state_dir == tmp_path / "rt" / "daemon"
