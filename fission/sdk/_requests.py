"""The SDK's pure half: requests to build and responses to read, shared by sync and async.

Nothing here does I/O. Each API operation is a function returning a ``Call``; the transports
(``_http``) send it. Error bodies map to the ``fission.errors`` classes through
``fission.api.run_stream.error_from_body``, the same table the server encodes them with::

    {"error": {"code": "sandbox_not_found", "message": ...}}  ->  SandboxNotFound(message)
    streamed {"type": "error", "code": ..., "message": ...}    ->  the class of that code
    any other failure (no JSON error body)                     ->  FissionError naming the status
"""

from __future__ import annotations

import base64
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from fission.api.run_stream import error_from_body, file_bytes, output_bytes, result_from_lines
from fission.core.provision import INSTALL_TIMEOUT
from fission.errors import FissionError, QuotaExceeded
from fission.sdk._models import (
    ExposedPort,
    FileInfo,
    OutputEvent,
    PortToken,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
    WatchEvent,
)

CHUNK_SIZE = 1024 * 1024  # file transfers move in pieces of this many bytes
PAGE_SIZE = 100
NDJSON = "application/x-ndjson"
Params = tuple[tuple[str, str], ...]
C = TypeVar("C")


@dataclass(frozen=True)
class Call:
    """One HTTP request to the daemon, before it is sent.

    ``run_timeout`` is how long the response may stay silent beyond the request timeout: the
    deadline of the run it streams (None for ordinary calls). ``request_timeout`` overrides the
    connection's for this call (a quick health probe).
    """

    method: str
    path: str
    params: Params = ()
    json: dict[str, Any] | None = None
    run_timeout: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    request_timeout: float | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# -- building requests ---------------------------------------------------------------------------
def encode_stdin(stdin: bytes | str | None) -> str | None:
    """``stdin`` as the API's ``stdin_b64`` field."""
    if stdin is None:
        return None
    data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
    return base64.b64encode(data).decode("ascii")


def sandbox_path(sandbox_id: str, suffix: str = "") -> str:
    """The URL path of one sandbox (the id is quoted: it comes from the caller)."""
    return f"/v1/sandboxes/{quote(sandbox_id, safe='')}{suffix}"


def health(request_timeout: float | None = None) -> Call:
    """Is the daemon up."""
    return Call("GET", "/v1/health", request_timeout=request_timeout)


def pools() -> Call:
    """The daemon's pools and memory budget."""
    return Call("GET", "/v1/pools")


def one_shot_run(
    language: str,
    code: str,
    limits: Mapping[str, float],
    env: Mapping[str, str] | None = None,
    stdin: bytes | str | None = None,
    allow_hosts: Sequence[str] | None = None,
    *,
    network: Mapping[str, Any] | None = None,
    uploads: Sequence[tuple[str, bytes]] = (),
    downloads: Sequence[str] = (),
    template: str | None = None,
) -> Call:
    """Run ``code`` once in a fresh VM; ``limits`` holds ``timeout`` and the other limits.

    ``network`` is a whole policy (``NetworkPolicy.to_json``); ``allow_hosts`` the short form.
    ``uploads`` are (guest path, bytes) written in first; ``downloads`` guest paths read out
    after, into the result's ``files``.
    """
    body: dict[str, Any] = {"language": language, "code": code, **limits, "env": dict(env or {})}
    body["stdin_b64"] = encode_stdin(stdin)
    if network is not None:
        body["network"] = dict(network)
    elif allow_hosts:
        body["network"] = network_body("none", allow_hosts)
    if uploads:
        body["uploads"] = files_body(uploads)
    if downloads:
        body["downloads"] = list(downloads)
    if template is not None:
        body["template"] = template
    return Call(
        "POST", "/v1/run", json=body, run_timeout=float(limits["timeout"]), headers=_ndjson()
    )


def files_body(files: Sequence[tuple[str, bytes]]) -> list[dict[str, str]]:
    """Files for a request body: guest path and base64 bytes."""
    return [{"path": path, "data_b64": base64.b64encode(data).decode()} for path, data in files]


