"""`fission.run` in a loop: one kept connection per daemon, no probe, embedded only when no
daemon accepts (never a run sent twice); and the user daemon the CLI starts on demand."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fission.sdk
from fission.api.run_stream import output_line, result_line
from fission.core.spec import RunResult, RunSpec
from fission.errors import FissionError, NotReady
from fission.sdk import _backend, _user_daemon
from tests.unit.fake_daemon import Answer, Request, fake_daemon, ndjson_lines, sized

RESULT = RunResult(0, b"42\n", b"", False, False, False, 0, 5.0, 0.0, 6.0)
EMBEDDED = RunResult(9, b"embedded\n", b"", False, False, False, 0, 5.0, 0.0, 6.0)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No developer's daemon settings; no kept connection before or after."""
    for name in ("FISSION_URL", "FISSION_API_KEY", "FISSION_AUTOSTART"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "rt"))
    _backend.close_kept()
    yield
    _backend.close_kept()


@pytest.fixture
def embedded_runs(monkeypatch: pytest.MonkeyPatch) -> list[RunSpec]:
    """Embedded runs, recorded instead of booting a VM."""
    seen: list[RunSpec] = []

    def run(self: Any, spec: RunSpec, *rest: Any) -> RunResult:
        seen.append(spec)
        return EMBEDDED

    monkeypatch.setattr(_backend.EmbeddedBackend, "run", run)
    return seen


def answer_run(request: Request) -> Answer:
    """The daemon's answer: a streamed run of RESULT (sized, so the connection is kept)."""
    assert request.path == "/v1/run", f"unexpected {request.method} {request.path}"
    body = ndjson_lines(output_line("stdout", RESULT.stdout), result_line(RESULT))
    return sized(body)


def test_runs_in_a_loop_share_one_connection_and_never_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_runs: list[RunSpec]
) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "d.sock"))
    with fake_daemon(tmp_path / "d.sock", answer_run) as daemon:
        for _ in range(3):
            assert fission.sdk.run("print(42)").stdout == b"42\n"
    assert [r.path for r in daemon.requests] == ["/v1/run"] * 3  # no /v1/health
    assert daemon.connections == 1
    assert embedded_runs == []


def test_a_socket_nobody_accepts_on_goes_embedded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_runs: list[RunSpec]
) -> None:
    socket = tmp_path / "d.sock"
    monkeypatch.setenv("FISSION_SOCKET", str(socket))
    socket.touch()  # a dead daemon's socket file
    assert fission.sdk.run("print(1)") is EMBEDDED
    assert len(embedded_runs) == 1
    with fake_daemon(socket, answer_run) as daemon:  # a daemon starts: the next run is its
        assert fission.sdk.run("print(42)").stdout == b"42\n"
    assert len(daemon.requests) == 1 and len(embedded_runs) == 1


def test_a_daemon_that_fails_mid_run_is_not_replaced_by_an_embedded_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_runs: list[RunSpec]
) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "d.sock"))
    broken = Answer(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"type"', close=True)
    with (
        fake_daemon(tmp_path / "d.sock", lambda _: broken),
        pytest.raises(FissionError, match="lost the connection"),
    ):
        fission.sdk.run("print(1)")
    assert embedded_runs == []


def test_a_named_daemon_that_does_not_answer_is_an_error(
    tmp_path: Path, embedded_runs: list[RunSpec]
) -> None:
    with pytest.raises(NotReady, match="no fission daemon answers"):
        fission.sdk.run("print(1)", url=f"unix:{tmp_path / 'none.sock'}")
    assert embedded_runs == []


def test_kept_connections_are_per_address_and_closed_at_exit(tmp_path: Path) -> None:
    first = _backend.kept_daemon(_backend.resolve_connection(f"unix:{tmp_path / 'a.sock'}"))
    again = _backend.kept_daemon(_backend.resolve_connection(f"unix:{tmp_path / 'a.sock'}"))
    other = _backend.kept_daemon(_backend.resolve_connection(f"unix:{tmp_path / 'b.sock'}"))
    assert first is again and first is not other
    _backend.close_kept()
    assert first._http._client.is_closed and other._http._client.is_closed


# -- the user daemon on demand -------------------------------------------------------------------
class Spawned:
    """subprocess.Popen, recorded instead of starting anything."""

    calls: list[tuple[list[str], dict[str, Any]]]

    def __init__(self, argv: list[str], **options: Any) -> None:
        Spawned.calls.append((argv, options))
        self.pid = 4242


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, Any]]]:
    Spawned.calls = []
    monkeypatch.setattr(subprocess, "Popen", Spawned)
    return Spawned.calls


def test_the_user_daemon_is_detached_with_an_idle_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawned: list[tuple[list[str], dict[str, Any]]]
) -> None:
    daemon = _user_daemon.UserDaemon()
    # An embedded run points this process at its private dir; the daemon keeps the user's.
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "rt" / "embedded-1" / "vms"))
    assert daemon.start() == 4242
    ((argv, options),) = spawned
    assert options["env"]["FISSION_RUNTIME_DIR"] == str(tmp_path / "rt")
    assert argv[1:] == ["-m", "fission", "serve", "--idle-exit", "300"]
    assert options["start_new_session"] is True and options["cwd"] == "/"
    assert options["stdin"] == subprocess.DEVNULL
    log = tmp_path / "rt" / "daemon" / "daemon.log"
    assert Path(options["stdout"].name) == log and options["stderr"] is options["stdout"]


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_the_environment_turns_it_off(
    value: str, monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    monkeypatch.setenv("FISSION_AUTOSTART", value)
    assert _user_daemon.UserDaemon().start() is None
    assert spawned == []


def test_a_daemon_holding_the_state_dir_means_none_is_started(
    tmp_path: Path, spawned: list[Any]
) -> None:
    state = tmp_path / "rt" / "daemon"
    state.mkdir(parents=True)
    with (state / "daemon.pid").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a starting daemon holds it
        assert _user_daemon.UserDaemon().start() is None
    assert spawned == []
    assert _user_daemon.UserDaemon().start() == 4242  # released: one may start


def test_without_the_server_extra_none_is_started(
    monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    real = _user_daemon.importlib.util.find_spec
    monkeypatch.setattr(
        _user_daemon.importlib.util,
        "find_spec",
        lambda name: None if name == "uvicorn" else real(name),
    )
    assert _user_daemon.UserDaemon().start() is None
    assert spawned == []


def test_the_cli_starts_one_after_a_successful_embedded_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_SOCKET", str(tmp_path / "none.sock"))
    started: list[bool] = []
    monkeypatch.setattr(_user_daemon.UserDaemon, "start", lambda self: started.append(True))

    async def ok(service: Any) -> RunResult:
        return RESULT

    async def fails(service: Any) -> RunResult:
        raise NotReady("images not built")

    backend = _backend.open_backend(start_daemon=True)
    assert backend.where == "embedded"
    monkeypatch.setattr("fission.core.service.embedded_service", _NoService)
    with pytest.raises(NotReady):
        backend._call(fails)  # type: ignore[attr-defined]
    assert started == []
    assert backend._call(ok) is RESULT  # type: ignore[attr-defined]
    assert started == [True]
    for quiet in (_backend.open_backend(), _backend.open_backend(embedded=True, start_daemon=True)):
        assert quiet._user_daemon is None  # type: ignore[attr-defined]


class _NoService:
    """embedded_service() without a Service: the work gets None."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        return None
