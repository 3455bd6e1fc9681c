"""The local pipeline's greetings: synthesized once when it starts, spoken from memory by each call."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from tests.media.speech import rms_dbfs
from tests.providers.local.test_pipeline import FakeLLM, FakeSTT, FakeTTS, Sink
from tests.providers.local.test_stt import reactor
from tests.providers.local.test_tts import piper_config
from twisted_agent.config import load_config
from twisted_agent.providers.base import ProviderError
from twisted_agent.providers.local.greetings import Greeting, greetings_for
from twisted_agent.providers.local.interfaces import ITextToSpeech
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline, LocalProvider
from twisted_agent.providers.local.tts import PiperTTS

CONTEXTS = {
    "CONTEXT_DEFAULT_GREETING": "Hello there.",
    "CONTEXT_SALES_GREETING": "Welcome to sales.", "CONTEXT_SALES_VOICE": "amy",
    # the default's greeting in another language: Piper is not told the language, so it is the same audio
    "CONTEXT_NIGHT_GREETING": "Hello there.", "CONTEXT_NIGHT_LANGUAGE": "de",
    # the same text in another voice is other audio
    "CONTEXT_AMY_GREETING": "Hello there.", "CONTEXT_AMY_VOICE": "amy",
    "CONTEXT_CLOUD_GREETING": "Deepgram here.", "CONTEXT_CLOUD_PROVIDER": "deepgram",
    "CONTEXT_QUIET_GREETING": "", "CONTEXT_QUIET_PROVIDER": "local",
}
LOCAL_GREETINGS = [("Hello there.", None), ("Welcome to sales.", "amy"), ("Hello there.", "amy")]


class Heard(Sink):
    """A call in one context, keeping each event whole: the audio's bytes and rate, the utterance ids."""

    def __init__(self, config: Any, context: str, call_id: str) -> None:
        super().__init__(config)
        self.call_id, self.context_name, self.context = call_id, context, config.contexts[context]

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.log.append(("text", text, utterance_id))

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.log.append(("audio", pcm, rate, utterance_id))

    def utterance_end(self, utterance_id: str) -> None:
        self.log.append(("end", utterance_id))


def pipeline_of(**env: str) -> tuple[LocalPipeline, FakeTTS]:
    tts = FakeTTS()
    assert verifyObject(ITextToSpeech, tts)
    return LocalPipeline(Clock(), load_config(None, env), FakeSTT(), FakeLLM([]), tts), tts


def greet(pipeline: LocalPipeline, context: str = "default", call_id: str = "c1") -> tuple[LocalProvider, Heard]:
    provider = LocalFactory(pipeline).create()
    call = Heard(pipeline.config, context, call_id)
    assert provider.start(call).called
    return provider, call


def fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def greeted(text: str, pcm: bytes, call_id: str = "c1") -> list[tuple[Any, ...]]:
    """What a call is told of its greeting, in order."""
    utterance_id = f"{call_id}-1"
    return [("text", text, utterance_id), ("audio", pcm, 8000, utterance_id), ("end", utterance_id)]


def test_the_greetings_are_those_of_the_contexts_whose_calls_go_to_the_provider_each_once():
    config = load_config(None, CONTEXTS)
    local = greetings_for(config, "local")
    assert Counter((g.text, g.voice) for g in local) == Counter(LOCAL_GREETINGS)
    assert greetings_for(config, "deepgram") == [Greeting("Deepgram here.", None)]
    # echo by default: only the contexts that name the local provider go to it
    echo_default = load_config(None, {**CONTEXTS, "AI_PROVIDER": "echo", "CONTEXT_SALES_PROVIDER": "local"})
    assert greetings_for(echo_default, "local") == [Greeting("Welcome to sales.", "amy")]


def test_each_distinct_greeting_is_synthesized_once_at_start_and_never_during_calls():
    pipeline, tts = pipeline_of(**CONTEXTS)
    with capturedLogs() as logged:
        fired(pipeline.start())
    assert Counter(zip(tts.requests, tts.voices, strict=True)) == Counter(LOCAL_GREETINGS)
    assert pipeline.readiness().ready
    assert pipeline.greetings.size == len(b"Hello there." + b"amy: Welcome to sales." + b"amy: Hello there.\x00")
    assert [formatEvent(e) for e in logged if "held in memory" in formatEvent(e)] == [
        "3 greetings held in memory (0.1 KB of audio); 0 failed"]

    tts.hold = True  # from here a synthesis would never finish: what the calls hear comes from memory
    asked = len(tts.requests)
    for n, context in enumerate(["default", "sales", "night", "amy", "default", "sales"]):
        provider, call = greet(pipeline, context, f"c{n}")
        voice = call.context.voice
        said = f"{voice}: {call.context.greeting}" if voice else call.context.greeting
        pcm = said.encode() + b"\x00" * (len(said) % 2)
        assert call.log == greeted(call.context.greeting, pcm, f"c{n}"), "text, audio, end: at once, in order"
        assert provider.history.messages()[-1] == {"role": "assistant", "content": call.context.greeting}
    assert len(tts.requests) == asked, "no call asked the TTS"


