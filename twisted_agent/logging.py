"""Logging: the text and JSON-lines observers ``twistd ai-agent`` installs, both filtered at ``LOG_LEVEL``.

``LOG_FORMAT=text`` (the default) installs :func:`text_observer`: twistd's usual text lines, written
where twistd itself writes them (stdout under ``twistd -n``, else ``--logfile``). ``LOG_FORMAT=json``
installs :func:`json_observer` (or select it with ``twistd --logger
twisted_agent.logging.json_observer ai-agent ...``). Each event becomes one line of JSON: time,
level, namespace, the formatted message, and the event's own fields (``call_id``, ``channel_id``,
...), so journald and log shippers can filter on them.

Both observers log Twisted's per-connection chatter at debug (see :func:`is_twisted_chatter`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    InvalidLogLevelError,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

LEVEL_ENV = "LOG_LEVEL"

#: the validated LOG_LEVEL, set by ``twistd ai-agent`` option parsing before logging starts
configured_level: str | None = None

#: twistd's own logging options (``--logfile``, ``--nodaemon``, ``--syslog``, ``--prefix``), recorded by
#: ``twistd ai-agent`` option parsing so that :func:`text_observer` writes where twistd would
twistd_options: Mapping[str, Any] = {}

#: Twisted's per-connection chatter, logged at info on every connection and every retry:
#: ``Factory.doStart``/``doStop`` (twisted.internet.protocol, for any factory whose ``noisy`` is true,
#: such as Autobahn's and treq's) and ``ClientService`` scheduling its next attempt (whose endpoint
#: is a repr with a memory address). Our reconnecting clients log an outage once, with what to fix.
TWISTED_CHATTER_FORMATS = frozenset({
    "Starting factory {factory!r}",
    "Stopping factory {factory!r}",
    "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
})
#: the same factory messages as legacy ``log.msg("Starting factory %r" % factory)`` events (older Twisted)
_LEGACY_CHATTER_PREFIXES = ("Starting factory ", "Stopping factory ")

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


def json_observer(stream: IO[str] | None = None, level: str | None = None) -> ILogObserver:
    """Observer factory for ``twistd --logger``: JSON lines on stdout, filtered at ``LOG_LEVEL``."""
    return _filtered(JSONLinesObserver(stream or sys.stdout), level)


def text_observer(stream: IO[str] | None = None, level: str | None = None) -> ILogObserver:
    """Observer factory for ``twistd --logger`` (``LOG_FORMAT=text``): twistd's usual text lines,
    filtered at ``LOG_LEVEL``, on ``stream`` or else where twistd itself would write them."""
    return _filtered(textFileLogObserver(stream) if stream is not None else _twistd_destination(), level)


def _twistd_destination() -> ILogObserver:
    """twistd's own text observer for the recorded options: stdout under ``-n`` (or ``--logfile -``),
    else the ``--logfile`` (default twistd.log) with its rotation and SIGUSR1 handling, or syslog.

    Built by twistd's own logger class, so it cannot drift from what ``twistd`` does without
    ``--logger``; without recorded options (not started as ``twistd ai-agent``) it is stdout.
    """
    from twisted.scripts.twistd import _SomeApplicationRunner

    options = dict(twistd_options) if twistd_options else {"nodaemon": True}
    observer = _SomeApplicationRunner.loggerFactory(options)._getLogObserver()
    if ILogObserver.providedBy(observer):
        return observer
    return LegacyLogObserverWrapper(observer)  # syslog's observer is a legacy one


def _filtered(observer: ILogObserver, level: str | None) -> ILogObserver:
    name = (level or configured_level or os.environ.get(LEVEL_ENV) or "info").strip().lower()
    try:
        chosen = LogLevel.levelWithName(name)
    except InvalidLogLevelError:
        chosen = LogLevel.info  # the configuration check reports the bad value by name
    return ChatterAsDebug(FilteringLogObserver(observer, [_AtLeast(chosen)]))


def is_twisted_chatter(event: LogEvent) -> bool:
    """True for one of Twisted's per-connection info messages (:data:`TWISTED_CHATTER_FORMATS`)."""
    if event.get("log_level", LogLevel.info) != LogLevel.info:
        return False  # never hide anything Twisted itself thought worse than info
    log_format = event.get("log_format")
    if log_format in TWISTED_CHATTER_FORMATS:
        return True
    message = event.get("message")
    if isinstance(message, tuple) and len(message) == 1 and isinstance(message[0], str) and not event.get("isError"):
        return message[0].startswith(_LEGACY_CHATTER_PREFIXES)
    return False


@implementer(ILogObserver)
class ChatterAsDebug:
    """Passes events on, with Twisted's per-connection chatter (:func:`is_twisted_chatter`) at debug."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        if is_twisted_chatter(event):
            event = {**event, "log_level": LogLevel.debug}  # a copy: other observers see the event as it was
        self._observer(event)


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
