"""The Deepgram Voice Agent provider against the fake Deepgram, over real loopback WebSockets."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol, ServerFactory
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.calls.simstack import sleep, until
from tests.helpers import free_port
from tests.providers.deepgram_support import CallInfo, Sink, config, silence_frames, tone_frames
from twisted_agent.config import AgentConfig, ContextConfig
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.providers.base import IProvider, IProviderEvents, IProviderFactory, ProviderError
from twisted_agent.providers.cloud import ICloudListener, connect
from twisted_agent.providers.deepgram import DeepgramFactory, DeepgramProvider
from twisted_agent.providers.voices import ToneVoice
from twisted_agent.sim.deepgram import FakeDeepgram

LONG = " ".join(["word"] * 12)  # 1.9 s of agent audio, streamed in about 0.6 s


class Rig:
    def __init__(self, fake: FakeDeepgram) -> None:
        self.fake = fake
        self.providers: list[DeepgramProvider] = []

    def provider(self, cfg: AgentConfig | None = None, **options: Any) -> DeepgramProvider:
        provider = DeepgramProvider(reactor, cfg or config(self.fake.url), **options)
        self.providers.append(provider)
        return provider

    async def start(self, greeting: str = "Hello there.", **options: Any) -> tuple[DeepgramProvider, Sink]:
        provider, sink = self.provider(**options), Sink()
        verifyObject(IProviderEvents, sink)
        await provider.start(CallInfo(sink, ContextConfig(greeting=greeting)))
        return provider, sink

    @property
    def session(self) -> Any:
        return self.fake.sessions[-1]


@pytest.fixture
def rig() -> Iterator[Rig]:
    fake = FakeDeepgram(reactor)
    fake.chunk_interval = 0.025  # 100 ms of audio every 25 ms: 4x real time keeps the tests short
    pytest_twisted.blockon(fake.start())
    rig = Rig(fake)
    yield rig
    for provider in rig.providers:
        pytest_twisted.blockon(provider.close())
    pytest_twisted.blockon(fake.stop())


def push(provider: DeepgramProvider, frames: list[bytes]) -> None:
    for frame in frames:
        provider.push_audio(frame)


def caller_turn(provider: DeepgramProvider) -> None:
    push(provider, tone_frames(600) + silence_frames(500))


def utterances(sink: Sink) -> list[str]:
    return [e[2] for e in sink.of("agent_text")]


def heard(text: str) -> bytes:
    """What the sink gets for ``text`` spoken by the fake: ToneVoice through μ-law and back."""
    return ulaw_decode(ulaw_encode(ToneVoice().render(text)))


async def greeted(rig: Rig, **options: Any) -> tuple[DeepgramProvider, Sink, str]:
    provider, sink = await rig.start(**options)
    await until(lambda: bool(sink.of("utterance_end")), what="the greeting to end")
    return provider, sink, utterances(sink)[0]


@pytest_twisted.ensureDeferred
async def test_start_sends_well_formed_settings_first_and_fires_after_settings_applied(rig: Rig) -> None:
    provider, sink = await rig.start()
    verifyObject(IProvider, provider)
    session = rig.session
    assert session.received[0]["type"] == "Settings"
    assert [m["type"] for m in session.sent[:2]] == ["Welcome", "SettingsApplied"]
    settings = session.settings
    assert settings["audio"] == {"input": {"encoding": "mulaw", "sample_rate": 8000},
                                 "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}}
    agent = settings["agent"]
    assert agent["listen"] == {"provider": {"type": "deepgram", "model": "nova-3"}}
    assert agent["think"]["provider"] == {"type": "open_ai", "model": "gpt-4o-mini"}
    assert agent["think"]["prompt"] == ContextConfig().system_prompt
    functions = {f["name"]: f for f in agent["think"]["functions"]}
    assert set(functions) == {"hang_up", "transfer"}
    assert all("endpoint" not in f and f["parameters"]["type"] == "object" for f in functions.values())
    assert functions["transfer"]["parameters"]["properties"]["reason"]["type"] == "string"
    assert functions["transfer"]["parameters"]["required"] == []
    assert agent["speak"] == {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}}
    assert (agent["greeting"], agent["language"]) == ("Hello there.", "en")
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_the_greeting_is_one_utterance_of_8khz_audio(rig: Rig) -> None:
    provider, sink, greeting = await greeted(rig)
    audio = sink.of("agent_audio")
    assert {(rate, uid) for _, _, rate, uid in audio} == {(8000, greeting)}
    assert len(audio) > 1, "streamed in chunks"
    assert sink.audio_of(greeting) == heard("Hello there.")
    assert ("agent_text", "Hello there.", greeting) in sink.events
    assert sink.events[-1] == ("utterance_end", greeting)
    assert sink.of("timing") == [], "the greeting's zero latencies are not timings"
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_caller_turn_gets_a_transcript_text_and_audio(rig: Rig) -> None:
    provider, sink, greeting = await greeted(rig)
    caller_turn(provider)
    await until(lambda: len(sink.of("utterance_end")) == 2, what="the reply to end")
    reply = utterances(sink)[1]
    assert reply != greeting
    assert ("transcript", "[caller turn 1]", True) in sink.events
    assert ("agent_text", "You said something.", reply) in sink.events
    assert sink.audio_of(reply) == heard("You said something.")
    assert sink.of("timing") == [("timing", "voice_to_voice_server", pytest.approx(420)),
                                 ("timing", "llm_first_token", pytest.approx(300)),
                                 ("timing", "tts_first_byte", pytest.approx(120))]
    filled = provider._audio.filled_frames  # silence for the time nothing was pushed (ContinuousAudio)
    assert rig.session.audio_bytes == (55 + filled) * 160, "every frame went up as μ-law"
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_barge_in_drops_the_rest_of_the_interrupted_utterance(rig: Rig) -> None:
    rig.fake.script = [{"say": LONG}]
    rig.fake.audio_after_barge_in = 2  # chunks the service had queued: they must not reach the caller
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: len(utterances(sink)) == 2 and len(sink.audio_of(utterances(sink)[1])) > 3200,
                what="the reply to stream")
    reply = utterances(sink)[1]
    push(provider, tone_frames(100))
    await until(lambda: bool(sink.of("user_speech_started")), what="the barge-in")
    chunks = len(sink.of("agent_audio"))
    await sleep(0.3)
    assert len(sink.of("agent_audio")) == chunks, "nothing more, for this utterance or a new one"
    forwarded = sum(len(e[1]) for e in sink.of("agent_audio")) // 2
    assert forwarded == rig.session.audio_bytes_sent - 2 * 800, "all but the two chunks after the barge-in"
    assert sink.ended(reply)
    assert len(sink.audio_of(reply)) < len(heard(LONG))
    push(provider, silence_frames(500))
    await until(lambda: len(utterances(sink)) == 3 and sink.ended(utterances(sink)[2]), what="the next reply")
    assert sink.audio_of(utterances(sink)[2]) == heard("You said something.")
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_interrupt_stops_forwarding_the_current_utterance(rig: Rig) -> None:
    rig.fake.script = [{"say": LONG}]
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: len(utterances(sink)) == 2 and sink.audio_of(utterances(sink)[1]) != b"",
                what="the reply to stream")
    reply = utterances(sink)[1]
    done = provider.interrupt({reply: 100})
    assert done.called
    chunks = len(sink.of("agent_audio"))
    await until(lambda: rig.session.sent[-1]["type"] == "AgentAudioDone", what="the fake to finish the turn")
    assert len(sink.of("agent_audio")) == chunks, "the rest of the turn is dropped"
    assert len(sink.audio_of(reply)) < len(heard(LONG))
    assert sink.of("utterance_end")[-1] == ("utterance_end", reply)
    caller_turn(provider)
    await until(lambda: len(sink.of("utterance_end")) == 3, what="the next reply")
    assert sink.audio_of(utterances(sink)[2]) == heard("You said something.")
    assert rig.fake.violations == []


@pytest.mark.parametrize(("function", "arguments", "tool"), [
    ("hang_up", {}, "hangup"),
    ("transfer", {"reason": "wants a person"}, "transfer"),
])
@pytest_twisted.ensureDeferred
async def test_function_calls_become_tool_requests(rig: Rig, function: str, arguments: dict[str, Any],
                                                   tool: str) -> None:
    rig.fake.script = [{"call": function, "arguments": arguments, "say": "Goodbye."}]
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: "Goodbye." in [e[1] for e in sink.of("agent_text")], what="the follow-up")
    assert sink.of("tool_request") == [("tool_request", tool, arguments)]
    request = next(m for m in rig.session.sent if m["type"] == "FunctionCallRequest")["functions"][0]
    [response] = rig.session.function_responses
    assert (response["id"], response["name"]) == (request["id"], function)
    assert json.loads(response["content"]) == {"ok": True, "detail": "done"}
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_unknown_functions_and_bad_arguments_are_answered_not_run(rig: Rig) -> None:
    rig.fake.script = [{"call": "order_pizza", "arguments": {}}, {"call": "transfer", "arguments": "{not json"}]
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: len(rig.session.function_responses) == 1, what="the first answer")
    caller_turn(provider)
    await until(lambda: len(rig.session.function_responses) == 2, what="the second answer")
    contents = [json.loads(r["content"]) for r in rig.session.function_responses]
    assert "unknown function 'order_pizza'" in contents[0]["error"]
    assert contents[1]["error"].startswith("bad arguments")
    assert sink.of("tool_request") == [] and sink.of("error") == []
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_is_one_fatal_error(rig: Rig) -> None:
    rig.fake.script = [{"drop": True}]
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: bool(sink.of("error")), what="the error")
    await sleep(0.2)
    [(_, message, fatal)] = sink.of("error")
    assert fatal and "connection to Deepgram was lost" in message
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_an_error_from_the_server_is_one_fatal_error(rig: Rig) -> None:
    rig.fake.script = [{"error": "the think provider failed"}]
    provider, sink, _ = await greeted(rig)
    caller_turn(provider)
    await until(lambda: bool(sink.of("error")), what="the error")
    await until(lambda: rig.session.closed, what="the server to close")
    await sleep(0.1)
    assert sink.of("error") == [("error", "Deepgram error: the think provider failed (FAKE_ERROR)", True)]
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_refused_key_says_so(rig: Rig) -> None:
    provider = rig.provider(config(rig.fake.url, api_key="wrong"))
    with pytest.raises(ProviderError, match=r"Deepgram refused the API key \(DEEPGRAM_API_KEY\).*401"):
        await provider.start(CallInfo(Sink()))
    assert (rig.fake.refused, rig.fake.sessions) == (1, [])


class NeverUpgrades(ServerFactory):
    protocol = Protocol


@pytest_twisted.ensureDeferred
async def test_nothing_listening_or_no_answer_fails_the_start() -> None:
    provider = DeepgramProvider(reactor, config(f"ws://127.0.0.1:{free_port()}/v1/agent/converse"))
    with pytest.raises(ProviderError, match=r"cannot reach Deepgram at ws://127\.0\.0\.1"):
        await provider.start(CallInfo(Sink()))
    silent: Any = reactor.listenTCP(0, NeverUpgrades(), interface="127.0.0.1")
    try:
        provider = DeepgramProvider(reactor, config(f"ws://127.0.0.1:{silent.getHost().port}/", timeout=0.5))
        started = reactor.seconds()
        with pytest.raises(ProviderError, match=r"Deepgram did not answer within 0\.5s"):
            await provider.start(CallInfo(Sink()))
        assert reactor.seconds() - started < 2
    finally:
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_start_waits_for_settings_applied_within_the_timeout_and_drops_early_audio(rig: Rig) -> None:
    rig.fake.answer_settings = False
    provider = rig.provider(config(rig.fake.url, timeout=0.5))
    starting = provider.start(CallInfo(Sink()))
    await until(lambda: bool(rig.fake.sessions) and rig.session.settings is not None, what="the Settings")
    push(provider, tone_frames(100))
    with pytest.raises(ProviderError, match=r"Deepgram sent no SettingsApplied within 0\.5s"):
        await starting
    await until(lambda: rig.session.closed, what="the socket to close")
    assert rig.session.audio_bytes == 0
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_settings_the_server_rejects_fail_the_start(rig: Rig) -> None:
    cfg = config(rig.fake.url)
    bogus = dataclasses.replace(cfg.providers.deepgram, think_provider="bogus")
    provider = rig.provider(dataclasses.replace(cfg, providers=dataclasses.replace(cfg.providers, deepgram=bogus)))
    with pytest.raises(ProviderError, match=r"Deepgram rejected the session: .*agent\.think\.provider\.type 'bogus'"):
        await provider.start(CallInfo(Sink()))
    assert rig.fake.violations == ["Settings: agent.think.provider.type 'bogus' is not one of "
                                   "['anthropic', 'aws_bedrock', 'google', 'groq', 'open_ai']"]


@pytest_twisted.ensureDeferred
async def test_cancelling_start_closes_the_socket(rig: Rig) -> None:
    rig.fake.answer_settings = False
    provider = rig.provider()
    starting = provider.start(CallInfo(Sink()))
    await until(lambda: bool(rig.fake.sessions) and rig.session.settings is not None, what="the Settings")
    starting.cancel()
    with pytest.raises(CancelledError):
        await starting
    await until(lambda: rig.session.closed, what="the socket to close")
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_keepalive_only_while_no_audio_is_streamed(rig: Rig) -> None:
    rig.fake.idle_timeout = 0.35
    provider, sink = await rig.start(greeting="", keepalive_interval=0.1)

    def keepalives() -> int:
        return sum(m["type"] == "KeepAlive" for m in rig.session.received)

    # four KeepAlives span 0.4 s, longer than the server's 0.35 s idle timeout (however late the
    # reactor runs them on a busy machine: no wall-clock window)
    await until(lambda: keepalives() >= 4 or rig.session.closed, timeout=10, what="KeepAlives")
    assert not rig.session.closed, "KeepAlive holds the idle connection open"
    before = keepalives()
    for _ in range(20):
        provider.push_audio(bytes(320))
        await sleep(0.02)
    assert keepalives() == before
    assert sink.of("error") == []
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_the_server_closes_an_idle_session(rig: Rig) -> None:
    rig.fake.idle_timeout = 0.3
    provider, sink = await rig.start(greeting="", keepalive_interval=60)
    provider._audio.stop()  # no silence either: as if the engine sent nothing at all
    await until(lambda: bool(sink.of("error")), what="the idle close")
    await sleep(0.1)
    [(_, message, fatal)] = sink.of("error")
    assert fatal and "NET-0001" in message and rig.session.idle_closed
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_close_is_prompt_idempotent_and_silences_events(rig: Rig) -> None:
    provider, sink = await rig.start(greeting=LONG)
    await until(lambda: bool(sink.of("agent_audio")), what="the greeting to stream")
    started = reactor.seconds()
    await provider.close()
    assert reactor.seconds() - started < 0.5
    assert provider.close().called
    seen = len(sink.events)
    await until(lambda: rig.session.closed, what="the server to see the close")
    await sleep(0.2)
    assert len(sink.events) == seen
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_close_is_bounded_when_the_server_does_not_answer(rig: Rig) -> None:
    provider, sink = await rig.start(greeting="", close_timeout=0.3)
    [connection] = rig.fake.connections
    transport: Any = connection.transport
    transport.pauseProducing()  # it never reads our close frame
    started = reactor.seconds()
    await provider.close()
    assert 0.25 < reactor.seconds() - started < 1
    transport.resumeProducing()
    await until(lambda: rig.session.closed, what="the dropped connection")
    assert sink.of("error") == []
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_speak_injects_a_message_and_fires_when_spoken_or_refused(rig: Rig) -> None:
    provider, sink = await rig.start(greeting=LONG)
    await until(lambda: bool(sink.of("agent_audio")), what="the greeting to stream")
    await provider.speak("Too early.")  # refused: the agent is mid-turn, and it does not hang
    assert rig.session.sent[-1]["type"] == "InjectionRefused"
    await until(lambda: len(sink.of("utterance_end")) == 1, what="the greeting to end")
    await provider.speak("Please hold the line.")
    uid = utterances(sink)[-1]
    assert ("agent_text", "Please hold the line.", uid) in sink.events
    assert sink.ended(uid) and sink.audio_of(uid) == heard("Please hold the line.")
    assert {"type": "InjectAgentMessage", "message": "Please hold the line."} in rig.session.received
    assert rig.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_key_press_is_told_to_the_agent_as_the_caller_s_words(rig: Rig) -> None:
    provider, sink = await rig.start(greeting="")
    provider.dtmf("5")
    await until(lambda: bool(rig.session.user_messages), what="the injected message")
    assert rig.session.user_messages == ["The caller pressed 5 on the keypad."]
    assert rig.fake.violations == []


@implementer(ICloudListener)
class RawListener:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.losses: list[str] = []

    def message(self, body: dict[str, Any]) -> None:
        self.messages.append(body)

    def audio(self, data: bytes) -> None:
        pass

    def lost(self, reason: str) -> None:
        self.losses.append(reason)


@pytest.mark.parametrize(("first", "problem"), [
    (b"\xff" * 160, "audio before Settings"),
    ({"type": "KeepAlive"}, "KeepAlive before Settings"),
    ({"type": "Settings", "audio": {"input": {"encoding": "linear16", "sample_rate": 16000},
                                    "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}},
      "agent": {"listen": {"provider": {"type": "deepgram"}}, "think": {"provider": {"type": "open_ai"}},
                "speak": {"provider": {"type": "deepgram"}}}}, "audio.input must be mulaw"),
    ({"type": "Settings", "audio": {}, "agent": {"think": {"prompt": 1, "functions": [{"name": "x"}]}}},
     "agent.listen.provider is missing"),
])
@pytest_twisted.ensureDeferred
async def test_the_fake_catches_a_client_that_breaks_the_protocol(rig: Rig, first: Any, problem: str) -> None:
    listener = RawListener()
    verifyObject(ICloudListener, listener)
    socket = await connect(reactor, "Deepgram", rig.fake.url, {"Authorization": "Token test-key"}, listener, 3)
    if isinstance(first, bytes):
        socket.send_audio(first)
    else:
        socket.send_json(first)
    await until(lambda: bool(listener.losses), what="the fake to close")
    assert any(problem in violation for violation in rig.fake.violations), rig.fake.violations
    assert [m["type"] for m in listener.messages] == ["Welcome", "Error"]
    assert problem in listener.messages[1]["description"]


def test_factory_readiness_and_create() -> None:
    ready = DeepgramFactory(reactor, config("wss://agent.deepgram.com/v1/agent/converse"))
    verifyObject(IProviderFactory, ready)
    state = ready.readiness()
    assert state.ready and "checked per call" in state.detail
    assert isinstance(ready.create(), DeepgramProvider)
    missing = DeepgramFactory(reactor, config("wss://agent.deepgram.com/v1/agent/converse", api_key=""))
    state = missing.readiness()
    assert not state.ready and "DEEPGRAM_API_KEY" in state.fix
    with pytest.raises(ProviderError, match="DEEPGRAM_API_KEY is not set"):
        missing.create()
