"""Fixtures shared by the unit tests: a hermetic environment, a private image cache, and real
Services on the fake VMM driver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fission.core.service import Service, ServiceConfig
from fission.vmm.fake import FakeDriver

# Variables that change what fission reads or where it writes; a developer's shell may set them.
FISSION_ENV = (
    "FISSION_ACCEL",
    "FISSION_BOOT_TIMEOUT",
    "FISSION_CACHE_DIR",
    "FISSION_DATA_DIR",
    "FISSION_JAIL",
    "FISSION_QEMU",
    "FISSION_RUNTIME_DIR",
    "FISSION_SOCKET",
)


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No FISSION_* setting leaks in, and nothing can write to the user's real cache."""
    for name in FISSION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FISSION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("FISSION_DATA_DIR", str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty image cache at a known path (``FISSION_CACHE_DIR``)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FISSION_CACHE_DIR", str(path))
    return path


# -- a Service on the fake VMM driver (no /dev/kvm, no QEMU, no images) -----------------------

ServiceStarter = Callable[..., Awaitable[Service]]
Calls = list[tuple[Any, ...]]


@pytest_asyncio.fixture(loop_scope="function")
async def fake_driver() -> AsyncIterator[FakeDriver]:
    """A fake VMM driver; every VM it made is destroyed by the end of the test."""
    driver = FakeDriver()
    yield driver
    leaked = driver.live
    for vm in leaked:
        await vm.destroy()
    assert not leaked, f"{len(leaked)} fake VMs were left running"


@pytest_asyncio.fixture(loop_scope="function")
async def start_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_driver: FakeDriver
) -> AsyncIterator[ServiceStarter]:
    """Starts real Services (ServiceConfig fields as keywords) on the fake driver.

    No pools and an 8 GiB budget unless given. Any use of QEMU fails loudly (``FISSION_QEMU``
    names nothing), and the image cache is empty (``hermetic_env``). Each service is closed at
    the end, and then no VM may be left.
    """
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("FISSION_QEMU", str(tmp_path / "no-qemu-here"))
    started: list[Service] = []

    async def start(**options: Any) -> Service:
        settings: dict[str, Any] = {"pools": {}, "memory_budget_mb": 8192, "driver": fake_driver}
        state_dir = options.pop("state_dir", tmp_path / f"state-{len(started)}")
        service = Service(ServiceConfig(state_dir=state_dir, **(settings | options)))
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.close()
    assert not fake_driver.live, "a VM outlived its service"


@pytest_asyncio.fixture(loop_scope="function")
async def service(start_service: ServiceStarter) -> Service:
    """A started Service on the fake driver: no pools, an 8 GiB memory budget."""
    return await start_service()


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(0.01)


def record_calls(
    target: object, name: str, calls: Calls, entry: Callable[..., tuple[Any, ...]]
) -> None:
    """Wrap the coroutine method ``target.name`` so each call first appends ``entry(*args,
    **kwargs)`` to ``calls``, then runs the real method."""
    real: Callable[..., Awaitable[Any]] = getattr(target, name)

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(entry(*args, **kwargs))
        return await real(*args, **kwargs)

    setattr(target, name, recorded)
