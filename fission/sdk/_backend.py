"""Where a one-shot run goes: the daemon if one answers, else a Service in this process.

This is the one place that decides (``open_backend``); the CLI (``fission run``, ``install``,
``repo``) and the SDK's ``fission.run`` call it. Both backends take the same core types
(``RunSpec``, ``Upload``) and give the same ``RunResult`` (downloads in ``files``) and errors,
so a command behaves the same with or without a daemon:

* ``DaemonBackend`` speaks the daemon's REST API (``/v1/run``, ``/v1/install``, ``/v1/repo``):
  the program, its policy and upload bytes go in the request, output and downloaded bytes come
  back in the stream. The daemon never reads or writes the caller's files.
* ``EmbeddedBackend`` starts a private ``Service`` for each call (``embedded_service``): a clone
  of the warm snapshot, run, destroyed; a SIGTERM (CLI only) cancels the call so the VM still
  goes.

The choice: an explicit ``url`` (argument or ``FISSION_URL``) always means the daemon; otherwise
the local socket is probed (``PROBE_TIMEOUT``) and, when nothing answers, the run is embedded.
``embedded=True`` (``--no-daemon``) skips the probe. The CLI passes ``start_daemon``: when no
daemon answers on the default socket, a user daemon is started after the embedded run, for the
next command (``fission.sdk._user_daemon``).

``run_once`` is ``fission.run``'s route, made for calls in a loop: one ``DaemonBackend`` (one
HTTP connection pool) is kept per resolved connection and process, closed at exit, and there is
no probe: the run is sent to the local socket and goes embedded only when no daemon accepts the
connection (``Unreachable``: nothing was sent, so nothing runs twice) or there is no socket.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fission.core.provision import InstallResult
from fission.core.spec import RunResult, RunSpec
from fission.core.transfers import Upload
from fission.errors import FissionError
from fission.sdk import _requests as calls
from fission.sdk._connection import (
    DEFAULT_REQUEST_TIMEOUT,
    Connection,
    Unreachable,
    resolve_connection,
)
from fission.sdk._models import OutputEvent

if TYPE_CHECKING:
    from fission.core.service import Service
    from fission.sdk._http import SyncHTTP
    from fission.sdk._user_daemon import UserDaemon

PROBE_TIMEOUT = 2.0  # seconds a local daemon has to answer before the run goes embedded
OutputSink = Callable[[str, bytes], None]
T = TypeVar("T")


class Backend(Protocol):
    """What the CLI and ``fission.run`` need from wherever runs happen."""

    where: str  # "daemon" or "embedded", for messages and tests

    def run(
        self,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
    ) -> RunResult:
        """Run ``spec`` once in a fresh VM; downloaded files are in ``RunResult.files``."""
        ...

    def install(
        self,
        language: str,
        packages: Sequence[str],
        command: str,
        on_output: OutputSink | None = None,
        *,
        index_url: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> InstallResult:
        """Install ``packages`` (cached per set), then run ``command``."""
        ...

    def repo(
        self,
        language: str,
        url: str | None,
        command: str,
        on_output: OutputSink | None = None,
        *,
        ref: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 60.0,
        files: Sequence[Upload] = (),
    ) -> RunResult:
        """Clone ``url`` (or use ``files`` in the workdir), then run ``command``."""
        ...

    def close(self) -> None:
        """Release the connection, if any."""
        ...


def open_backend(
    url: str | None = None,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    *,
    embedded: bool = False,
    cancel_on_sigterm: bool = False,
    start_daemon: bool = False,
) -> Backend:
    """The daemon's backend when one is named or answers, else an embedded one.

    With ``start_daemon`` and no daemon at the default socket, the embedded backend starts a
    user daemon once its run has succeeded (``fission.sdk._user_daemon``).
    """
    if not embedded:
        conn = resolve_connection(url, api_key, request_timeout)
        # No socket and no url: no daemon, and no need to load the HTTP client at all.
        if conn.explicit or conn.socket is None or conn.socket.exists():
            from fission.sdk._http import SyncHTTP

            http = SyncHTTP(conn)
            if conn.explicit or answers(http):
                return DaemonBackend(http)
            http.close()
        return EmbeddedBackend(cancel_on_sigterm=cancel_on_sigterm, start_daemon=start_daemon)
    return EmbeddedBackend(cancel_on_sigterm=cancel_on_sigterm)


_kept: dict[tuple[int, Connection], DaemonBackend] = {}
_kept_lock = threading.Lock()


def kept_daemon(conn: Connection) -> DaemonBackend:
    """This process's DaemonBackend for ``conn``, made on first use and closed at exit."""
    key = (os.getpid(), conn)  # a forked child makes its own: connections are not shared
    with _kept_lock:
        daemon = _kept.get(key)
        if daemon is None:
            from fission.sdk._http import SyncHTTP

            daemon = _kept[key] = DaemonBackend(SyncHTTP(conn))
    return daemon


