"""``fission run`` against a running daemon, without loading the full command line.

The usual ``fission run`` is a short program against a warm daemon, where the full CLI's imports
(typer, rich, pydantic through typer, httpx, the core: ~250 ms) would cost more than the run.
This path serves that case with the standard library: it reads the common options, sends
``POST /v1/run`` over the daemon's Unix socket and streams the NDJSON answer, printing through
``fission.cli.output`` as the full command does. It takes a command only when it is sure the
full command would treat it the same, and otherwise returns, so that the caller runs the full
command (which prints help, usage errors and messages as always):

* an option it does not handle (``--help``, ``--upload``, ``--download``, ``--no-daemon``, short
  options glued to their value, ``--``), a value it cannot read exactly as typer would, no
  program or two, ``--allow-host`` without ``--network``, a ``--file`` it cannot read;
* ``FISSION_URL`` naming a TCP daemon, or no daemon accepting on the socket (the full command
  decides between embedded and starting a daemon);
* the daemon refusing the request as invalid input (HTTP 400, 422): nothing ran, and the full
  command checks the same input itself and words the error as it always does.

Once the daemon has accepted the request the run is this path's and is never handed over, so a
program never runs twice.

Why no HTTP library: measured here, importing h11 costs ~17 ms and http.client ~19 ms, more
than the interpreter's whole start (~7 ms). The daemon is ours and speaks HTTP/1.1, so
``DaemonAnswer`` reads exactly what it sends: a status line, headers, and a chunked, sized or
close-delimited body.
"""

from __future__ import annotations

import _socket  # socket.py's wrapper costs ~3 ms at import (its enums) and adds nothing here
import binascii
import json
import os
import sys

from fission import __version__
from fission.cli.errors import abort, interrupted
from fission.cli.output import LiveOutput, end_notes, finish
from fission.errors import ERRORS_BY_CODE, FissionError, InvalidInput, RequestTimeout

TYPE_CHECKING = False  # typing costs milliseconds at start-up; type checkers see True
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

REQUEST_TIMEOUT = 60.0  # seconds, as the SDK's default request_timeout (the full command's)
MAX_WAIT = 86400.0  # seconds: above any run's timeout
RUN_PATH = "/v1/run"
# Options that take a value -> their field; flags -> theirs. Anything else goes to the full CLI.
VALUE_OPTIONS = {
    "--lang": "lang",
    "-l": "lang",
    "--file": "file",
    "-f": "file",
    "--timeout": "timeout",
    "--memory": "memory",
    "--cpus": "cpus",
    "--disk": "disk",
    "--pids": "pids",
    "--output-limit": "output_limit",
    "--env": "env",
    "-e": "env",
    "--allow-host": "allow_host",
}
FLAGS = {"--stdin": "stdin", "-i": "stdin", "--network": "network", "--json": "json"}
WHOLE = ("memory", "cpus", "disk", "pids")
DECIMAL = ("timeout", "output_limit")
REPEATED = ("env", "allow_host")
DEFAULTS: dict[str, Any] = {
    "lang": "python",
    "file": None,
    "timeout": 30.0,
    "memory": 256,
    "cpus": 1,
    "disk": 512,
    "pids": 256,
    "output_limit": 10.0,
}


class Unsure(Exception):
    """This command is the full CLI's to handle (nothing has run)."""


def whole_number(text: str) -> int:
    """``text`` as typer reads an int, when it is plain digits (``Unsure`` otherwise)."""
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise Unsure(text)
    return int(text)


