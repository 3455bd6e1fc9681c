"""Structured logging: a JSON-lines observer for journald.

Select it with ``twistd --logger twisted_agent.logging.json_observer ai-agent ...`` or with
``LOG_FORMAT=json``. Each event becomes one line of JSON: time, level, namespace, the formatted
message, and the event's own fields (``call_id``, ``channel_id``, ...), so journald and log
shippers can filter on them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    PredicateResult,
    formatEvent,
)
from zope.interface import implementer

LEVEL_ENV = "LOG_LEVEL"

#: the validated LOG_LEVEL, set by ``twistd ai-agent`` option parsing before logging starts
configured_level: str | None = None

_SKIP = {"format", "message", "time", "system", "isError", "printed", "why", "failure"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def event_as_json(event: dict[str, Any]) -> str:
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event) if event.get("log_format") is not None else " ".join(
            str(m) for m in event.get("message", ())),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=repr)


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = event_as_json(event)
        except Exception as e:  # a log line must never take the engine down
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def json_observer(stream: IO[str] | None = None, level: str | None = None) -> Callable[[dict[str, Any]], None]:
    """Observer factory for ``twistd --logger``: JSON lines on stdout, filtered at ``LOG_LEVEL``."""
    name = (level or configured_level or os.environ.get(LEVEL_ENV) or "info").strip().lower()
    try:
        chosen = LogLevel.levelWithName(name)
    except InvalidLogLevelError:
        chosen = LogLevel.info  # the configuration check reports the bad value by name
    return FilteringLogObserver(JSONLinesObserver(stream or sys.stdout), [_AtLeast(chosen)])


@implementer(ILogFilterPredicate)
class _AtLeast:
    """Drop events below a level. Unlike LogLevelFilterPredicate, keep events without a namespace
    (stdout/stderr captured by twistd and some legacy events have none): losing them hides errors."""

    def __init__(self, level: Any) -> None:
        self._level = level

    def __call__(self, event: dict[str, Any]) -> Any:
        level = event.get("log_level")
        if level is not None and level < self._level:
            return PredicateResult.no
        return PredicateResult.maybe
