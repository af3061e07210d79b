"""`fission serve`: load the configuration, take the state dir's lock, run uvicorn.

Listens on a Unix socket in the user's runtime dir by default (TCP only when asked). uvicorn
turns SIGTERM and SIGINT into a graceful shutdown, whose last step (the app's lifespan)
destroys every VM the daemon owns. A second daemon on the same state dir is refused.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.auth.db import default_db_path
from fission.config import daemon_socket, runtime_dir
from fission.core.languages import resolve_language
from fission.core.service import ServiceConfig
from fission.core.service_options import default_budget_mb, parse_pool_flags
from fission.core.state_dirs import lock_state_dir
from fission.errors import InvalidInput, NotReady


@dataclass(frozen=True)
class DaemonConfig:
    """Where the daemon listens and how its service runs."""

    service: ServiceConfig
    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    log_level: str = "warning"
    keys_db: Path | None = None  # set for TCP listeners: every request needs an API key
    extra: dict[str, Any] = field(default_factory=dict)
    # gRPC (fission.server.grpc_server): "HOST:PORT" or "unix:PATH"; None serves no gRPC
    grpc_address: str | None = None
    grpc_keys_db: Path | None = None  # set for a TCP gRPC listener


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
) -> DaemonConfig:
    """Merge defaults, the config file and flags (flags win) into a DaemonConfig."""
    file = load_config_file(config_file) if config_file else {}
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
    state = state_dir or Path(file.get("state_dir", runtime_dir() / "daemon"))
    listen_socket = socket or (Path(file["socket"]) if "socket" in file else None)
    host = host or file.get("host")
    port = port or file.get("port")
    if (host is None) != (port is None):
        raise InvalidInput("TCP needs both --host and --port")
    if host is None and listen_socket is None:
        listen_socket = daemon_socket()
    database = db or (Path(file["db"]) if "db" in file else default_db_path())
    service = ServiceConfig(state, pool_sizes, budget, timeout, audit_db=database)
    grpc_listen = (grpc_host, grpc_port, grpc_socket)
    if not any(grpc_listen):  # gRPC flags replace the file's gRPC settings as a whole
        file_socket = Path(file["grpc_socket"]) if "grpc_socket" in file else None
        grpc_listen = (file.get("grpc_host"), file.get("grpc_port"), file_socket)
    grpc = grpc_address(*grpc_listen)
    return DaemonConfig(
        service=service,
        socket=listen_socket,
        host=host,
        port=port,
        keys_db=database if host is not None else None,
        grpc_address=grpc,
        grpc_keys_db=database if grpc is not None and not grpc.startswith("unix:") else None,
    )


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


def serve(config: DaemonConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    import uvicorn

    from fission.core.service import Service
    from fission.server.app import create_app

    lock = lock_state_dir(config.service.state_dir)
    try:
        service = Service(config.service)
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
        if config.socket is not None:
            config.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            config.socket.unlink(missing_ok=True)  # a dead daemon's socket; we hold the lock
            server_config = uvicorn.Config(
                app, uds=str(config.socket), log_level=config.log_level, access_log=False
            )
        else:
            server_config = uvicorn.Config(
                app,
                host=config.host or "127.0.0.1",
                port=config.port or 0,
                log_level=config.log_level,
                access_log=False,
            )
        uvicorn.Server(server_config).run()
    finally:
        if config.socket is not None:
            config.socket.unlink(missing_ok=True)
        lock.close()