def decimal_number(text: str) -> float:
    """``text`` as typer reads a float, when it is plain digits with at most one dot."""
    whole, dot, fraction = text.removeprefix("-").partition(".")
    plain = whole.isascii() and whole.isdigit()
    if not plain or (dot and not (fraction.isascii() and fraction.isdigit())):
        raise Unsure(text)
    return float(text)


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The options of ``fission run ARGV`` as the full command reads them (``Unsure`` else)."""
    options: dict[str, Any] = {**DEFAULTS, "env": [], "allow_host": [], "code": []}
    for flag in FLAGS.values():
        options[flag] = False
    args = iter(argv)
    for token in args:
        if not token.startswith("-"):
            options["code"].append(token)
            continue
        name, equals, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in FLAGS and not equals:
            options[FLAGS[name]] = True
            continue
        field = VALUE_OPTIONS.get(name)
        if field is None:
            raise Unsure(token)
        if not equals:
            following = next(args, None)
            if following is None:  # "requires an argument": the full CLI's usage error
                raise Unsure(token)
            value = following
        if field in REPEATED:
            options[field].append(value)
        elif field in WHOLE:
            options[field] = whole_number(value)
        elif field in DECIMAL:
            options[field] = decimal_number(value)
        else:
            options[field] = value
    return options


def program_text(options: dict[str, Any]) -> str:
    """The program from the argument or ``--file``, read as the full command reads it."""
    code, file = options["code"], options["file"]
    if len(code) + (file is not None) != 1:
        raise Unsure("give the code as an argument or with --file PATH")
    if file is None:
        return str(code[0])
    try:
        with open(file, encoding="utf-8") as source:  # as Path.read_text: universal newlines
            return source.read()
    except (OSError, ValueError) as exc:
        raise Unsure(f"--file {file}") from exc


def environment(pairs: list[str]) -> dict[str, str]:
    """``--env`` pairs whose names are plain ASCII identifiers (the full command checks others)."""
    env = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not (key.isascii() and key.isidentifier()):
            raise Unsure(f"--env {pair}")
        env[key] = value
    return env


def request_body(options: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/run`` body of these options (the daemon resolves and checks them)."""
    body: dict[str, Any] = {
        "language": options["lang"],
        "code": program_text(options),
        "timeout": options["timeout"],
        "memory_mb": options["memory"],
        "cpus": options["cpus"],
        "disk_mb": options["disk"],
        "pids": options["pids"],
        "output_limit_mb": options["output_limit"],
        "env": environment(options["env"]),
    }
    if options["allow_host"] and not options["network"]:
        raise Unsure("--allow-host needs --network")
    if options["network"]:
        body["network"] = {"enabled": True, "allow_hosts": options["allow_host"]}
    return body


def daemon_socket_path() -> str:
    """The socket the full command would try first (``Unsure`` when it would use TCP)."""
    url = os.environ.get("FISSION_URL") or None
    if url is None:
        from fission.config import daemon_socket_name

        return daemon_socket_name()
    path = url.removeprefix("unix:").removeprefix("//")
    if not url.startswith("unix:") or not path:
        raise Unsure("FISSION_URL names a TCP daemon")
    return path


