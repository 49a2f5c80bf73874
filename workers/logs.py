"""A worker's logging: its own state changes at INFO, never a line per request.

Workers run for days unattended, so their log is read by people and shipped by
agents. At the default level only batchdb's own loggers (`batchdb`, which holds
`batchdb.workers.*` too) speak at INFO: they log batches and state changes (start/stop, pauses, hand-backs,
lanes waiting). Every other library is held at WARNING — an allowlist, not a list of
known offenders, because the SDKs' HTTP clients log each request at INFO and their
logger names change (openai 3 sends through `httpx2`, not `httpx`). `-v` lets the
libraries' INFO through, `-vv` everything. `--log-format json` writes one JSON object
per line for log shippers.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
# batchdb's own loggers: INFO at the default level.
OWN_LOGGERS = ("batchdb",)
# HTTP clients and SDKs that log every request at INFO: quiet unless -vv, even when
# something else (an embedding application, -v) lowers the root level to INFO.
# psycopg_pool logs each connection it hands out at INFO: a line per statement.
HTTP_CLIENT_LOGGERS = (
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "openai",
    "google_genai",
    "aiohttp.access",
    "psycopg.pool",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def protect_logging() -> None:
    """What every running worker needs, however it was started (`batchdb worker`, `run_worker`,
    `Worker(...).run()` in a notebook): the SDKs' HTTP clients never log a line per request
    (unless the root logger is at DEBUG), and every handler of the root logger masks the API
    keys this process resolved. It leaves the embedding application's own levels and handlers
    alone otherwise; idempotent."""
    from batchdb.secrets import mask_keys_in_root_handlers

    root = logging.getLogger()
    quiet = logging.DEBUG if root.getEffectiveLevel() <= logging.DEBUG else logging.WARNING
    for name in HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    mask_keys_in_root_handlers()


def configure_worker_logging(log_format: str = "text") -> None:
    """Set levels (and the format) for a worker process. The root logger's level is the one
    `batchdb -v` chose (WARNING by default) and stays: it is what other libraries get."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(min(root.getEffectiveLevel(), logging.INFO))
    protect_logging()
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