def install(
    language: str,
    packages: Sequence[str],
    command: str,
    *,
    timeout: float,
    index_url: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> Call:
    """Install packages (cached per set) and run a command: ``fission install``."""
    body = {
        "language": language,
        "packages": list(packages),
        "command": command,
        "timeout": timeout,
        "index_url": index_url,
        "allow_hosts": list(allow_hosts),
    }
    # Installing may take INSTALL_TIMEOUT before the command's own deadline starts.
    run_timeout = timeout + INSTALL_TIMEOUT
    return Call("POST", "/v1/install", json=body, run_timeout=run_timeout, headers=_ndjson())


def repo(
    language: str,
    url: str | None,
    command: str,
    *,
    timeout: float,
    ref: str | None = None,
    allow_hosts: Sequence[str] = (),
    files: Sequence[tuple[str, bytes]] = (),
) -> Call:
    """Clone ``url`` (or use ``files``) and run a command: ``fission repo``."""
    body = {
        "language": language,
        "url": url,
        "command": command,
        "timeout": timeout,
        "ref": ref,
        "allow_hosts": list(allow_hosts),
        "files": files_body(files),
    }
    return Call("POST", "/v1/repo", json=body, run_timeout=timeout, headers=_ndjson())


def create_sandbox(
    language: str,
    *,
    ttl: float,
    timeout: float,
    memory_mb: int,
    cpus: int,
    disk_mb: int,
    env: Mapping[str, str] | None,
    metadata: Mapping[str, str] | None,
    network: str | Mapping[str, Any],
    allow_hosts: Sequence[str] | None = None,
    from_snapshot: str | None = None,
    on_timeout: str = "delete",
    template: str | None = None,
) -> Call:
    """Create a sandbox (from a snapshot: its language, limits, memory and files)."""
    body = {
        "language": language,
        "ttl": ttl,
        "timeout": timeout,
        "memory_mb": memory_mb,
        "cpus": cpus,
        "disk_mb": disk_mb,
        "env": dict(env or {}),
        "metadata": dict(metadata or {}),
        "network": network_body(network, allow_hosts),
    }
    if from_snapshot is not None:
        body["from_snapshot"] = from_snapshot
    if template is not None:
        body["template"] = template
    if on_timeout != "delete":  # the daemon's default; older daemons know no other
        body["on_timeout"] = on_timeout
    return Call("POST", "/v1/sandboxes", json=body)


def network_body(
    network: str | Mapping[str, Any], allow_hosts: Sequence[str] | None
) -> str | dict[str, Any]:
    """The ``network`` of a request: "none", or a policy allowing ``allow_hosts``."""
    if allow_hosts:
        return {"enabled": True, "allow_hosts": list(allow_hosts)}
    return network if isinstance(network, str) else dict(network)


def get_sandbox(sandbox_id: str) -> Call:
    """A sandbox's facts."""
    return Call("GET", sandbox_path(sandbox_id))


def list_sandboxes(
    state: str | None, metadata: Mapping[str, str] | None, cursor: str | None = None
) -> Call:
    """One page of sandboxes matching the filters."""
    params = [("limit", str(PAGE_SIZE))]
    if state is not None:
        params.append(("state", str(state)))
    params.extend(("metadata", f"{key}:{value}") for key, value in (metadata or {}).items())
    if cursor:
        params.append(("cursor", cursor))
    return Call("GET", "/v1/sandboxes", params=tuple(params))


def delete_sandbox(sandbox_id: str) -> Call:
    """Destroy a sandbox."""
    return Call("DELETE", sandbox_path(sandbox_id))


def pause_sandbox(sandbox_id: str) -> Call:
    """Save a sandbox to disk and stop its VM."""
    return Call("POST", sandbox_path(sandbox_id, "/pause"))


def resume_sandbox(sandbox_id: str) -> Call:
    """Start a paused sandbox again."""
    return Call("POST", sandbox_path(sandbox_id, "/resume"))


def expose_port(sandbox_id: str, port: int) -> Call:
    """Make a sandbox's port reachable through the daemon."""
    return Call("POST", sandbox_path(sandbox_id, "/expose"), json={"port": port})


def unexpose_port(sandbox_id: str, port: int) -> Call:
    """Stop exposing a port (its tokens and open streams end)."""
    return Call("DELETE", sandbox_path(sandbox_id, f"/exposed/{int(port)}"))


def list_ports(sandbox_id: str) -> Call:
    """A sandbox's exposed ports."""
    return Call("GET", sandbox_path(sandbox_id, "/exposed"))


def mint_port_token(sandbox_id: str, port: int) -> Call:
    """A new token for one exposed port."""
    return Call("POST", sandbox_path(sandbox_id, f"/exposed/{int(port)}/tokens"))


def revoke_port_token(sandbox_id: str, port: int, token_id: str) -> Call:
    """Refuse a port token from now on."""
    path = f"/exposed/{int(port)}/tokens/{quote(token_id, safe='')}"
    return Call("DELETE", sandbox_path(sandbox_id, path))


def parse_port(body: Any) -> ExposedPort:
    """An exposed port's JSON."""
    try:
        return ExposedPort(
            str(body["sandbox_id"]), int(body["port"]), str(body["path"]), str(body["url"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FissionError(f"the daemon sent a port the SDK cannot read: {exc!r}") from exc


def parse_ports(body: Any) -> list[ExposedPort]:
    """A listing of exposed ports."""
    try:
        return [parse_port(item) for item in body["ports"]]
    except (KeyError, TypeError) as exc:
        raise FissionError(f"the daemon sent a listing the SDK cannot read: {exc!r}") from exc


def parse_port_token(body: Any) -> PortToken:
    """A minted port token's JSON."""
    try:
        return PortToken(
            str(body["token_id"]),
            str(body["token"]),
            int(body["port"]),
            str(body["url"]),
            str(body["preview_url"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FissionError(f"the daemon sent a token the SDK cannot read: {exc!r}") from exc


def set_ttl(sandbox_id: str, ttl: float) -> Call:
    """Keep a sandbox alive ``ttl`` seconds from now."""
    return Call("POST", sandbox_path(sandbox_id, "/ttl"), json={"ttl": ttl})


def run_code(
    sandbox_id: str,
    code: str,
    *,
    timeout: float | None,
    default_timeout: float,
    env: Mapping[str, str] | None,
    context: str | None,
    fresh_context: bool,
    checkpoint: bool = False,
) -> Call:
    """Run code in a sandbox (streamed); ``default_timeout`` is the sandbox's own."""
    body = {
        "code": code,
        "timeout": timeout,
        "env": dict(env or {}),
        "context": context,
        "fresh_context": fresh_context,
    } | ({"checkpoint": True} if checkpoint else {})
    return Call(
        "POST",
        sandbox_path(sandbox_id, "/run"),
        json=body,
        run_timeout=timeout if timeout is not None else default_timeout,
        headers=_ndjson(),
    )


def exec_command(
    sandbox_id: str,
    command: str | list[str],
    *,
    timeout: float | None,
    default_timeout: float,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    checkpoint: bool = False,
) -> Call:
    """Run a shell line (a string) or an argv (a list) in a sandbox (streamed)."""
    body = {
        "command": command if isinstance(command, str) else list(command),
        "timeout": timeout,
        "env": dict(env or {}),
        "cwd": cwd,
        "stdin_b64": encode_stdin(stdin),
    } | ({"checkpoint": True} if checkpoint else {})
    return Call(
        "POST",
        sandbox_path(sandbox_id, "/exec"),
        json=body,
        run_timeout=timeout if timeout is not None else default_timeout,
        headers=_ndjson(),
    )


def snapshot_sandbox(sandbox_id: str, name: str | None) -> Call:
    """Save a running sandbox as a snapshot (it keeps running)."""
    return Call("POST", sandbox_path(sandbox_id, "/snapshots"), json={"name": name})


def fork_sandbox(sandbox_id: str, n: int) -> Call:
    """Snapshot a sandbox and start ``n`` sandboxes from it."""
    return Call("POST", sandbox_path(sandbox_id, "/fork"), json={"n": n})


def rewind_sandbox(sandbox_id: str, checkpoint_id: str) -> Call:
    """Put a sandbox back to one of its checkpoints."""
    body = {"checkpoint_id": checkpoint_id}
    return Call("POST", sandbox_path(sandbox_id, "/rewind"), json=body)


def list_snapshots(sandbox_id: str | None, kind: str | None) -> Call:
    """The caller's snapshots, optionally of one sandbox or of one kind."""
    params = [(k, v) for k, v in (("sandbox_id", sandbox_id), ("kind", kind)) if v is not None]
    return Call("GET", "/v1/snapshots", params=tuple(params))


def get_snapshot(snapshot_id: str) -> Call:
    """One snapshot's facts."""
    return Call("GET", f"/v1/snapshots/{quote(snapshot_id, safe='')}")


def delete_snapshot(snapshot_id: str) -> Call:
    """Delete a snapshot (refused while a sandbox is built on it)."""
    return Call("DELETE", f"/v1/snapshots/{quote(snapshot_id, safe='')}")


def parse_snapshot(body: Any) -> SnapshotInfo:
    """A snapshot's JSON as SnapshotInfo."""
    try:
        return SnapshotInfo(
            id=str(body["id"]),
            name=None if body.get("name") is None else str(body["name"]),
            kind=str(body["kind"]),
            sandbox_id=str(body["sandbox_id"]),
            language=str(body["language"]),
            size_bytes=int(body["size_bytes"]),
            created_at=float(body["created_at"]),
            last_used_at=float(body.get("last_used_at", body["created_at"])),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise FissionError(f"the daemon sent a snapshot the SDK cannot read: {exc!r}") from exc


def parse_snapshots(body: Any) -> list[SnapshotInfo]:
    """A snapshot listing."""
    try:
        return [parse_snapshot(record) for record in body["snapshots"]]
    except (KeyError, TypeError) as exc:
        raise FissionError(f"the daemon sent a listing the SDK cannot read: {exc!r}") from exc


def parse_fork(body: Any) -> tuple[SnapshotInfo, list[Any]]:
    """A fork's answer: its snapshot and the new sandboxes' JSON."""
    try:
        return parse_snapshot(body["snapshot"]), list(body["sandboxes"])
    except (KeyError, TypeError) as exc:
        raise FissionError(f"the daemon sent a fork the SDK cannot read: {exc!r}") from exc


def write_file(sandbox_id: str, path: str) -> Call:
    """Upload a file (the raw bytes are the request body)."""
    headers = {"Content-Type": "application/octet-stream"}
    return Call("PUT", sandbox_path(sandbox_id, "/files"), (("path", path),), headers=headers)


def read_file(sandbox_id: str, path: str) -> Call:
    """Download a file (the response body is its raw bytes)."""
    return Call("GET", sandbox_path(sandbox_id, "/files"), (("path", path),))


def list_files(sandbox_id: str, path: str) -> Call:
    """The entries of a directory."""
    return Call("GET", sandbox_path(sandbox_id, "/files/list"), (("path", path),))


def stat_file(sandbox_id: str, path: str) -> Call:
    """Facts about one path."""
    return Call("GET", sandbox_path(sandbox_id, "/files/stat"), (("path", path),))


def make_dir(sandbox_id: str, path: str) -> Call:
    """Create a directory and its parents."""
    return Call("POST", sandbox_path(sandbox_id, "/files/mkdir"), json={"path": path})


def remove_file(sandbox_id: str, path: str, recursive: bool) -> Call:
    """Remove a file, or a directory tree with ``recursive``."""
    params = (("path", path), ("recursive", "true" if recursive else "false"))
    return Call("DELETE", sandbox_path(sandbox_id, "/files"), params)


WATCH_SILENCE = 365 * 86400.0  # a watch may see no change for a long time: no read deadline


def watch_files(sandbox_id: str, path: str, recursive: bool) -> Call:
    """A directory's changes, streamed (a ``ready`` line first)."""
    params = (("path", path), ("recursive", "true" if recursive else "false"))
    return Call(
        "GET",
        sandbox_path(sandbox_id, "/files/watch"),
        params,
        run_timeout=WATCH_SILENCE,
        headers=_ndjson(),
    )


def is_watch_ready(raw: str | bytes) -> bool:
    """Whether a watch stream's line says the watch is in place."""
    return bool(raw and raw.strip()) and json.loads(raw).get("type") == "ready"


def parse_watch_line(raw: str | bytes) -> WatchEvent | None:
    """The change a watch stream's line reports (None for ``ready``, ``end`` or a blank)."""
    if not raw or not raw.strip():
        return None
    line = json.loads(raw)
    if not isinstance(line, dict) or line.get("type") != "change":
        return None
    return WatchEvent(str(line.get("event")), str(line.get("path", "")), str(line.get("to", "")))


def _ndjson() -> dict[str, str]:
    return {"Accept": NDJSON}


# -- reading responses ---------------------------------------------------------------------------
def error_from_response(
    status: int, content: bytes, headers: Mapping[str, str], where: str
) -> FissionError:
    """The error an HTTP failure stands for (``headers`` with lower-case names)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "code" not in error:
        detail = content.decode("utf-8", errors="replace").strip()[:300] or "no details"
        return FissionError(f"the daemon at {where} answered HTTP {status}: {detail}")
    found = error_from_body(error)
    if isinstance(found, QuotaExceeded):
        try:
            found.retry_after = float(headers.get("retry-after", ""))
        except ValueError:
            found.retry_after = None
    return found


def parse_json(status: int, content: bytes, headers: Mapping[str, str], where: str) -> Any:
    """The JSON body of a response, raising its error when it is a failure (None for 204)."""
    if status >= 400:
        raise error_from_response(status, content, headers, where)
    if status == 204 or not content:
        return None
    try:
        return json.loads(content)
    except ValueError as exc:
        raise FissionError(f"the daemon at {where} answered HTTP {status} without JSON") from exc


def parse_sandbox(body: Any) -> SandboxInfo:
    """A sandbox's JSON as SandboxInfo."""
    try:
        limits = body.get("limits") or {}
        return SandboxInfo(
            id=str(body["id"]),
            language=str(body["language"]),
            state=str(body["state"]),
            created_at=float(body["created_at"]),
            expires_at=float(body["expires_at"]),
            ttl=float(body["ttl"]),
            timeout=float(limits.get("timeout", 30.0)),
            memory_mb=int(limits.get("memory_mb", 256)),
            cpus=int(limits.get("cpus", 1)),
            disk_mb=int(limits.get("disk_mb", 512)),
            metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
            network=str(body.get("network", "none")),
            on_timeout=str(body.get("on_timeout", "delete")),
            lost_reason=str(body.get("lost_reason") or ""),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise FissionError(f"the daemon sent a sandbox the SDK cannot read: {exc!r}") from exc


def parse_page(body: Any) -> tuple[list[SandboxInfo], str | None]:
    """One page of a listing and the cursor of the next (None on the last page)."""
    try:
        records, cursor = body["sandboxes"], body.get("next_cursor")
    except (KeyError, TypeError) as exc:
        raise FissionError(f"the daemon sent a listing the SDK cannot read: {exc!r}") from exc
    return [parse_sandbox(record) for record in records], (str(cursor) if cursor else None)


def parse_file_info(body: Any) -> FileInfo:
    """A file's JSON as FileInfo."""
    try:
        path = str(body["path"])
        kind = body.get("kind") or body.get("type") or ("dir" if body.get("is_dir") else "file")
        return FileInfo(
            path=path,
            name=str(body.get("name") or posixpath.basename(path.rstrip("/")) or path),
            kind=str(kind),
            size=int(body.get("size", 0)),
            mode=int(body.get("mode", 0)),
            mtime=float(body.get("mtime", 0.0)),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise FissionError(f"the daemon sent file facts the SDK cannot read: {exc!r}") from exc


def parse_entries(body: Any) -> list[FileInfo]:
    """A directory listing as FileInfo entries."""
    try:
        entries = body["entries"]
    except (KeyError, TypeError) as exc:
        raise FissionError(f"the daemon sent a listing the SDK cannot read: {exc!r}") from exc
    return [parse_file_info(entry) for entry in entries]


class RunAssembler:
    """Turns the NDJSON lines of a streamed run into OutputEvents and, last, its RunResult."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._files: dict[str, bytes] = {}
        self.install: dict[str, Any] | None = None  # the facts of an install, if one ran
        self.result: RunResult | None = None

    def feed(self, raw: str | bytes) -> OutputEvent | RunResult | None:
        """The event one line stands for (None for a blank line); an error line raises it."""
        if not raw.strip():
            return None
        try:
            line = json.loads(raw)
            kind = line["type"]
            if kind == "output":
                stream, data = output_bytes(line)
                self._chunks.setdefault(stream, []).append(data)
                return OutputEvent(stream, data)
            if kind == "file":
                path, data = file_bytes(line)
                self._files[path] = data
                return None
            if kind == "install":
                self.install = {key: line[key] for key in ("cached", "setup_ms", "installed")}
                return None
            if kind == "result":
                stdout, stderr = b"".join(self._chunks["stdout"]), b"".join(self._chunks["stderr"])
                self.result = result_from_lines(line, stdout, stderr, self._files)
                return self.result
        except (KeyError, TypeError, ValueError) as exc:
            raise FissionError(f"the daemon sent a line the SDK cannot read: {exc!r}") from exc
        if kind == "error":
            raise error_from_body(line)
        raise FissionError(f"the daemon sent a line of unknown type {kind!r}")


def missing_result() -> FissionError:
    """The error for a stream that ended before its result."""
    return FissionError("the daemon ended the stream without a result (did it stop?)")


def callback_for(event: OutputEvent, on_stdout: C | None, on_stderr: C | None) -> C | None:
    """The callback an output event goes to, if any."""
    if event.stream == "stdout":
        return on_stdout
    return on_stderr if event.stream == "stderr" else None
