"""TurnClock on task.Clock: the marks of a turn and the timings recorded from them, once per answered turn."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.timing import TurnClock, TurnTiming


def make() -> tuple[Clock, TurnClock, list[TurnTiming]]:
    clock = Clock()
    recorded: list[TurnTiming] = []
    clock.advance(100)
    return clock, TurnClock(clock, recorded.append), recorded


def test_a_turn_is_timed_from_the_callers_last_word_to_the_first_word_of_the_answer() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(99.5)  # the caller's voice stopped 500 ms before the turn end (now)
    turns.answer_awaited()
    assert turns.since_speech_end() == 0.5
    clock.advance(0.3)
    turns.provider_stage("llm_first_token", 180.0)
    turns.reply_audio()
    clock.advance(0.05)
    turns.reply_audio()  # a second chunk of the answer: the first one counts
    clock.advance(0.15)
    turns.heard()
    assert recorded == [{"provider_llm_first_token_ms": 180.0, "turn_end_wait_ms": 500.0,
                         "voice_to_voice_ms": 1000.0, "after_turn_end_ms": 500.0}]
    assert turns.timings == recorded
    assert turns.marks["reply_audio"] == 100.3 and not turns.awaiting_reply


def test_the_filler_is_timed_from_the_callers_last_word() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(None)  # unknown: the turn end itself
    turns.answer_awaited()
    clock.advance(1.2)
    turns.filler()
    clock.advance(0.8)
    turns.heard()
    assert recorded[0]["filler_ms"] == 1200.0 and recorded[0]["voice_to_voice_ms"] == 2000.0
    assert recorded[0]["turn_end_wait_ms"] == 0.0


def test_only_the_first_audio_of_an_awaited_answer_records_and_only_once() -> None:
    clock, turns, recorded = make()
    turns.heard()  # the greeting: no turn yet
    turns.reply_audio()
    assert recorded == [] and turns.marks == {}
    turns.turn_ended(99.0)
    turns.heard()  # audio before the provider was asked (not awaited): not this turn's answer
    assert recorded == []
    turns.answer_awaited()
    turns.heard()
    clock.advance(1)
    turns.heard()  # the rest of the answer
    assert len(recorded) == 1 and len(turns.timings) == 1


def test_a_dropped_answer_records_nothing() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(99.8)
    turns.answer_awaited()
    clock.advance(0.4)
    turns.answer_dropped()  # the caller went on speaking
    turns.reply_audio()
    turns.heard()
    assert recorded == [] and "reply_audio" not in turns.marks
    assert abs(turns.since_speech_end() - 0.6) < 1e-9


def test_the_wait_for_the_shared_models_is_the_queue_stage() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(99.5)
    turns.answer_awaited()
    clock.advance(2.5)  # behind other calls' turns
    turns.work_started()
    clock.advance(0.5)
    turns.work_started()  # said again (a late report): the first one counts
    turns.provider_stage("stt", 200.0)
    clock.advance(0.5)
    turns.heard()
    assert recorded == [{"provider_stt_ms": 200.0, "turn_end_wait_ms": 500.0, "queue_ms": 2500.0,
                         "voice_to_voice_ms": 4000.0, "after_turn_end_ms": 3500.0}]


def test_work_a_speculation_started_before_the_turn_end_waited_for_nothing() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(99.5)
    turns.answer_awaited()
    turns.work_started()  # released when the turn ended, started at the pause before it
    clock.advance(0.4)
    turns.heard()
    assert recorded[0]["queue_ms"] == 0.0


def test_a_turn_that_got_the_apology_is_recorded_as_failed_with_its_reason() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(99.5)
    turns.answer_awaited()
    clock.advance(1.2)
    turns.filler()
    clock.advance(18.8)
    turns.failed("queue_timeout")
    assert recorded == [{"turn_end_wait_ms": 500.0, "filler_ms": 1700.0, "failed": "queue_timeout",
                         "failed_after_ms": 20500.0}], "no voice to voice: no answer was heard"
    assert not turns.awaiting_reply and turns.timings == recorded
    turns.heard()  # the apology, or anything after it, is not this turn's answer
    turns.failed("provider_error")
    assert len(recorded) == 1


def test_a_failure_after_the_work_started_keeps_the_stages_that_happened() -> None:
    clock, turns, recorded = make()
    turns.turn_ended(100.0)
    turns.answer_awaited()
    clock.advance(3)
    turns.work_started()
    turns.provider_stage("stt", 150.0)
    clock.advance(10)
    turns.failed("provider_timeout")
    assert recorded == [{"provider_stt_ms": 150.0, "turn_end_wait_ms": 0.0, "queue_ms": 3000.0,
                         "failed": "provider_timeout", "failed_after_ms": 13000.0}]


def test_no_turn_awaiting_an_answer_records_no_failure() -> None:
    clock, turns, recorded = make()
    turns.failed("provider_error")  # the greeting failed: no caller turn
    turns.turn_ended(99.0)
    turns.answer_awaited()
    turns.answer_dropped()  # the caller went on
    turns.failed("media_error")
    assert recorded == []