def close_kept() -> None:
    """Close every kept DaemonBackend (at exit)."""
    with _kept_lock:
        backends = list(_kept.values())
        _kept.clear()
    for backend in backends:
        backend.close()


atexit.register(close_kept)


def run_once(
    spec: RunSpec,
    on_output: OutputSink | None = None,
    url: str | None = None,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> RunResult:
    """Run ``spec`` on the daemon through a kept connection, else embedded (``fission.run``)."""
    conn = resolve_connection(url, api_key, request_timeout)
    if not conn.explicit and conn.socket is not None and not conn.socket.exists():
        return EmbeddedBackend().run(spec, on_output)
    try:
        return kept_daemon(conn).run(spec, on_output)
    except Unreachable:
        if conn.explicit:
            raise  # a named daemon is never replaced by an embedded run
    return EmbeddedBackend().run(spec, on_output)


def answers(http: SyncHTTP) -> bool:
    """True when a daemon answers the health probe."""
    conn: Connection = http.conn
    if conn.socket is not None and not conn.socket.exists():
        return False
    try:
        http.json(calls.health(PROBE_TIMEOUT))
    except FissionError:
        return False
    return True


class DaemonBackend:
    """Runs through the daemon's REST API."""

    where = "daemon"

    def __init__(self, http: SyncHTTP) -> None:
        self._http = http

    @classmethod
    def connect(
        cls,
        socket: Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> DaemonBackend:
        """The daemon at ``url``, else on ``socket`` (default: the local one); no fallback."""
        from fission.config import daemon_socket
        from fission.sdk._http import SyncHTTP

        target = url if url is not None else f"unix:{socket or daemon_socket()}"
        return cls(SyncHTTP(resolve_connection(target, api_key, request_timeout)))

    @property
    def socket(self) -> Path | None:
        """The daemon's Unix socket (None over TCP)."""
        return self._http.conn.socket

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> DaemonBackend:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def alive(self) -> bool:
        """True when the daemon answers its health probe."""
        return answers(self._http)

    def gc(self, dry_run: bool, budget_mb: int | None) -> dict[str, Any]:
        """Reclaim the daemon's snapshot space (``fission gc``); what went or would go."""
        body = {"dry_run": dry_run, "budget_mb": budget_mb}
        return dict(self._http.json(calls.Call("POST", "/v1/gc", json=body)))

    def pools(self) -> dict[str, Any]:
        """The daemon's pools and memory budget."""
        return dict(self._http.json(calls.pools()))

    def _stream(
        self, call: calls.Call, on_output: OutputSink | None
    ) -> tuple[RunResult, calls.RunAssembler]:
        assembler = calls.RunAssembler()
        # Read to the end of the answer (the result is its last line), so that the connection
        # goes back to the pool for the next call instead of being closed half-read.
        with closing(self._http.lines(call)) as lines:
            for raw in lines:
                event = assembler.feed(raw)
                if isinstance(event, OutputEvent) and on_output is not None:
                    on_output(event.stream, event.data)
        if assembler.result is None:
            raise calls.missing_result()
        return assembler.result, assembler

    def run(
        self,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
    ) -> RunResult:
        """Run ``spec`` on the daemon, streaming output to ``on_output``."""
        call = calls.one_shot_run(
            spec.language.name,
            spec.code,
            spec.limits.to_json(),
            spec.env,
            spec.stdin,
            network=spec.network.to_json(),
            uploads=[(upload.remote, upload.data) for upload in uploads],
            downloads=downloads,
            template=spec.template,
        )
        return self._stream(call, on_output)[0]

    def install(
        self,
        language: str,
        packages: Sequence[str],
        command: str,
        on_output: OutputSink | None = None,
        *,
        index_url: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> InstallResult:
        """Install and run on the daemon (its cache of derived snapshots)."""
        call = calls.install(
            language,
            packages,
            command,
            timeout=timeout,
            index_url=index_url,
            allow_hosts=allow_hosts,
        )
        result, assembler = self._stream(call, on_output)
        facts: dict[str, Any] = assembler.install or {}
        return InstallResult(
            result,
            bool(facts.get("cached", False)),
            float(facts.get("setup_ms", 0.0)),
            bool(facts.get("installed", True)),
        )

    def repo(
        self,
        language: str,
        url: str | None,
        command: str,
        on_output: OutputSink | None = None,
        *,
        ref: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 60.0,
        files: Sequence[Upload] = (),
    ) -> RunResult:
        """Clone (or take ``files``) and run on the daemon."""
        call = calls.repo(
            language,
            url,
            command,
            timeout=timeout,
            ref=ref,
            allow_hosts=allow_hosts,
            files=[(upload.remote, upload.data) for upload in files],
        )
        return self._stream(call, on_output)[0]


class EmbeddedBackend:
    """Runs in this process, on a private Service started for each call."""

    where = "embedded"

    def __init__(self, *, cancel_on_sigterm: bool = False, start_daemon: bool = False) -> None:
        self._cancel_on_sigterm = cancel_on_sigterm
        self._user_daemon: UserDaemon | None = None
        if start_daemon:
            from fission.sdk._user_daemon import UserDaemon

            self._user_daemon = UserDaemon()  # now: the run changes this process's environment

    def close(self) -> None:
        """Nothing to release: each call's Service is gone when it returns."""

    def _call(self, work: Callable[[Service], Awaitable[T]]) -> T:
        async def main() -> T:
            from fission.core.service import embedded_service

            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            if self._cancel_on_sigterm:  # SIGTERM cancels the call, so the VM is destroyed
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
            try:
                async with embedded_service() as service:
                    return await work(service)
            finally:
                if self._cancel_on_sigterm:
                    with contextlib.suppress(Exception):
                        loop.remove_signal_handler(signal.SIGTERM)

        outcome = asyncio.run(main())
        if self._user_daemon is not None:  # after the run, so it does not compete for the CPU
            self._user_daemon.start()
            self._user_daemon = None
        return outcome

    def run(
        self,
        spec: RunSpec,
        on_output: OutputSink | None = None,
        uploads: Sequence[Upload] = (),
        downloads: Sequence[str] = (),
    ) -> RunResult:
        """Run ``spec`` in a clone started in this process."""
        return self._call(
            lambda service: service.run(spec, on_output, uploads=uploads, downloads=downloads)
        )

    def install(
        self,
        language: str,
        packages: Sequence[str],
        command: str,
        on_output: OutputSink | None = None,
        *,
        index_url: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> InstallResult:
        """Install (into this user's cache of derived snapshots) and run, in this process."""
        from fission.core.languages import resolve_language
        from fission.core.limits import Limits

        lang, limits = resolve_language(language), Limits(timeout=timeout)
        return self._call(
            lambda service: service.install(
                lang,
                packages,
                command,
                on_output,
                index_url=index_url,
                allow_hosts=allow_hosts,
                limits=limits,
            )
        )

    def repo(
        self,
        language: str,
        url: str | None,
        command: str,
        on_output: OutputSink | None = None,
        *,
        ref: str | None = None,
        allow_hosts: Sequence[str] = (),
        timeout: float = 60.0,
        files: Sequence[Upload] = (),
    ) -> RunResult:
        """Clone (or take ``files``) and run, in this process."""
        from fission.core.languages import resolve_language
        from fission.core.limits import Limits

        lang, limits = resolve_language(language), Limits(timeout=timeout)
        return self._call(
            lambda service: service.repo(
                lang,
                url,
                command,
                on_output,
                ref=ref,
                allow_hosts=allow_hosts,
                limits=limits,
                files=files,
            )
        )
