"""`fission serve`: load the configuration, take the state dir's lock, run uvicorn.

Listens on a Unix socket in the user's runtime dir by default (TCP only when asked). uvicorn
turns SIGTERM and SIGINT into a graceful shutdown, whose last step (the app's lifespan)
destroys every pooled VM the daemon owns and does with running sandboxes what ``--on-stop``
says: ``keep`` them running (the default; the next daemon re-attaches), ``pause`` them to
disk, or ``delete`` them. A SIGKILLed daemon leaves them running, as ``keep`` does. A second
daemon on the same state dir is refused. With ``--idle-exit SECONDS`` the daemon shuts down the
same way once it has gone that long with no request (health probes aside) and no sandbox: the
user daemon that ``fission run`` starts on demand (``fission.sdk._user_daemon``) runs so.
``--log-format json`` writes one JSON object per log line (``server.logs``); ``--metrics-port
N`` also serves ``/metrics`` on 127.0.0.1:N without a key (``server.metrics_port``).
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fission.auth.db import default_db_path
from fission.config import daemon_socket, daemon_state_dir
from fission.core import keeper
from fission.core.languages import resolve_language
from fission.core.sandbox_lifetimes import ON_STOP, PAUSED_RETENTION
from fission.core.service import Service, ServiceConfig
from fission.core.service_options import default_budget_mb, parse_pool_flags
from fission.core.state_dirs import lock_state_dir
from fission.errors import InvalidInput, NotReady
from fission.server.logs import check_log_format, logging_config
from fission.server.metrics_port import MetricsPort, check_metrics_port, metrics_socket

log = logging.getLogger("fission.daemon")
# Longer than the SDK's keep-alive (httpx: 5 s), so a client never sends on a kept connection
# the daemon is closing at that moment (the request would be lost without an answer).
KEEP_ALIVE = 15
HEALTH_PATH = "/v1/health"
# Probes and scrapes do not keep an idle daemon alive.
NOT_ACTIVITY = frozenset({HEALTH_PATH, "/metrics"})
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


@dataclass(frozen=True)
class DaemonConfig:
    """Where the daemon listens and how its service runs."""

    service: ServiceConfig
    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    log_level: str = "warning"
    log_format: str = "text"  # or "json": one object per line (server.logs)
    metrics_port: int | None = None  # also serve /metrics on 127.0.0.1:PORT, without a key
    keys_db: Path | None = None  # set for TCP listeners: every request needs an API key
    extra: dict[str, Any] = field(default_factory=dict)
    # gRPC (fission.server.grpc_server): "HOST:PORT" or "unix:PATH"; None serves no gRPC
    grpc_address: str | None = None
    grpc_keys_db: Path | None = None  # set for a TCP gRPC listener
    idle_exit: float | None = None  # seconds without requests or sandboxes before exiting
    # A front end of a fleet on Ray (fission.fleet): "auto", "ray://HOST:PORT" or "HOST:PORT";
    # None runs one host's Service here. The hosts' state lives under ``fleet_root``.
    cluster: str | None = None
    fleet_root: Path | None = None


def load_config_file(path: Path) -> dict[str, Any]:
    """The TOML config file as a dict (``[pool]`` sizes, ``memory_budget_mb``, ...)."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidInput(f"--config {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"--config {path} is not valid TOML: {exc}") from exc