def http_request(body: bytes) -> bytes:
    """The bytes of ``POST /v1/run`` with ``body``."""
    head = [
        f"POST {RUN_PATH} HTTP/1.1",
        "Host: fission",
        f"User-Agent: fission-cli/{__version__}",
        "Accept: application/x-ndjson",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    key = os.environ.get("FISSION_API_KEY")
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class DaemonAnswer:
    """The daemon's HTTP/1.1 answer on a socket: status, headers, then the body's lines."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise EOFError("the daemon closed the connection")
        self._buffer += data

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _take_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def read_head(self) -> None:
        """Read the status line and headers."""
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def pieces(self) -> Iterator[bytes]:
        """The body as it arrives: chunked, sized by Content-Length, or up to the close."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self._take_line().split(b";")[0], 16):
                yield self._take(size)
                self._take_line()
        elif "content-length" in self.headers:
            yield self._take(int(self.headers["content-length"]))
        else:
            yield self._buffer
            while data := self._sock.recv(65536):
                yield data

    def lines(self) -> Iterator[bytes]:
        """The body's lines, each as soon as it is complete."""
        pending = b""
        for piece in self.pieces():
            pending += piece
            *complete, pending = pending.split(b"\n")
            yield from complete
        if pending:
            yield pending


def refusal(answer: DaemonAnswer) -> FissionError | None:
    """The error a non-200 answer stands for, or None when its body is not fission's."""
    try:
        error = json.loads(b"".join(answer.pieces()))["error"]
        return ERRORS_BY_CODE.get(str(error["code"]), FissionError)(str(error["message"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return None


class Printer:
    """Streams a run's NDJSON lines to the terminal, then ends as the full command does."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.live = None if options["json"] else LiveOutput()
        self.output: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def feed(self, raw: bytes) -> None:
        """Print an output line; end the process on the result or an error line."""
        if not raw.strip():
            return
        try:
            line = json.loads(raw)
            kind = line["type"]
            if kind == "output":
                stream = str(line["stream"])
                if "data_b64" in line:
                    data = binascii.a2b_base64(line["data_b64"].encode("ascii"))
                else:
                    data = str(line["data"]).encode("utf-8")
                self.output.setdefault(stream, []).append(data)
                if self.live is not None:
                    self.live(stream, data)
                return
            if kind == "result":
                self.finish(line)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            abort(FissionError(f"the daemon sent a line the SDK cannot read: {exc!r}"))
        if kind == "error":
            message = str(line.get("message", "the daemon reported an error"))
            abort(ERRORS_BY_CODE.get(str(line.get("code")), FissionError)(message))
        if kind not in ("file", "install"):
            abort(FissionError(f"the daemon sent a line of unknown type {kind!r}"))

    def finish(self, line: dict[str, Any]) -> None:
        """Exit as ``fission.cli.run.report`` does with the RunResult of ``line``."""
        text = {s: b"".join(self.output[s]).decode(errors="replace") for s in ("stdout", "stderr")}
        exit_code, timed_out, oom = (
            int(line["exit_code"]),
            bool(line["timed_out"]),
            bool(line["oom"]),
        )
        truncated = bool(line["truncated"])
        result = {  # RunResult.to_json, from the daemon's closing line
            "stdout": text["stdout"],
            "stderr": text["stderr"],
            "exit_code": exit_code,
            "timed_out": timed_out,
            "oom": oom,
            "truncated": truncated,
            "signal": int(line["signal"]),
            **{key: round(float(line[key]), 3) for key in ("duration_ms", "boot_ms", "total_ms")},
        }
        notes = end_notes(
            timed_out=timed_out,
            oom=oom,
            truncated=truncated,
            timeout=self.options["timeout"],
            memory_mb=self.options["memory"],
            output_limit_mb=self.options["output_limit"],
        )
        finish(exit_code, json.dumps(result) if self.options["json"] else None, notes)


def lost(where: str, reason: str) -> FissionError:
    """The full command's error for a connection that broke during the run."""
    return FissionError(
        f"lost the connection to the daemon at the Unix socket {where} during POST {RUN_PATH}: "
        f"{reason}"
    )


def timed_out(where: str, run_timeout: float) -> RequestTimeout:
    """The full command's error for a daemon silent past the run's deadline."""
    total = run_timeout + REQUEST_TIMEOUT
    return RequestTimeout(
        f"POST {RUN_PATH}: the daemon at the Unix socket {where} sent nothing for {total:g} s "
        f"(the run's timeout={run_timeout:g} s + request_timeout={REQUEST_TIMEOUT:g} s): "
        "raise timeout or request_timeout"
    )


def hand_over_stdin(data: bytes) -> None:
    """Give the full command the stdin this path has already read."""
    import io

    sys.stdin = io.TextIOWrapper(io.BytesIO(data))


def fast_run(argv: list[str]) -> None:
    """Serve ``fission run ARGV`` through a running daemon and exit; return when unsure."""
    try:
        options = parse_args(argv)
        body = request_body(options)
        where = daemon_socket_path()
    except Unsure:
        return
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        # A timeout out of range is the daemon's to refuse; the socket needs a number it takes.
        sock.settimeout(REQUEST_TIMEOUT + min(max(options["timeout"], 0.0), MAX_WAIT))
        try:
            sock.connect(where)
        except OSError:
            return  # no daemon here: the full command decides what happens instead
        stdin = sys.stdin.buffer.read() if options["stdin"] else None
        if stdin is not None:
            body["stdin_b64"] = binascii.b2a_base64(stdin, newline=False).decode("ascii")
        try:
            serve(sock, where, options, json.dumps(body).encode("utf-8"))
        except Unsure:
            if stdin is not None:
                hand_over_stdin(stdin)
            return
    except KeyboardInterrupt:
        interrupted()
    finally:
        sock.close()


def serve(sock: _socket.socket, where: str, options: dict[str, Any], body: bytes) -> None:
    """Send the run, print its answer and exit (``Unsure`` when the daemon refused it)."""
    try:
        sock.sendall(http_request(body))
        answer = DaemonAnswer(sock)
        answer.read_head()
        if answer.status != 200:
            error = refusal(answer)
            if error is None or isinstance(error, InvalidInput):
                raise Unsure(f"HTTP {answer.status}")  # nothing ran: the full command says why
            abort(error)
        printer = Printer(options)
        for line in answer.lines():
            printer.feed(line)
    except TimeoutError:
        abort(timed_out(where, options["timeout"]))
    except (OSError, EOFError, ValueError, IndexError) as exc:  # not HTTP as the daemon speaks it
        abort(lost(where, str(exc) or type(exc).__name__))
    abort(FissionError("the daemon ended the stream without a result (did it stop?)"))
