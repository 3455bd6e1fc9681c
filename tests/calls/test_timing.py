"""TurnClock on task.Clock: the marks of a turn and the timings recorded from them, once per answered turn."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.timing import TurnClock


def make() -> tuple[Clock, TurnClock, list[dict[str, float]]]:
    clock = Clock()
    recorded: list[dict[str, float]] = []
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