def build_config(
    *,
    config_file: Path | None,
    pools: list[str],
    memory_budget_mb: int | None,
    acquire_timeout: float | None,
    socket: Path | None,
    host: str | None,
    port: int | None,
    state_dir: Path | None,
    db: Path | None = None,
    grpc_host: str | None = None,
    grpc_port: int | None = None,
    grpc_socket: Path | None = None,
    idle_exit: float | None = None,
    snapshot_budget_mb: int | None = None,
    on_stop: str | None = None,
    paused_retention: float | None = None,
    keeper_grace: float | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    metrics_port: int | None = None,
    cluster: str | None = None,
    fleet_root: Path | None = None,
) -> DaemonConfig:
    """Merge defaults, the config file and flags (flags win) into a DaemonConfig."""
    file = load_config_file(config_file) if config_file else {}
    log_format = check_log_format(log_format or file.get("log_format", "text"))
    log_level = log_level or file.get("log_level", "warning")
    if log_level not in LOG_LEVELS:
        raise InvalidInput(f"--log-level {log_level!r} is unknown: use {', '.join(LOG_LEVELS)}")
    pool_sizes = {resolve_language(k).name: int(v) for k, v in file.get("pool", {}).items()}
    pool_sizes.update(parse_pool_flags(pools))
    if not pool_sizes:
        pool_sizes = {"python": 2}
    budget = memory_budget_mb or int(file.get("memory_budget_mb", default_budget_mb()))
    timeout = acquire_timeout or float(file.get("acquire_timeout", 10.0))
    if budget < 256:
        raise InvalidInput(f"--memory-budget {budget} MB is too small: give at least 256")
    if not 0 < timeout <= 600:
        raise InvalidInput(f"--acquire-timeout {timeout} is out of range: use 0 to 600 seconds")
    state = state_dir or (Path(file["state_dir"]) if "state_dir" in file else daemon_state_dir())
    listen_socket = socket or (Path(file["socket"]) if "socket" in file else None)
    host = host or file.get("host")
    port = port or file.get("port")
    if (host is None) != (port is None):
        raise InvalidInput("TCP needs both --host and --port")
    if host is None and listen_socket is None:
        listen_socket = daemon_socket()
    database = db or (Path(file["db"]) if "db" in file else default_db_path())
    snapshots_mb = snapshot_budget_mb
    if snapshots_mb is None and "snapshot_budget_mb" in file:
        snapshots_mb = int(file["snapshot_budget_mb"])
    if snapshots_mb is not None and snapshots_mb < 1:
        raise InvalidInput(f"--snapshot-budget {snapshots_mb} must be at least 1 MB")
    stop = on_stop or str(file.get("on_stop", "keep"))
    if stop not in ON_STOP:
        raise InvalidInput(f"--on-stop {stop!r} is not one of {', '.join(ON_STOP)}")
    retention = paused_retention or float(file.get("paused_retention", PAUSED_RETENTION))
    grace = keeper_grace or float(file.get("keeper_grace", keeper.DEFAULT_GRACE))
    for option, value in (("--paused-retention", retention), ("--keeper-grace", grace)):
        if not 0 < value < 1e9:
            raise InvalidInput(f"{option} {value:g} is out of range: give a positive number")
    service = ServiceConfig(
        state,
        pool_sizes,
        budget,
        timeout,
        audit_db=database,
        snapshot_budget_mb=snapshots_mb,
        durable_sandboxes=True,
        on_stop=stop,
        paused_retention=retention,
        keeper_grace=grace,
    )
    grpc_listen = (grpc_host, grpc_port, grpc_socket)
    if not any(grpc_listen):  # gRPC flags replace the file's gRPC settings as a whole
        file_socket = Path(file["grpc_socket"]) if "grpc_socket" in file else None
        grpc_listen = (file.get("grpc_host"), file.get("grpc_port"), file_socket)
    grpc = grpc_address(*grpc_listen)
    idle = idle_exit if idle_exit is not None else file.get("idle_exit")
    if idle is not None:
        check_idle_exit(idle, grpc)
    metrics = metrics_port if metrics_port is not None else file.get("metrics_port")
    if metrics is not None:
        metrics = check_metrics_port(metrics, port)
    return DaemonConfig(
        service=service,
        socket=listen_socket,
        host=host,
        port=port,
        keys_db=database if host is not None else None,
        grpc_address=grpc,
        grpc_keys_db=database if grpc is not None and not grpc.startswith("unix:") else None,
        idle_exit=float(idle) if idle is not None else None,
        log_format=log_format,
        log_level=log_level,
        metrics_port=metrics,
        cluster=cluster or file.get("cluster"),
        fleet_root=fleet_root or (Path(file["fleet_root"]) if "fleet_root" in file else None),
    )


def check_idle_exit(idle: Any, grpc: str | None) -> None:
    """Refuse an ``--idle-exit`` that is not a positive number, or one beside gRPC."""
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle < 1e9:
        raise InvalidInput(
            f"--idle-exit {idle!r} is out of range: give a positive number of seconds"
        )
    if grpc is not None:
        # The idle clock sees HTTP requests; a gRPC call in progress would be cut off.
        raise InvalidInput("--idle-exit counts HTTP requests only: it cannot be used with gRPC")


