"""How the daemon logs: text or JSON lines on stderr, each with its request, sandbox and key id.

``logging_config`` is handed to uvicorn (``log_config``), which applies it with
``logging.config.dictConfig`` at start-up, so uvicorn's own loggers and fission's share the
format. ``log_context.ContextFilter`` puts the ids on every record.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from fission import log_context
from fission.errors import InvalidInput

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s sandbox_id=%(sandbox_id)s "
    "key_id=%(key_id)s] %(message)s"
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in log_context.FIELDS:
            value = getattr(record, name, None)
            line[name] = None if value in (None, "-") else value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def check_log_format(log_format: str) -> str:
    """``log_format`` if it is one we write; InvalidInput naming the choices otherwise."""
    if log_format not in LOG_FORMATS:
        raise InvalidInput(f"--log-format {log_format!r} is unknown: use text or json")
    return log_format


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A ``dictConfig`` for uvicorn's and fission's loggers, in ``log_format`` at ``level``."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"}
        if check_log_format(log_format) == "json"
        else {"format": TEXT_FORMAT}
    )
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "fission",
        "filters": ["context"],
    }
    logger = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "fission.log_context.ContextFilter"}},
        "formatters": {"fission": formatter},
        "handlers": {"stderr": handler},
        "loggers": {name: logger for name in ("fission", "uvicorn", "uvicorn.error")},
    }
