"""What the engine tells the store: live records as a call changes, a history record when it ends,
refused calls, and the operator's hang-up (ICallControl)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import fail
from zope.interface.verify import verifyObject

from tests.calls.fakes import channel_json, event
from tests.calls.rig import CALLER, Rig
from twisted_agent.ari.errors import ARINotFound
from twisted_agent.calls.record import OUTCOMES
from twisted_agent.web.interfaces import ICallControl


def stored(rig: Rig, call_id: str = CALLER):
    return rig.engine.store.get_call(call_id).result


def history(rig: Rig):
    return rig.engine.store.history().result


def live(rig: Rig):
    return rig.engine.store.live_calls().result


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, ENGINE_ID="engine-a")


def test_a_live_record_follows_the_call(rig: Rig) -> None:
    rig.ring(variables={"AI_CONTEXT": "default"})
    rig.clock.advance(0)
    record = stored(rig)
    assert record["engine_id"] == "engine-a" and record["caller_number"] == "+15551230000"
    assert (record["provider"], record["provider_source"]) == ("echo", "default")
    assert (record["context"], record["context_source"]) == ("default", "channel variable")
    assert record["started_at"] == 1000
    rig.media_up()
    call = rig.engine.calls[CALLER]
    rig.clock.advance(0)
    assert stored(rig)["state"] == "speaking"
    assert stored(rig)["transcript"] == [{"speaker": "agent", "text": call.context.greeting}]
    rig.playback_done(call)
    rig.advance(0.3)
    assert stored(rig)["state"] == "listening"
    rig.speak(600)
    rig.speak(200, loud=False)
    rig.advance(0.5)
    rig.playback_done(call)
    rig.advance(0.3)
    record = stored(rig)
    assert [t["speaker"] for t in record["transcript"]] == ["agent", "caller", "agent"]
    assert record["transcript"][-1]["text"].startswith("You spoke for")
    assert record["last_turn"]["turn_end_wait_ms"] == pytest.approx(500, abs=25)
    assert record["turns"] == [record["last_turn"]]
    assert [r["call_id"] for r in live(rig)] == [CALLER]


def test_changes_in_one_reactor_turn_are_written_once(rig: Rig) -> None:
    writes = []
    original = rig.engine.store.call_updated
    rig.engine.store.call_updated = lambda record: (writes.append(record["state"]), original(record))  # type: ignore
    call = rig.answered_call()
    rig.clock.advance(0)
    count = len(writes)
    call.transcript_append("caller", "one")
    call.transcript_append("caller", "two")
    call.transcript_append("agent", "three")
    assert len(writes) == count, "not yet: at the end of the reactor turn"
    rig.clock.advance(0)
    assert len(writes) == count + 1
    assert [t["text"] for t in stored(rig)["transcript"]][-3:] == ["one", "two", "three"]


def test_the_history_record_when_the_caller_hangs_up(rig: Rig) -> None:
    call = rig.answered_call()
    rig.playback_done(call)
    rig.advance(0.3)
    rig.speak(600)
    rig.speak(200, loud=False)
    rig.advance(0.5)
    rig.playback_done(call)
    rig.advance(2)
    rig.events.emit(event("ChannelHangupRequest", channel=channel_json(CALLER), cause=16))
    rig.ari.channels.pop(CALLER)
    rig.clock.advance(0)
    assert live(rig) == []
    record = stored(rig)
    assert record["state"] == "ended" and record["outcome"] == "completed"
    assert record["hangup_cause"] == "Normal Clearing (16)"
    assert "caller hung up" in record["end_reason"]
    assert record["duration_s"] == pytest.approx(rig.clock.seconds() - 1000)
    assert len(record["transcript"]) == 3 and len(record["turns"]) == 1
    assert record["media"]["frames_in"] > 0 and record["media"]["packets_in"] > 0
    assert rig.engine.outcomes["completed"] == 1
    assert [r["call_id"] for r in history(rig)] == [CALLER]


def test_a_failed_call_says_so_in_the_history(tmp_path: Path) -> None:
    rig = Rig(tmp_path, FAILURE_ACTION="hangup")
    call = rig.answered_call()
    rig.playback_done(call)
    rig.advance(0.3)
    call.provider.end_of_turn = lambda: fail(RuntimeError("model crashed"))
    rig.speak(400)
    rig.advance(0.6)
    rig.playback_done(call)  # the apology
    rig.clock.advance(0)
    record = stored(rig)
    assert record["outcome"] == "failed" and "model crashed" in record["end_reason"]


def test_a_full_engine_sends_the_call_to_the_overflow_context_and_records_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, MAX_CALLS="1", OVERFLOW_CONTEXT="queue-sales", OVERFLOW_EXTENSION="s",
              FALLBACK_CONTEXT="operator")
    rig.answered_call("1700000000.1")
    rig.ring("1700000000.2")
    assert rig.ari.requests[-1] == ("continue_in_dialplan", "1700000000.2", "queue-sales", "s", 1)
    assert "answer" not in [r[0] for r in rig.ari.requests if r[1:2] == ("1700000000.2",)]
    record = stored(rig, "1700000000.2")
    assert record["outcome"] == "refused" and "full" in record["end_reason"]
    assert rig.engine.outcomes["refused"] == 1
    rig.clock.advance(0)
    assert [r["call_id"] for r in live(rig)] == ["1700000000.1"]


def test_without_overflow_context_refused_calls_go_to_the_fallback(tmp_path: Path) -> None:
    rig = Rig(tmp_path, MAX_CALLS="1", FALLBACK_CONTEXT="operator")
    rig.answered_call("1700000000.1")
    rig.ring("1700000000.2")
    assert rig.ari.requests[-1] == ("continue_in_dialplan", "1700000000.2", "operator", None, 1)


def test_the_operator_hangs_up_a_call_of_this_engine(rig: Rig) -> None:
    verifyObject(ICallControl, rig.engine)
    call = rig.answered_call()
    done = rig.engine.hang_up(CALLER)
    rig.clock.advance(0)
    assert done.result is True
    assert ("hangup", CALLER) in rig.ari.requests
    assert call.state == "ended" and rig.ari.bridges == {} and rig.files() == []
    assert stored(rig)["outcome"] == "operator_hangup"


def test_the_operator_hangs_up_another_engines_call_through_ari(rig: Rig) -> None:
    rig.ari.add_caller("elsewhere.7")
    done = rig.engine.hang_up("elsewhere.7")
    assert done.result is True and ("hangup", "elsewhere.7") in rig.ari.requests
    original = rig.ari.hangup
    gone = ARINotFound(404, "DELETE", "/channels/gone.8", "Channel not found")
    rig.ari.hangup = lambda channel_id, reason="normal": fail(gone)  # type: ignore
    assert rig.engine.hang_up("gone.8").result is False
    rig.ari.hangup = original  # type: ignore[method-assign]


def test_outcomes_are_a_closed_set() -> None:
    assert len(set(OUTCOMES)) == len(OUTCOMES)