def grpc_address(host: str | None, port: int | None, socket: Path | None) -> str | None:
    """Where gRPC listens: ``HOST:PORT`` (host 127.0.0.1 unless given), ``unix:PATH``, or None."""
    if socket is not None:
        if port is not None or host is not None:
            raise InvalidInput("gRPC listens on --grpc-socket or --grpc-port, not both")
        return f"unix:{socket.absolute()}"
    if port is None:
        if host is not None:
            raise InvalidInput("--grpc-host needs --grpc-port")
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput(f"--grpc-port {port!r} is out of range: use 1 to 65535")
    host = host or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class IdleWatch:
    """ASGI wrapper that knows how long the daemon has been idle: no request, no sandbox.

    A request counts from its start to the end of its answer (a streamed run to its last
    line); health probes do not count, so a monitor polling ``/v1/health`` does not keep an
    unused daemon alive. While any sandbox exists (running or paused) the daemon is in use.
    """

    def __init__(
        self,
        app: ASGIApp,
        idle_exit: float,
        sandboxes: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.idle_exit = idle_exit
        self.sandboxes = sandboxes
        self.clock = clock
        self.in_flight = 0
        self.last_active = clock()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in NOT_ACTIVITY:
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last_active = self.clock()

    def expired(self) -> bool:
        """True once the daemon has been idle for ``idle_exit`` seconds."""
        now = self.clock()
        if self.in_flight or self.sandboxes():
            self.last_active = now
            return False
        return now - self.last_active >= self.idle_exit


def listen_config(config: DaemonConfig, app: ASGIApp) -> Any:
    """uvicorn's Config for ``app`` on the daemon's socket or TCP address."""
    import uvicorn

    where: dict[str, Any] = {"host": config.host or "127.0.0.1", "port": config.port or 0}
    if config.socket is not None:
        config.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.socket.unlink(missing_ok=True)  # a dead daemon's socket; we hold the lock
        where = {"uds": str(config.socket)}
    return uvicorn.Config(
        app,
        log_level=config.log_level,
        log_config=logging_config(config.log_format, config.log_level),
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE,
        **where,
    )


def server_for(
    server_config: Any, watch: IdleWatch | None, on_stopping: Callable[[], None] | None = None
) -> Any:
    """A uvicorn Server that also shuts down gracefully once ``watch`` says it is idle, and
    calls ``on_stopping`` as its shutdown begins (before it waits for open responses)."""
    import uvicorn

    class DaemonServer(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            # ticks are 0.1 s apart: look once a second
            if watch is None or counter % 10 or not watch.expired():
                return False
            log.warning("fission daemon: idle for %g s with no sandbox: exiting", watch.idle_exit)
            return True

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            if on_stopping is not None:
                on_stopping()  # live streams end now instead of holding the shutdown up
            await super().shutdown(sockets)

    return DaemonServer(server_config)


def make_service(config: DaemonConfig) -> Service:
    """One host's Service, or with ``cluster`` a front end's view of the fleet (same API)."""
    if config.cluster is None:
        return Service(config.service)
    try:
        from fission.fleet.cluster_service import ClusterService
        from fission.fleet.host_agent import HostSettings
    except ModuleNotFoundError as exc:  # ray missing: the cluster extra
        raise NotReady(f"--cluster needs {exc.name}: pip install 'fission[cluster]'") from exc
    service = config.service
    settings = HostSettings(
        state_root=config.fleet_root or service.state_dir / "fleet",
        pools=dict(service.pools),
        memory_budget_mb=service.memory_budget_mb,
        acquire_timeout=service.acquire_timeout,
    )
    # ClusterService has every method and attribute the adapters use (test_fleet_surface).
    address = None if config.cluster == "auto" else config.cluster
    return cast(Service, ClusterService(address, settings))


def serve(config: DaemonConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT (or ``idle_exit`` seconds of idleness)."""
    from fission.server.app import create_app

    lock = lock_state_dir(config.service.state_dir)
    try:
        service = make_service(config)
        app = create_app(service, config.socket, config.keys_db)
        if config.grpc_address is not None:
            # QEMU is spawned with fork and a preexec_fn; gRPC's own fork handlers then crash
            # the child now and then (QEMU "exits" with SIGSEGV). Off before gRPC is loaded.
            os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
            try:
                from fission.server.grpc_server import attach_grpc
            except ModuleNotFoundError as exc:  # grpcio or protobuf missing: the server extra
                raise NotReady(f"gRPC needs {exc.name}: pip install 'fission[server]'") from exc
            attach_grpc(app, service, config.grpc_address, config.grpc_keys_db)
        watch = None
        if config.idle_exit is not None:
            watch = IdleWatch(app, config.idle_exit, service.sandboxes.count)
        outer: ASGIApp = watch or app
        if config.metrics_port is None:
            server_for(listen_config(config, outer), watch, app.state.stopping.set).run()
            return
        metrics_listener = metrics_socket(config.metrics_port)
        try:
            outer = MetricsPort(outer, app.state.metrics, config.metrics_port)
            server_config = listen_config(config, outer)
            # One server, two listening sockets: the API's and the metrics port.
            sockets = [server_config.bind_socket(), metrics_listener]
            server_for(server_config, watch, app.state.stopping.set).run(sockets=sockets)
        finally:
            metrics_listener.close()
    finally:
        if config.socket is not None:
            config.socket.unlink(missing_ok=True)
        lock.close()
