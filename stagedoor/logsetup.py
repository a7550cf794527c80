"""Logging: the process's diagnostic log (stderr) and the lines of the access log (stdout).

Two streams, one format switch (``stagedoor.log.format``):

- ``json``: every diagnostic record and every access record is one JSON object per line.
- ``text``: diagnostics as ``time LEVEL logger: message``; access records as ``key=value``
  pairs (logfmt), values quoted when they contain spaces or quotes.

Nothing here knows about mitmproxy; the access-log addon builds a plain dict and calls
:func:`format_access_record`. :func:`redact_target` keeps query-string secrets out of any line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, TextIO
from urllib.parse import unquote_plus

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REDACTED = "[REDACTED]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields a diagnostic line carries when it concerns one request (``extra=``), so an operator
#: can join it with that request's access-log line.
REQUEST_FIELDS = ("request_id",)
#: The request being handled, for lines logged deep inside its handling (permission
#: delegation, rate-limit stores) by code that does not know it: the gateway sets it in each of
#: its hooks (one task per connection, so a line gets the id of the request on its connection).
current_request_id: ContextVar[str | None] = ContextVar("stagedoor_request_id", default=None)
#: Loggers whose every line concerns the request being handled.
REQUEST_LOGGERS = ("stagedoor.gateway", "stagedoor.permissions", "stagedoor.ratelimit")


class RequestContext(logging.Filter):
    """Adds ``request_id`` (from :data:`current_request_id`) to lines of :data:`REQUEST_LOGGERS`
    that do not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None and \
                record.name.startswith(REQUEST_LOGGERS):
            request_id = current_request_id.get()
            if request_id is not None:
                record.request_id = request_id
        return True

# Third-party loggers whose INFO chatter is not an operator's concern.
_QUIET_LOGGERS = ("mitmproxy", "httpx", "httpcore", "watchfiles", "asyncio")


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def iso_time(epoch: float) -> str:
    """``2026-11-25T14:58:54.123Z`` (UTC, milliseconds)."""
    seconds = int(epoch)
    if seconds != _second[0]:  # strftime once per second, not once per line
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second[0] = seconds
    return f"{_second[1]}.{int((epoch - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in REQUEST_FIELDS:  # log.warning(..., extra={"request_id": ...})
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then ``request_id=...`` when the record concerns one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{key}={_logfmt_value(getattr(record, key))}"
                         for key in REQUEST_FIELDS if getattr(record, key, None) is not None)
        if not extra:
            return text
        head, sep, tail = text.partition("\n")  # after the message, before a traceback
        return f"{head} {extra}{sep}{tail}"


class _StagedoorHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler :func:`configure_logging` installed, so a reconfigure replaces it."""


def parse_level(text: str) -> int:
    """``info`` -> ``logging.INFO``; raises ValueError naming the accepted levels."""
    name = text.strip().lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"unknown log level {text!r} (use one of {', '.join(LOG_LEVELS)})")
    return logging.getLevelNamesMapping()[name.upper()]


def configure_logging(level: str = "info", fmt: str = "text",
                      stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: one handler on ``stream`` (stderr), level and format.

    Safe to call again (on reload): the handler installed by an earlier call is replaced.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use one of {', '.join(LOG_FORMATS)})")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StagedoorHandler):
            root.removeHandler(handler)
    handler = _StagedoorHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContext())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    quiet = max(logging.WARNING, root.level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


# -- access records ------------------------------------------------------------------------------
def redact_target(target: str, keys: Iterable[str]) -> str:
    """The request target with the value of every query parameter named in ``keys`` replaced.

    Names are compared case-insensitively after percent-decoding (``%74oken`` is ``token``), and
    a parameter without ``=`` keeps no value to leak. The path itself is left as sent.
    """
    path, sep, query = target.partition("?")
    if not sep:
        return path
    wanted = keys if isinstance(keys, frozenset | set) else frozenset(keys)
    parts = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and _query_key(name) in wanted:
            parts.append(f"{name}={REDACTED}")
        else:
            parts.append(pair)
    return path + "?" + "&".join(parts)


def _query_key(name: str) -> str:
    if "%" in name or "+" in name:
        name = unquote_plus(name, errors="replace")
    return name.strip().lower()


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def format_access_record(record: Mapping[str, Any], fmt: str = "json") -> str:
    """One access-log line (without the newline). ``None`` values are left out."""
    if fmt == "json":
        return _JSON.encode({k: v for k, v in record.items() if v is not None})
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items() if v is not None)


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text
