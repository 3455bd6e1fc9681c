"""Calls that arrive while their provider is still starting, on the engine rig (task.Clock).

Against a real Asterisk the Stasis app registers seconds before the local models are loaded. A call
that arrives then is answered, hears ringback and is held until the provider is ready (at most
READY_TIMEOUT); a provider that failed for good or is not installed still sends it back unanswered.
The local provider here is the real pipeline (LocalFactory, LocalPipeline) over fake models whose
loading the test finishes (or breaks) when it chooses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.calls.fakes import channel_json, event
from tests.calls.rig import CALLER, Rig
from tests.calls.test_dead_air import frames_of, payloads
from tests.providers.local.test_pipeline import FakeLLM, FakeSTT
from twisted_agent.media.codecs import ulaw_encode
from twisted_agent.providers.base import IProviderFactory
from twisted_agent.providers.echo import EchoFactory
from twisted_agent.providers.local.interfaces import ITextToSpeech, ModelStatus, Speech
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline, LocalProvider
from twisted_agent.providers.readiness import CHECKS, UnbuiltFactory
from twisted_agent.providers.voices import ToneVoice

GREETING = "Hello, how can I help you?"


@implementer(ITextToSpeech)
class LoadingVoice:
    """A voice model still loading: :meth:`start` fires when the test calls :meth:`loaded` (or
    :meth:`broke`); then it speaks at once, in the tone voice (one burst per word)."""

    def __init__(self) -> None:
        self.voice = ToneVoice()
        self.loading: Deferred[None] = Deferred()
        self.failed = ""

    def loaded(self) -> None:
        self.loading.callback(None)

    def broke(self, why: str) -> None:
        self.failed = why
        self.loading.errback(RuntimeError(why))

    def synthesize(self, text: str, voice: str | None = None) -> Deferred[Speech]:
        return succeed(Speech(self.voice.render(text), self.voice.rate))

    def status(self) -> ModelStatus:
        if self.loading.called and not self.failed:
            return ModelStatus("tone", True, "tone voice loaded", loaded=True)
        return ModelStatus("tone", False, self.failed or "tone voice not loaded", "reinstall the voice")

    def start(self) -> Deferred[None]:
        return self.loading

    def stop(self) -> Deferred[None]:
        return succeed(None)


class Waits:
    """Every wait a call asks the factory for, and how it ended (None: ready; a Failure: cancelled)."""

    def __init__(self, factory: LocalFactory) -> None:
        self.outcomes: list[Any] = []
        self._when_ready = factory.when_ready
        factory.when_ready = self._recorded  # type: ignore[method-assign]

    def _recorded(self) -> Deferred[None]:
        wait = self._when_ready()
        self.outcomes.append("pending")
        index = len(self.outcomes) - 1

        def ended(result: Any) -> Any:
            self.outcomes[index] = result
            return result

        return wait.addBoth(ended)


def local_rig(tmp_path: Path, **env: str) -> tuple[Rig, LoadingVoice, LocalPipeline, Waits]:
    """The engine just started: its default provider, the local pipeline, is loading its models."""
    rig = Rig(tmp_path, AI_PROVIDER="local", DOWNSTREAM_MODE="stream", **env)
    voice = LoadingVoice()
    pipeline = LocalPipeline(rig.clock, rig.config, FakeSTT(), FakeLLM([]), voice)
    factory = LocalFactory(pipeline)
    rig.providers.factories["local"] = factory
    rig.providers.start()  # what the engine does at start-up: the models start loading
    assert rig.providers.starting("local") and not factory.readiness().ready
    return rig, voice, pipeline, Waits(factory)


def test_every_factory_says_whether_it_is_starting_and_when_it_is_ready(tmp_path: Path) -> None:
    rig, voice, pipeline, _ = local_rig(tmp_path)
    local = rig.providers.factories["local"]
    unbuilt = UnbuiltFactory("deepgram", CHECKS["deepgram"], rig.config)
    for factory in (local, EchoFactory(rig.clock), unbuilt):
        assert verifyObject(IProviderFactory, factory)
    for ready_at_once in (EchoFactory(rig.clock), unbuilt):
        assert not ready_at_once.readiness().starting
        assert ready_at_once.when_ready().called
    assert local.readiness().starting and local.readiness().detail == "loading the models"
    first, second = local.when_ready(), local.when_ready()
    second.cancel()  # one waiter giving up ...
    gave_up = _result(second)
    assert isinstance(gave_up, Failure) and gave_up.check(CancelledError)
    assert pipeline.started is not None
    assert not first.called and not pipeline.started.called, "... stops neither the loading nor the others"
    voice.loaded()
    assert first.called and _result(first) is None
    assert local.readiness().ready and not local.readiness().starting
    assert local.when_ready().called, "ready: nothing to wait for"


def _find(frames: list[bytes], run: list[bytes]) -> int:
    return next((i for i in range(len(frames)) if frames[i:i + len(run)] == run), -1)


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r))
    return results[0]


def test_a_call_during_start_up_is_answered_hears_ringback_then_the_greeting(tmp_path: Path) -> None:
    rig, voice, _, waits = local_rig(tmp_path)
    call = rig.answered_call()
    assert rig.ari.names()[:3] == ["get_variable", "get_variable", "answer"], "answered, not refused"
    assert "continue_in_dialplan" not in rig.ari.names()
    assert call.state == "connecting" and call.provider is None and waits.outcomes == ["pending"]
    assert rig.engine.counters["held_for_ready"] == 1 and rig.engine.counters["provider_unavailable"] == 0
    rig.clock.advance(0)
    records: list[dict[str, Any]] = _result(rig.engine.store.live_calls())
    [record] = records
    assert (record["state"], record["provider"]) == ("connecting", "local"), "the admin page: still connecting"
    before = len(rig.udp.written)
    rig.advance(3.0)  # the models take a while
    ring = frames_of(rig.engine.ringback_pcm)
    held = payloads(rig, before)
    assert held[0] == ulaw_encode(bytes(320)), "the frame of silence that starts the media"
    assert len(held) > 100 and held[1:] == ring[:len(held) - 1], "ringing all the while"

    voice.loaded()
    assert waits.outcomes == [None]
    assert isinstance(call.provider, LocalProvider) and call.conversation == [("agent", GREETING)]
    rig.advance(1.0)
    sent = payloads(rig, before)
    greeting = frames_of(ToneVoice().render(GREETING))
    start = sent.index(greeting[0])
    assert sent[1:start] == ring[:start - 1], "ringback until the greeting"
    assert sent[start:start + 40] == greeting[:40], "then the greeting, from its start"
    assert call.state == "speaking"
    assert "continue_in_dialplan" not in rig.ari.names() and rig.engine.counters["provider_failures"] == 0


def test_with_ringback_on_a_held_call_rings_once_until_the_greeting(tmp_path: Path) -> None:
    rig, voice, _, _ = local_rig(tmp_path, RINGBACK="yes")
    call = rig.answered_call()
    before = len(rig.udp.written)
    rig.advance(2.0)
    voice.loaded()
    rig.advance(1.0)
    sent = payloads(rig, before)
    ring = frames_of(rig.engine.ringback_pcm)
    start = sent.index(frames_of(ToneVoice().render(GREETING))[0])
    assert sent[1:start] == ring[:start - 1], "one ringback, not started again when the hold ends"
    assert call.comfort.utterance_id is None and call.state == "speaking"


def apology_then_dialplan(rig: Rig, call: Any, before: int) -> None:
    """What a failed held call does: the apology (in stream mode, on the media leg), then the dialplan."""
    apology = frames_of(rig.engine.apology_pcm)
    ring = frames_of(rig.engine.ringback_pcm)
    rig.advance(0.5)
    sent = payloads(rig, before)
    at = _find(sent, apology[:20])
    assert at > 1 and sent[1:at] == ring[:at - 1], "the ringback, then the apology"
    assert "continue_in_dialplan" not in rig.ari.names(), "not before the apology is heard"
    rig.advance(len(rig.engine.apology_pcm) / 16000)
    sent = payloads(rig, before)
    assert sent[at:at + len(apology)] == apology, "the whole apology"
    assert rig.ari.requests[-1] == ("continue_in_dialplan", CALLER, "operator", None, 1)
    assert call.outcome == "failed" and rig.engine.calls == {}
    assert rig.ari.bridges == {} and f"ai-media-{CALLER}" not in rig.ari.channels and rig.media.sessions == {}


def test_a_provider_not_ready_within_ready_timeout_brings_the_apology_then_the_dialplan(tmp_path: Path) -> None:
    rig, voice, pipeline, waits = local_rig(tmp_path, READY_TIMEOUT="5", FALLBACK_CONTEXT="operator")
    call = rig.answered_call()
    before = len(rig.udp.written)
    rig.advance(4.9)
    assert call.state == "connecting" and waits.outcomes == ["pending"]
    rig.advance(0.2)
    assert isinstance(waits.outcomes[0], Failure) and waits.outcomes[0].check(CancelledError), \
        "the wait gave up (READY_TIMEOUT)"
    held = payloads(rig, before)
    ring = frames_of(rig.engine.ringback_pcm)
    assert held[1:200] == ring[:199], "ringing while held"
    apology_then_dialplan(rig, call, before)
    assert "READY_TIMEOUT" in call.end_reason and rig.engine.counters["provider_failures"] == 1
    assert pipeline.started is not None and not pipeline.started.called, "the models go on loading for the next calls"
    voice.loaded()
    assert call.provider is None, "the call that gave up gets no provider"


def test_a_start_that_fails_while_the_caller_is_held_brings_the_apology(tmp_path: Path) -> None:
    rig, voice, _, _ = local_rig(tmp_path, FALLBACK_CONTEXT="operator")
    call = rig.answered_call()
    before = len(rig.udp.written)
    rig.advance(2.0)
    voice.broke("out of memory")
    assert call.provider is None and rig.engine.counters["provider_failures"] == 1, "the call failed at once"
    apology_then_dialplan(rig, call, before)
    assert "out of memory" in call.end_reason
    assert rig.engine.counters["held_for_ready"] == 1 and rig.engine.counters["provider_failures"] == 1


def test_a_caller_who_hangs_up_while_held_leaves_nothing_behind(tmp_path: Path) -> None:
    rig, voice, pipeline, waits = local_rig(tmp_path)
    call = rig.answered_call()
    rig.advance(2.0)
    assert rig.ari.bridges == {f"ai-bridge-{CALLER}": [CALLER, f"ai-media-{CALLER}"]}
    rig.ari.channels.pop(CALLER)
    rig.events.emit(event("ChannelHangupRequest", channel=channel_json(CALLER), cause=16))
    rig.advance(0.1)
    assert isinstance(waits.outcomes[0], Failure) and waits.outcomes[0].check(CancelledError), "the wait is over"
    assert call.ended.called and call.end_reason == "caller hung up"
    assert rig.ari.bridges == {} and f"ai-media-{CALLER}" not in rig.ari.channels and rig.media.sessions == {}
    assert rig.engine.calls == {} and len(rig.registry) == 0
    requests = len(rig.ari.requests)
    voice.loaded()
    rig.advance(1.0)
    assert call.provider is None and len(rig.ari.requests) == requests, "the loading's end does nothing for it"
    assert pipeline.readiness().ready, "and the models loaded all the same"


def test_draining_releases_a_held_call_to_the_dialplan_like_any_call(tmp_path: Path) -> None:
    rig, _, _, waits = local_rig(tmp_path, FALLBACK_CONTEXT="operator")
    call = rig.answered_call()
    rig.advance(1.0)
    draining = rig.registry.drain(2)
    rig.advance(1.9)
    assert not draining.called and call.state == "connecting", "held calls get DRAIN_TIMEOUT like any call"
    rig.advance(0.2)
    assert draining.called and call.ended.called
    assert waits.outcomes[0].check(CancelledError)
    assert rig.ari.requests[-1] == ("continue_in_dialplan", CALLER, "operator", None, 1)
    assert not [r for r in rig.ari.requests if r[0] == "play"], "no apology: the engine let the call go"
    assert rig.ari.bridges == {} and rig.media.sessions == {} and call.outcome == "shutdown"


def test_a_provider_that_failed_for_good_still_sends_calls_back_unanswered(tmp_path: Path) -> None:
    rig, voice, _, waits = local_rig(tmp_path, FALLBACK_CONTEXT="voicemail")
    voice.broke("model file missing")
    assert not rig.providers.starting("local")
    rig.ring()
    assert rig.ari.names() == ["get_variable", "get_variable", "continue_in_dialplan"]
    assert rig.ari.requests[-1] == ("continue_in_dialplan", CALLER, "voicemail", None, 1)
    assert rig.engine.counters["provider_unavailable"] == 1 and rig.engine.counters["held_for_ready"] == 0
    assert waits.outcomes == [] and rig.engine.calls == {}


def test_a_pipeline_the_engine_never_started_is_not_starting(tmp_path: Path) -> None:
    rig = Rig(tmp_path, AI_PROVIDER="local", DOWNSTREAM_MODE="stream")
    rig.providers.factories["local"] = LocalFactory(LocalPipeline(rig.clock, rig.config, FakeSTT(), FakeLLM([]),
                                                                  LoadingVoice()))
    assert not rig.providers.starting("local")
    rig.ring()
    assert rig.ari.names() == ["get_variable", "get_variable", "continue_in_dialplan"]
    assert rig.engine.counters["held_for_ready"] == 0


def test_with_ready_timeout_0_a_call_during_start_up_is_refused_as_before(tmp_path: Path) -> None:
    rig, _, _, waits = local_rig(tmp_path, READY_TIMEOUT="0", FALLBACK_CONTEXT="voicemail")
    rig.ring()
    assert rig.ari.names() == ["get_variable", "get_variable", "continue_in_dialplan"]
    assert rig.engine.counters["provider_unavailable"] == 1 and rig.engine.counters["held_for_ready"] == 0
    assert waits.outcomes == [] and rig.engine.calls == {}
