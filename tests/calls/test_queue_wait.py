"""A turn whose work waits for the shared models: QUEUE_TIMEOUT bounds the wait, PROVIDER_TIMEOUT the work.

The engine rig (task.Clock, stream mode) with the real local provider over the fake models of
tests/providers/local/test_pipeline.py: the fake Whisper keeps the turn's transcription in its
queue until the test frees a worker, as WorkerPool does while other calls' turns hold it. What is
asserted is what the caller hears (the filler, the answer or the apology on the wire), what Asterisk
is asked, and what the timings and /metrics say about the turn.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.calls.rig import CALLER, Rig
from tests.calls.test_dead_air import frames_of, payloads, quiet_caller_turn, stream_rig
from tests.providers.local.test_pipeline import FakeLLM, FakeSTT, FakeTTS
from twisted_agent.calls.comfort import filler_phrase
from twisted_agent.metrics import EngineMetrics
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline

QUESTION = "When do you open?"
ANSWER = "We open at nine."


def local_rig(tmp_path: Path, **env: str) -> tuple[Rig, Any, FakeSTT, FakeLLM]:
    """A call on the local provider, its turn about to start; PROVIDER_TIMEOUT 2 s, QUEUE_TIMEOUT 6 s."""
    settings = {"DOWNSTREAM_MODE": "stream", "CONTEXT_DEFAULT_GREETING": "", "SPECULATE": "false",
                "PROVIDER_TIMEOUT": "2", "QUEUE_TIMEOUT": "6", **env}
    rig = Rig(tmp_path, **settings)
    stt, llm = FakeSTT(QUESTION), FakeLLM([ANSWER])
    pipeline = LocalPipeline(rig.clock, rig.config, stt, llm, FakeTTS())
    pipeline.start()
    rig.providers.factories["local"] = LocalFactory(pipeline)
    call = rig.answered_call(variables={"AI_PROVIDER": "local"})
    rig.advance(0.1)
    assert call.provider_name == "local" and call.state == "listening"
    return rig, call, stt, llm


def contains(sent: list[bytes], clip: list[bytes]) -> bool:
    return any(sent[i:i + len(clip)] == clip for i in range(len(sent) - len(clip) + 1))


def apology(rig: Rig) -> list[bytes]:
    return frames_of(rig.engine.apology_pcm)


def answer(stt: FakeSTT, llm: FakeLLM) -> None:
    """The transcription the worker ran is done; the model writes the answer."""
    assert stt.pending is not None
    stt.pending.callback(None)
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback(ANSWER)


def test_a_turn_queued_longer_than_provider_timeout_is_answered_not_apologised_for(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path)
    stt.queued = True  # other calls' turns hold the Whisper worker
    before = len(rig.udp.written)
    quiet_caller_turn(rig)
    assert call.state == "thinking" and stt.waiting, "the transcription waits in the queue"
    turn_end = call.turn_clock.marks["turn_end"]
    rig.advance(5)  # two and a half times PROVIDER_TIMEOUT, all of it in the queue
    assert call.state == "thinking" and len(call.fillers) == 1, "the filler covers the wait"
    stt.worker_free()
    started = rig.clock.seconds()
    rig.advance(1.5)  # the work itself, within PROVIDER_TIMEOUT of its start (6.5 s after the turn end)
    answer(stt, llm)
    rig.advance(3)
    sent = payloads(rig, before)
    assert contains(sent, frames_of(filler_phrase())[:10]) and contains(sent, frames_of(ANSWER.encode()))
    assert not contains(sent, apology(rig)[:25]), "no apology"
    assert call.conversation[-2:] == [("caller", QUESTION), ("agent", ANSWER)]
    assert call.state == "listening" and "continue_in_dialplan" not in rig.ari.names()
    timing = call.turn_timings[-1]
    assert "failed" not in timing
    assert timing["queue_ms"] == pytest.approx((started - turn_end) * 1000, abs=0.1)
    assert timing["voice_to_voice_ms"] > timing["queue_ms"]


def test_a_wait_in_the_queue_past_queue_timeout_gets_the_apology(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path)
    recorded: list[dict[str, Any]] = []
    rig.engine.turn_listeners.append(lambda _, timing: recorded.append(dict(timing)))
    stt.queued = True
    before = len(rig.udp.written)
    quiet_caller_turn(rig)
    marks = dict(call.turn_clock.marks)
    rig.advance(marks["turn_end"] + 6 - rig.clock.seconds() - 0.04)
    assert call.state == "thinking" and recorded == [] and not contains(payloads(rig, before), apology(rig)[:25])
    rig.advance(0.06)
    assert stt.waiting == [], "the turn's transcription left the queue: nobody waits for it any more"
    assert recorded == [{"turn_end_wait_ms": pytest.approx(500, abs=25), "filler_ms": pytest.approx(1200, abs=25),
                         "failed": "queue_timeout",
                         "failed_after_ms": pytest.approx((marks["turn_end"] + 6 - marks["speech_end"]) * 1000,
                                                          abs=25)}]
    assert call.turn_timings == recorded, "the call's record (the admin UI's history) has the failed turn"
    rig.advance(len(rig.engine.apology_pcm) / 16000 + 0.5)
    assert contains(payloads(rig, before), apology(rig)), "the caller heard the apology"
    assert ("continue_in_dialplan", CALLER, None, None, None) in rig.ari.requests, "then FAILURE_ACTION"
    assert call.state == "ended" and call.outcome == "failed" and "QUEUE_TIMEOUT" in call.end_reason
    assert llm.reply is None, "the model never started on it"


def test_work_that_started_and_runs_past_provider_timeout_gets_the_apology(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path)
    stt.queued = True
    quiet_caller_turn(rig)
    turn_end = call.turn_clock.marks["turn_end"]
    rig.advance(3)  # in the queue
    stt.worker_free()
    started = rig.clock.seconds()
    assert stt.pending is not None
    stt.pending.callback(None)  # transcribed: the model is asked and never writes a word
    assert llm.reply is not None
    rig.advance(2 - 0.04)
    assert call.state == "thinking" and not call.turn_timings
    rig.advance(0.06)
    assert llm.cancelled, "the apology stops the model"
    timing = call.turn_timings[-1]
    assert timing["failed"] == "provider_timeout"
    assert timing["queue_ms"] == pytest.approx((started - turn_end) * 1000, abs=0.1)
    assert "voice_to_voice_ms" not in timing and "provider_stt_ms" in timing
    rig.advance(len(rig.engine.apology_pcm) / 16000 + 0.5)
    assert call.state == "ended" and "PROVIDER_TIMEOUT" in call.end_reason
    assert ("continue_in_dialplan", CALLER, None, None, None) in rig.ari.requests


def test_adopted_speculative_work_counts_from_the_turn_end(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path, SPECULATE="true")
    quiet_caller_turn(rig)  # transcription ran at the caller's pause; the model writes nothing
    assert llm.reply is not None and call.state == "thinking"
    turn_end = call.turn_clock.marks["turn_end"]
    rig.advance(turn_end + 2 - rig.clock.seconds() + 0.04)
    timing = call.turn_timings[-1]
    assert timing["failed"] == "provider_timeout", "PROVIDER_TIMEOUT, from the adoption at the turn end"
    assert timing["queue_ms"] == 0.0


def test_a_provider_that_fails_the_turn_is_recorded_as_an_error(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path)
    stt.hold = True
    quiet_caller_turn(rig)
    assert stt.pending is not None
    stt.pending.errback(RuntimeError("a whisper worker process died"))
    timing = call.turn_timings[-1]
    assert timing["failed"] == "provider_error" and timing["queue_ms"] == 0.0


def test_a_provider_that_queues_nothing_starts_at_once_and_has_provider_timeout_only(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, PROVIDER_TIMEOUT="2", QUEUE_TIMEOUT="20")
    call.provider.think_ms = 3000  # the echo provider thinks longer than PROVIDER_TIMEOUT allows
    quiet_caller_turn(rig)
    turn_end = call.turn_clock.marks["turn_end"]
    rig.advance(turn_end + 2 - rig.clock.seconds() + 0.04)
    timing = call.turn_timings[-1]
    assert (timing["failed"], timing["queue_ms"]) == ("provider_timeout", 0.0)


def test_metrics_count_failed_turns_by_reason_and_the_queue_wait(tmp_path: Path) -> None:
    rig, call, stt, llm = local_rig(tmp_path)
    metrics = EngineMetrics(SimpleNamespace(
        engine=rig.engine, media=rig.media, store=rig.engine.store,
        ari=SimpleNamespace(connected=True, events=SimpleNamespace(reconnects=0))))
    text = metrics.exposition()[1].decode()
    assert "# HELP ai_agent_turns_failed_total Turns that ended in the apology instead of an answer" in text
    assert "# HELP ai_agent_turn_queue_wait_seconds Per turn whose work started" in text
    assert 'ai_agent_turns_failed_total{reason="queue_timeout"} 0.0' in text, "every reason exists from the start"

    stt.queued = True
    quiet_caller_turn(rig)
    rig.advance(4)  # answered after 4 s in the queue
    stt.worker_free()
    answer(stt, llm)
    rig.advance(3)
    stt.queued = True
    quiet_caller_turn(rig)
    rig.advance(7)  # never started: QUEUE_TIMEOUT
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition()[1].decode()) for s in family.samples}
    assert samples[("ai_agent_turns_failed_total", (("reason", "queue_timeout"),))] == 1
    assert samples[("ai_agent_turns_failed_total", (("reason", "provider_timeout"),))] == 0
    assert samples[("ai_agent_stage_latency_seconds_count", (("stage", "voice_to_voice"),))] == 1, \
        "the answered turn; the failed one is counted beside it"
    assert samples[("ai_agent_stage_latency_seconds_count", (("stage", "turn_end_wait"),))] == 2
    assert samples[("ai_agent_turn_queue_wait_seconds_count", ())] == 1, "only the turn whose work started"
    assert samples[("ai_agent_turn_queue_wait_seconds_sum", ())] == pytest.approx(4.0, abs=0.05)
    assert samples[("ai_agent_turn_queue_wait_seconds_bucket", (("le", "3.0"),))] == 0
    assert samples[("ai_agent_turn_queue_wait_seconds_bucket", (("le", "5.0"),))] == 1