def test_a_greeting_from_memory_is_what_a_synthesis_gives_every_call():
    cached, _ = pipeline_of(**CONTEXTS)
    fired(cached.start())
    first = greet(cached, "sales", "c1")[1]
    second = greet(cached, "sales", "c1")[1]
    # a pipeline that did not synthesize at start: the call synthesizes, as before
    uncached, tts = pipeline_of(**CONTEXTS)
    synthesized = greet(uncached, "sales", "c1")[1]
    assert tts.requests == ["Welcome to sales."] and tts.voices == ["amy"]
    assert first.log == second.log == synthesized.log == greeted("Welcome to sales.", b"amy: Welcome to sales.")


def test_the_pipeline_is_ready_only_once_its_greetings_are_synthesized():
    pipeline, tts = pipeline_of(**CONTEXTS)
    tts.hold = True
    starting = pipeline.start()
    released = 0
    while released < len(tts.pending):
        assert len(tts.pending) == released + 1, "one greeting at a time"
        assert not starting.called and not pipeline.readiness().ready
        with pytest.raises(ProviderError, match="not ready"):
            LocalFactory(pipeline).create()
        tts.pending[released].callback(None)
        released += 1
    assert released == 3
    assert starting.called and pipeline.readiness().ready
    _, call = greet(pipeline)
    assert call.log == greeted("Hello there.", b"Hello there.")


def test_a_greeting_that_failed_at_start_leaves_the_pipeline_ready_and_each_call_synthesizes_it():
    pipeline, tts = pipeline_of(**CONTEXTS)
    tts.failing = {"Welcome to sales."}
    with capturedLogs() as logged:
        fired(pipeline.start())
        assert pipeline.readiness().ready
        tts.failing.clear()  # the voice speaks again
        asked = len(tts.requests)
        calls = [greet(pipeline, "sales", f"c{n}")[1] for n in range(2)]
        assert greet(pipeline, "default", "c2")[1].log == greeted("Hello there.", b"Hello there.", "c2")
    assert tts.requests[asked:] == ["Welcome to sales.", "Welcome to sales."], "synthesized per call; not the others"
    for n, call in enumerate(calls):
        assert call.log == greeted("Welcome to sales.", b"amy: Welcome to sales.", f"c{n}")
    crash = "the voice crashed on 'Welcome to sales.'"
    assert [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn] == [
        f"greeting 'Welcome to sales.' (voice amy) could not be synthesized at start: {crash}; "
        "each call synthesizes it"]
    assert [formatEvent(e) for e in logged if "per call" in formatEvent(e)] == [
        f"greeting 'Welcome to sales.' (voice amy) is synthesized per call: its synthesis at start failed ({crash})"], \
        "said once, not for every call"


def test_a_greeting_not_synthesized_at_start_is_synthesized_per_call_and_the_log_says_why_once():
    pipeline, tts = pipeline_of(**CONTEXTS)
    fired(pipeline.start())
    asked = len(tts.requests)
    with capturedLogs() as logged:
        # a call sent to the local provider with AI_PROVIDER, in a context that names Deepgram
        calls = [greet(pipeline, "cloud", f"c{n}")[1] for n in range(2)]
    assert tts.requests[asked:] == ["Deepgram here.", "Deepgram here."]
    assert [call.log for call in calls] == [greeted("Deepgram here.", b"Deepgram here.", f"c{n}") for n in range(2)]
    assert [formatEvent(e) for e in logged] == [
        "greeting 'Deepgram here.' (voice default) is synthesized per call: no context whose calls go to the local "
        "provider by default has it (AI_PROVIDER chose it)"]


def test_no_greeting_is_synthesized_when_the_models_did_not_load():
    pipeline, tts = pipeline_of(**CONTEXTS)
    pipeline.stt.start = lambda: fail(RuntimeError("no Whisper model"))  # type: ignore[method-assign]
    fired(pipeline.start())
    assert tts.requests == [] and pipeline.start_error == "no Whisper model"
    # the model is there after all (the fake's status says so): its calls synthesize the greeting
    with capturedLogs() as logged:
        assert greet(pipeline)[1].log == greeted("Hello there.", b"Hello there.")
    assert tts.requests == ["Hello there."]
    assert [formatEvent(e) for e in logged] == [
        "greeting 'Hello there.' (voice default) is synthesized per call: no greetings were synthesized at start "
        "(the pipeline had not started, or its models failed to load)"]


@pytest_twisted.ensureDeferred
async def test_piper_synthesizes_the_greeting_at_start_and_calls_play_it_from_memory() -> None:
    tts = PiperTTS(reactor(), piper_config())
    config = load_config(None, {"CONTEXT_DEFAULT_GREETING": "Hello, how can I help you?"})
    pipeline = LocalPipeline(reactor(), config, FakeSTT(), FakeLLM([]), tts)
    try:
        await pipeline.start()
        assert pipeline.readiness().ready and tts.spoken == 1
        calls = [greet(pipeline)[1] for _ in range(2)]
    finally:
        await pipeline.stop()
    assert tts.spoken == 1, "the calls did not ask Piper"
    assert calls[0].log == calls[1].log
    [(_, text, _), (_, pcm, rate, _), (_, _)] = calls[0].log
    assert text == "Hello, how can I help you?" and rate == 8000
    assert 1.0 < len(pcm) / 2 / rate < 3.0 and rms_dbfs(pcm) > -30, "a second or two of speech"
    assert pipeline.greetings.size == len(pcm) < 300_000
