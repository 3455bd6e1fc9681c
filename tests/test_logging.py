from __future__ import annotations

import io
import json
from typing import cast

import pytest
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

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
    log = Logger(namespace="t", observer=observer)
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


# --- the text observer: LOG_LEVEL filters twistd's text lines too -----------------------------------


def text_lines(observer_level, *events):
    stream = io.StringIO()
    observer = agent_logging.text_observer(stream, level=observer_level)
    for level, fmt, fields in events:
        emit(observer, level, fmt, **fields)
    return stream.getvalue().splitlines()


def test_text_log_at_info_drops_debug_and_keeps_info():
    lines = text_lines("info", (LogLevel.debug, "frame {n} of call {call_id}", {"n": 7, "call_id": "c1"}),
                       (LogLevel.info, "call {call_id} answered", {"call_id": "c1"}))
    assert len(lines) == 1
    assert lines[0].endswith("[twisted_agent.calls#info] call c1 answered")


def test_text_log_at_debug_keeps_both():
    lines = text_lines("debug", (LogLevel.debug, "frame {n} of call {call_id}", {"n": 7, "call_id": "c1"}),
                       (LogLevel.info, "call {call_id} answered", {"call_id": "c1"}))
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[twisted_agent.calls#debug] frame 7 of call c1", "[twisted_agent.calls#info] call c1 answered"]


def test_text_log_takes_the_configured_level(monkeypatch):
    monkeypatch.setattr(agent_logging, "configured_level", "warn")
    stream = io.StringIO()
    observer = agent_logging.text_observer(stream)
    emit(observer, LogLevel.info, call_id="x")
    emit(observer, LogLevel.warn, "ARI events: cannot connect to {url}", url="ws://pbx")
    assert stream.getvalue().count("\n") == 1 and "#warn] ARI events: cannot connect to ws://pbx" in stream.getvalue()


def test_text_log_keeps_events_without_a_level():
    # what twistd captures from print() and stderr, and some legacy events: losing them hides errors
    stream = io.StringIO()
    observer = agent_logging.text_observer(stream, level="error")
    observer({"log_format": "{log_text}", "log_text": "printed by a library", "log_time": 0.0})
    assert "printed by a library" in stream.getvalue()


# --- Twisted's per-connection chatter is debug -----------------------------------------------------


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    def connect(self, factory):
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        return fail(ConnectionRefusedError("127.0.0.1:1"))


def chatter_through(observer):
    """Twisted's own code emitting its chatter to the global log publisher, as in the running agent:
    a ClientService retrying a refusing endpoint, a noisy factory started and stopped (as each
    connection attempt does) and the legacy ``log.msg`` form of the factory messages."""
    from twisted.application.internet import ClientService
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy_log

    factory = Factory.forProtocol(Protocol)
    assert factory.noisy
    clock = Clock()
    service = ClientService(RefusingEndpoint(), factory, retryPolicy=lambda attempt: 1.0, clock=clock)
    globalLogPublisher.addObserver(observer)
    try:
        service.startService()
        clock.advance(1.0)
        factory.doStart()
        factory.doStop()
        legacy_log.msg(f"Starting factory {factory!r}")
        legacy_log.msg(f"Stopping factory {factory!r}")
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)


CHATTER = ("Scheduling retry", "Starting factory", "Stopping factory")


@pytest.mark.parametrize("factory", [agent_logging.text_observer, agent_logging.json_observer])
def test_twisted_chatter_is_not_logged_at_info(factory):
    stream = io.StringIO()
    chatter_through(factory(stream, level="info"))
    assert not any(phrase in stream.getvalue() for phrase in CHATTER), stream.getvalue()


def test_twisted_chatter_is_logged_at_debug():
    stream = io.StringIO()
    chatter_through(agent_logging.text_observer(stream, level="debug"))
    lines = [line for line in stream.getvalue().splitlines() if any(phrase in line for phrase in CHATTER)]
    assert [phrase for line in lines for phrase in CHATTER if phrase in line] == [
        "Scheduling retry", "Scheduling retry", "Starting factory", "Stopping factory",
        "Starting factory", "Stopping factory"], lines
    # a legacy event's text line shows its system ("[-]"), not its level: the JSON records below show it
    assert all("#debug]" in line for line in lines[:4]) and all(" [-] " in line for line in lines[4:]), lines
    stream = io.StringIO()
    chatter_through(agent_logging.json_observer(stream, level="debug"))
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {r["level"] for r in records if any(p in r["message"] for p in CHATTER)} == {"debug"}


def test_only_the_chatter_is_demoted():
    stream = io.StringIO()
    observer = agent_logging.json_observer(stream, level="info")
    emit(observer, LogLevel.info, "Starting factory for call {call_id}", call_id="c1")  # our own words
    emit(observer, LogLevel.error, "Starting factory {factory!r}", factory="f")  # worse than info: kept
    observer({"message": ("Starting factory <f>",), "isError": 1, "log_level": LogLevel.critical, "log_time": 0.0})
    assert [json.loads(line)["level"] for line in stream.getvalue().splitlines()] == ["info", "error", "critical"]


def test_the_demoted_event_is_a_copy():
    seen: list[dict[str, object]] = []
    observer = agent_logging.ChatterAsDebug(cast(ILogObserver, seen.append))
    event = {"log_format": "Starting factory {factory!r}", "factory": "f", "log_level": LogLevel.info}
    observer(event)
    assert seen[0]["log_level"] == LogLevel.debug and event["log_level"] == LogLevel.info


# --- where the text log goes: where twistd would write it --------------------------------------------


def test_text_log_goes_to_stdout_under_nodaemon(monkeypatch, capsys):
    monkeypatch.setattr(agent_logging, "twistd_options", {"nodaemon": 1, "logfile": None})
    emit(agent_logging.text_observer(level="info"), LogLevel.info, call_id="c2")
    assert "call c2 answered" in capsys.readouterr().out


def test_text_log_goes_to_the_logfile(monkeypatch, tmp_path, capsys):
    import signal

    path = tmp_path / "agent.log"
    monkeypatch.setattr(agent_logging, "twistd_options", {"nodaemon": 1, "logfile": str(path)})
    before = signal.getsignal(signal.SIGUSR1)
    try:
        observer = agent_logging.text_observer(level="info")
        emit(observer, LogLevel.debug, "frame of call {call_id}", call_id="c3")
        emit(observer, LogLevel.info, call_id="c3")
    finally:
        signal.signal(signal.SIGUSR1, before)  # twistd's log file rotates on SIGUSR1
    assert capsys.readouterr().out == ""
    text = path.read_text()
    assert "call c3 answered" in text and "frame of call" not in text
