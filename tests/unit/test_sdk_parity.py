"""The sync and async SDKs stay in step, and the public surface is what ``__all__`` says.

Every public member of ``Sandbox`` must exist on ``AsyncSandbox`` (and ``Files`` on
``AsyncFiles``) with the same kind, parameter names, kinds and defaults, and the same
annotations once sync types are swapped for their async twins. A blocking method's twin is a
coroutine function; an iterator's twin returns an async iterator (used with ``async for``).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from typing import Any

import pytest

import fission
import fission.sdk
from fission.errors import ERRORS_BY_CODE
from fission.sdk import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    AsyncTerminal,
    AsyncWatchStream,
    CommandHandle,
    Commands,
    Files,
    Sandbox,
    Terminal,
    WatchStream,
)

PAIRS = [
    (Sandbox, AsyncSandbox),
    (Files, AsyncFiles),
    (Terminal, AsyncTerminal),
    (Commands, AsyncCommands),
    (CommandHandle, AsyncCommandHandle),
    (WatchStream, AsyncWatchStream),
]
DUNDER_TWINS = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__init__": "__init__"}
SYNC_TO_ASYNC = [
    (r"\bSandbox\b", "AsyncSandbox"),
    (r"\bFiles\b", "AsyncFiles"),
    (r"\bTerminal\b", "AsyncTerminal"),
    (r"\bWatchStream\b", "AsyncWatchStream"),
    (r"\bCommands\b", "AsyncCommands"),
    (r"\bCommandHandle\b", "AsyncCommandHandle"),
    (r"\bOutputCallback\b", "AsyncOutputCallback"),
    (r"\bGenerator\[(.*), None, None\]$", r"AsyncGenerator[\1, None]"),
]


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def kind_of(cls: type, name: str) -> str:
    member = inspect.getattr_static(cls, name)
    for kind in (classmethod, staticmethod, property):
        if isinstance(member, kind):
            return kind.__name__
    return "method" if callable(member) else type(member).__name__


def as_async(annotation: Any) -> Any:
    """A sync annotation (a string: the SDK uses postponed annotations) in async terms."""
    if not isinstance(annotation, str):
        return annotation
    for pattern, replacement in SYNC_TO_ASYNC:
        annotation = re.sub(pattern, replacement, annotation)
    return annotation


def differences(sync_cls: type, async_cls: type) -> list[str]:
    """Every way ``async_cls`` is not the async twin of ``sync_cls`` (empty when in step)."""
    problems = []
    sync_names, async_names = public_names(sync_cls), public_names(async_cls)
    for name in sorted(sync_names ^ async_names):
        where = sync_cls if name in sync_names else async_cls
        problems.append(f"{name} exists only on {where.__name__}")
    pairs = [(name, name) for name in sorted(sync_names & async_names)]
    pairs += [
        (s, a) for s, a in DUNDER_TWINS.items() if hasattr(sync_cls, s) or hasattr(async_cls, a)
    ]
    for sync_name, async_name in pairs:
        if not hasattr(sync_cls, sync_name) or not hasattr(async_cls, async_name):
            problems.append(f"{sync_name}/{async_name}: one of the twins is missing")
            continue
        sync_kind, async_kind = kind_of(sync_cls, sync_name), kind_of(async_cls, async_name)
        if sync_kind != async_kind:
            problems.append(f"{sync_name}: {sync_kind} vs {async_kind}")
            continue
        sync_member, async_member = getattr(sync_cls, sync_name), getattr(async_cls, async_name)
        if sync_kind == "property":
            sync_member, async_member = sync_member.fget, async_member.fget
        problems += compare_callables(sync_name, sync_member, async_member, sync_kind)
    return problems


def compare_callables(name: str, sync_fn: Any, async_fn: Any, kind: str) -> list[str]:
    """Differences in signature and in sync/async nature between two twin callables."""
    problems = []
    sync_sig, async_sig = inspect.signature(sync_fn), inspect.signature(async_fn)
    sync_params = list(sync_sig.parameters.values())
    async_params = list(async_sig.parameters.values())
    shape = [(p.name, p.kind, p.default) for p in sync_params]
    if shape != [(p.name, p.kind, p.default) for p in async_params]:
        problems.append(f"{name}: parameters {sync_sig} vs {async_sig}")
        return problems
    for sp, ap in zip(sync_params, async_params, strict=True):
        if as_async(sp.annotation) != ap.annotation:
            problems.append(f"{name}({sp.name}): {sp.annotation} vs {ap.annotation}")
    returns = sync_sig.return_annotation
    if as_async(returns) != async_sig.return_annotation:
        problems.append(f"{name} returns {returns} vs {async_sig.return_annotation}")
    if name == "__init__" or kind == "property":
        return problems
    if str(returns).startswith("Generator["):
        if inspect.iscoroutinefunction(async_fn):
            problems.append(f"{name}: returns an async iterator, so it must not need await")
    elif not inspect.iscoroutinefunction(async_fn):
        problems.append(f"{name}: the async twin of a blocking call must be async def")
    return problems


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_sync_and_async_are_in_step(sync_cls: type, async_cls: type) -> None:
    assert differences(sync_cls, async_cls) == []


def test_the_check_notices_a_method_on_one_side_only() -> None:
    class Extra(Sandbox):
        def teleport(self) -> None:
            """Only here."""

    class Renamed(AsyncSandbox):
        async def set_ttl(self, seconds: float) -> Any:
            """A parameter renamed."""

    class Blocking(AsyncSandbox):
        def pause(self) -> Any:
            """Forgot async."""

    assert differences(Extra, AsyncSandbox) == ["teleport exists only on Extra"]
    assert any("set_ttl: parameters" in p for p in differences(Sandbox, Renamed))
    assert any("pause: the async twin" in p for p in differences(Sandbox, Blocking))


def test_create_takes_what_the_constructor_takes() -> None:
    init = list(inspect.signature(Sandbox.__init__).parameters.values())[1:]
    for cls in (Sandbox, AsyncSandbox):
        assert list(inspect.signature(cls.create).parameters.values()) == init
    assert fission.sdk.sandbox == Sandbox.create


def test_timeouts_have_distinct_names_and_defaults() -> None:
    params = inspect.signature(Sandbox.create).parameters
    assert (
        params["ttl"].default,
        params["timeout"].default,
        params["request_timeout"].default,
    ) == (
        300.0,
        30.0,
        60.0,
    )
    run_params = inspect.signature(fission.sdk.run).parameters
    assert {"timeout", "request_timeout"} <= set(run_params) and "ttl" not in run_params


def test_every_public_name_is_in___all__() -> None:
    for name in fission.sdk.__all__:
        assert hasattr(fission.sdk, name), name
    public = {
        name
        for name, value in vars(fission.sdk).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(fission.sdk.__all__)
    assert {cls.__name__ for cls in ERRORS_BY_CODE.values()} <= set(fission.sdk.__all__)


def test_every_public_sdk_thing_has_a_docstring() -> None:
    for name in fission.sdk.__all__:
        value = getattr(fission.sdk, name)
        if inspect.isclass(value) or inspect.isfunction(value) or inspect.ismethod(value):
            assert value.__doc__, name
        if inspect.isclass(value) and value.__module__.startswith("fission.sdk"):
            for member in public_names(value):
                assert getattr(value, member).__doc__, f"{name}.{member}"


def test_the_package_exports_the_sdk_lazily() -> None:
    assert fission.run is fission.sdk.run and fission.Sandbox is Sandbox
    assert fission.AsyncSandbox is AsyncSandbox and fission.RunResult is fission.sdk.RunResult
    assert fission.sandbox == Sandbox.create
    assert set(fission.__all__) <= set(dir(fission))
    with pytest.raises(AttributeError):
        fission.no_such_thing  # noqa: B018
    probe = "import sys, fission; print('httpx' in sys.modules, 'fission.sdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
