from __future__ import annotations

import io
import json
from typing import cast

from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from twisted_agent import logging as agent_logging


def emit(observer, level=LogLevel.info, fmt="call {call_id} answered", **fields):
    log = Logger(namespace="twisted_agent.calls", observer=cast(ILogObserver, observer))
    log.emit(level, fmt, **fields)


def test_event_becomes_one_json_line_with_fields():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="info")
    emit(observer, call_id="1700000000.42", channel_id="PJSIP/100-0001", cause=16)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "call 1700000000.42 answered"
    assert record["level"] == "info"
    assert record["namespace"] == "twisted_agent.calls"
    assert (record["call_id"], record["channel_id"], record["cause"]) == ("1700000000.42", "PJSIP/100-0001", 16)
    assert record["time"].endswith("+00:00")
    assert not any(key.startswith("log_") for key in record)


def test_level_filter():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="warn")
    emit(observer, LogLevel.info, call_id="x")
    emit(observer, LogLevel.debug, call_id="x")
    emit(observer, LogLevel.error, "ARI request failed: {error}", error="boom")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["level"] for r in records] == ["error"]


def test_failures_carry_the_traceback():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="info")
    log = Logger(namespace="t", observer=cast(ILogObserver, observer))
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("provider crashed for call {call_id}", Failure(), call_id="c9")
    record = json.loads(stream.getvalue())
    assert record["level"] == "critical" and record["call_id"] == "c9"
    assert "ZeroDivisionError" in record["traceback"] and record["error"] == "division by zero"


def test_unserialisable_fields_do_not_break_logging():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="info")
    emit(observer, fmt="odd {thing}", thing=object(), nested={"a": (1, object())})
    record = json.loads(stream.getvalue())
    assert record["thing"].startswith("<object object")
    assert record["nested"]["a"][0] == 1


def test_bad_level_falls_back_to_info(monkeypatch):
    monkeypatch.setattr(agent_logging, "configured_level", None)
    monkeypatch.setenv("LOG_LEVEL", "shouting")
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream)
    emit(observer, LogLevel.debug, call_id="x")
    emit(observer, LogLevel.info, call_id="y")
    assert len(stream.getvalue().splitlines()) == 1


def test_legacy_print_style_events():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="info")
    observer({"message": ("hello", "world"), "log_level": LogLevel.info, "log_time": 0.0, "isError": 0})
    assert json.loads(stream.getvalue())["message"] == "hello world"
