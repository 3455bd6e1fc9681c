"""The OpenAI Realtime provider against the fake server, both interfaces (GA, beta), both audio formats."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from tests.calls.simstack import sleep
from tests.providers.openai_support import (
    CallInfo,
    RecordingEvents,
    finished,
    make_config,
    say,
    sent,
    session,
    started,
    tone,
    wait_for,
)
from twisted_agent.config import ContextConfig
from twisted_agent.media.codecs import resample
from twisted_agent.providers.base import IProvider, IProviderEvents, IProviderFactory, ProviderError
from twisted_agent.providers.cloud import connect
from twisted_agent.providers.openai_realtime import RealtimeFactory, RealtimeProvider
from twisted_agent.providers.voices import ToneVoice
from twisted_agent.sim.openai_realtime import FakeRealtime

APIS = ["ga", "beta"]
LONG = " ".join(["word"] * 30)  # 4.8 s of audio, streamed in 2.4 s


@pytest.fixture
def fake() -> Any:
    server = FakeRealtime(reactor)
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


def _item_of(events: RecordingEvents) -> str:
    return str(events.of("audio")[-1][0])


@pytest.mark.parametrize("api", APIS)
@pytest_twisted.ensureDeferred
async def test_start_sends_a_session_update_of_its_family_and_waits_for_session_updated(
        fake: FakeRealtime, api: str) -> None:
    provider, events = await started(fake, api, system_prompt="Be brief.", language="de")
    fake_session = session(fake)
    assert (fake_session.api, fake_session.model) == (api, "gpt-realtime")
    [update] = sent(fake, "session.update")
    body = update["session"]
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
           "create_response": True, "interrupt_response": True}
    transcription = {"model": "gpt-4o-mini-transcribe", "language": "de"}
    if api == "ga":
        assert body["type"] == "realtime"
        assert body["output_modalities"] == ["audio"]
        assert body["audio"] == {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": vad, "transcription": transcription},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}}
    else:
        assert "type" not in body and "audio" not in body
        assert (body["input_audio_format"], body["output_audio_format"]) == ("g711_ulaw", "g711_ulaw")
        assert body["modalities"] == ["audio", "text"]
        assert (body["turn_detection"], body["input_audio_transcription"], body["voice"]) == (vad, transcription,
                                                                                              "alloy")
    assert body["instructions"] == "Be brief."
    assert [t["name"] for t in body["tools"]] == ["hang_up", "transfer"] and body["tool_choice"] == "auto"
    assert sent(fake, "response.create") == [], "no greeting configured"
    assert events.log == []
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_start_fires_only_after_session_updated(fake: FakeRealtime, monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[Any] = []
    monkeypatch.setattr("twisted_agent.sim.openai_realtime.FakeSession.on_session_update",
                        lambda self, event: held.append((self, event)))
    provider = RealtimeProvider(reactor, make_config(fake.url))
    starting = provider.start(CallInfo(RecordingEvents(), ContextConfig(greeting="")))
    await wait_for(lambda: held, what="the session.update")
    provider.push_audio(bytes(320))  # too early: the session's formats are not settled
    await sleep(0.2)
    assert not starting.called
    fake_session, event = held[0]
    fake_session.send("session.updated", session=fake_session.config)
    await wait_for(lambda: starting.called, what="start to fire")
    assert sent(fake, "input_audio_buffer.append") == []
    await finished(provider, fake)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("audio", ["pcmu", "pcm16"])
@pytest_twisted.ensureDeferred
async def test_greeting_then_a_caller_turn(fake: FakeRealtime, api: str, audio: str) -> None:
    provider, events = await started(fake, api, audio, greeting="Hi there caller")
    await wait_for(lambda: sent(fake, "response.create"), what="the greeting's response.create")
    [greeting] = sent(fake, "response.create")
    assert greeting["response"]["instructions"] == "Say exactly: Hi there caller"
    await wait_for(lambda: events.of("end"), what="the greeting's end")
    item = _item_of(events)
    assert item.startswith("item_")
    expected = ToneVoice().render("Hi there caller")
    rate = 8000 if audio == "pcmu" else 24000
    assert events.rates == {rate}
    if audio == "pcmu":
        assert len(events.audio[item]) == len(expected)
    else:
        assert len(events.audio[item]) == len(resample(expected, 8000, 24000))
    assert events.log == [("audio", item), ("agent_text", "Hi there caller", item), ("end", item)]

    say(provider)
    await wait_for(lambda: len(events.of("end")) == 2, what="the reply's end")
    reply = _item_of(events)
    assert reply != item
    assert events.log[3:] == [("speech_started",), ("transcript", "[caller turn 1]", True), ("timing", "first_audio"),
                              ("audio", reply), ("agent_text", "You said something.", reply), ("end", reply)]
    appended = sent(fake, "input_audio_buffer.append")
    filled = provider._audio.filled_frames  # silence for the time nothing was pushed (ContinuousAudio)
    assert len(appended) == 60 + filled, "every frame goes to the server, ungated"
    per_frame = 160 if audio == "pcmu" else 960
    assert session(fake).audio_bytes == (60 + filled) * per_frame
    assert {len(base64.b64decode(e["audio"])) for e in appended} == {per_frame}
    await finished(provider, fake)


@pytest.mark.parametrize("api", APIS)
@pytest_twisted.ensureDeferred
async def test_barge_in_the_server_cancels_and_we_truncate_at_what_was_heard(fake: FakeRealtime, api: str) -> None:
    fake.script = [{"say": LONG}]
    provider, events = await started(fake, api)
    say(provider)
    await wait_for(lambda: events.audio and len(next(iter(events.audio.values()))) >= 8000, what="0.5 s of the reply")
    item = _item_of(events)
    for frame in tone(200):
        provider.push_audio(frame)
    await wait_for(lambda: events.of("speech_started")[1:], what="the caller's speech over the reply")
    # interrupt_response: the server stops the reply itself; the utterance ends for the engine
    await wait_for(lambda: ("end", item) in events.log, what="the cancelled reply's end")
    await provider.interrupt({item: 300, "comfort-noise": 120})
    await wait_for(lambda: fake.truncations, what="the truncate")
    assert fake.truncations == [{"item_id": item, "audio_end_ms": 300, "sent_ms": session(fake).sent_ms[item],
                                 "accepted": True}]
    assert sent(fake, "response.cancel") == [], "the server had cancelled it already"
    assert [e for e in events.log if e[0] == "error"] == []
    await finished(provider, fake)


@pytest.mark.parametrize("api", APIS)
@pytest_twisted.ensureDeferred
async def test_interrupt_cancels_the_response_and_drops_its_late_audio(fake: FakeRealtime, api: str) -> None:
    fake.script = [{"say": LONG}]
    provider, events = await started(fake, api)
    say(provider)
    await wait_for(lambda: events.audio and len(next(iter(events.audio.values()))) >= 6400, what="0.4 s of the reply")
    item = _item_of(events)
    await provider.interrupt({item: 300})
    heard = len(events.audio[item])
    await wait_for(lambda: sent(fake, "response.cancel") and fake.truncations, what="the cancel and the truncate")
    [cancel] = sent(fake, "response.cancel")
    assert cancel["response_id"].startswith("resp_")
    [truncate] = sent(fake, "conversation.item.truncate")
    assert truncate == {"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": 300}
    assert fake.truncations[0]["accepted"]
    await wait_for(lambda: ("end", item) in events.log, what="the utterance to end")
    await sleep(0.2)
    assert len(events.audio[item]) == heard, "no audio of the cancelled reply after interrupt()"
    await finished(provider, fake)


@pytest.mark.parametrize("audio", ["pcmu", "pcm16"])
@pytest_twisted.ensureDeferred
async def test_a_truncate_never_goes_past_the_audio_received(fake: FakeRealtime, audio: str) -> None:
    fake.script = [{"say": LONG}]
    provider, events = await started(fake, "ga", audio)
    say(provider)
    await wait_for(lambda: events.audio, what="the reply's audio")
    item = _item_of(events)
    await provider.interrupt({item: 100_000})
    await wait_for(lambda: fake.truncations, what="the truncate")
    [truncation] = fake.truncations
    assert truncation["accepted"] and 0 < truncation["audio_end_ms"] <= truncation["sent_ms"] < 100_000
    await finished(provider, fake)


@pytest.mark.parametrize(("tool", "action", "arguments", "api"), [
    ("hang_up", "hangup", {"reason": "caller is done"}, "ga"),
    ("transfer", "transfer", {"target": "sales"}, "beta"),
])
@pytest_twisted.ensureDeferred
async def test_a_tool_call_goes_to_the_engine_and_its_result_back_to_the_model(
        fake: FakeRealtime, tool: str, action: str, arguments: dict[str, Any], api: str) -> None:
    fake.script = [{"call": tool, "arguments": arguments}, {"say": "Goodbye then"}]
    provider, events = await started(fake, api)
    say(provider)
    await wait_for(lambda: events.of("end"), what="the reply after the tool call")
    assert events.of("tool") == [(action, arguments)]
    [output] = [e for e in sent(fake, "conversation.item.create") if e["item"]["type"] == "function_call_output"]
    assert [output["item"]["call_id"]] == [call_id for call_id, _ in session(fake).calls] != [""]
    assert json.loads(output["item"]["output"]) == {"ok": True, "detail": "done"}
    types = [e["type"] for e in session(fake).received if e["type"] != "input_audio_buffer.append"]
    assert types[-2:] == ["conversation.item.create", "response.create"]
    assert events.of("agent_text")[-1][0] == "Goodbye then"
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_unknown_tools_and_bad_arguments_get_an_error_output_and_the_chain_goes_on(fake: FakeRealtime) -> None:
    # each function output's response.create gets the next step: three calls, then a reply, in one turn
    fake.script = [{"call": "hang_up"}, {"call": "launch_rocket"}, {"call": "transfer", "arguments": "{not json"},
                   {"say": "Done"}]
    provider, events = await started(fake)
    say(provider)
    await wait_for(lambda: events.of("end"), what="the reply after three calls")
    assert events.of("agent_text")[0][0] == "Done"
    assert len(sent(fake, "response.create")) == 3
    outputs = [e["item"] for e in sent(fake, "conversation.item.create")]
    assert [o["call_id"] for o in outputs] == [call_id for call_id, _ in session(fake).calls]
    results = [json.loads(o["output"]) for o in outputs]
    assert results[0] == {"ok": True, "detail": "done"}
    assert results[1] == {"ok": False, "error": "unknown tool 'launch_rocket'"}
    assert not results[2]["ok"] and "not a JSON object" in results[2]["error"]
    assert events.of("tool") == [("hangup", {})], "only the known tool with good arguments reaches the engine"
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_is_one_fatal_error(fake: FakeRealtime) -> None:
    fake.script = [{"drop": True}]
    provider, events = await started(fake, "beta")
    say(provider)
    await wait_for(lambda: events.of("error"), what="the error")
    await sleep(0.2)
    [(message, fatal)] = events.of("error")
    assert fatal and "OpenAI Realtime" in message
    provider.push_audio(bytes(320))  # after the loss: ignored, no second error
    await provider.close()
    assert fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_recoverable_error_is_not_fatal_and_a_fatal_one_is_reported_once(fake: FakeRealtime) -> None:
    fake.script = [
        {"error": {"type": "invalid_request_error", "code": "invalid_value", "message": "Invalid 'temperature'."}},
        {"error": {"type": "invalid_request_error", "code": "session_expired", "message": "Session expired."},
         "close": True},
    ]
    provider, events = await started(fake)
    say(provider)
    await wait_for(lambda: events.of("error"), what="the first error")
    assert events.of("error") == [("OpenAI Realtime error invalid_value: Invalid 'temperature'.", False)]
    say(provider)
    await wait_for(lambda: len(events.of("error")) == 2, what="the second error")
    await wait_for(lambda: not fake.connections, what="the server to close")
    await sleep(0.1)
    assert events.of("error")[1:] == [("OpenAI Realtime error session_expired: Session expired.", True)]
    await provider.close()
    assert fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_refused_key_is_a_clear_provider_error(fake: FakeRealtime) -> None:
    provider = RealtimeProvider(reactor, make_config(fake.url, key="wrong"))
    with pytest.raises(ProviderError, match=r"refused the API key \(HTTP 401\): check OPENAI_API_KEY"):
        await provider.start(CallInfo(RecordingEvents(), ContextConfig()))
    assert fake.sessions == []
    await provider.close()


@pytest_twisted.ensureDeferred
async def test_cancelling_start_closes_the_socket(fake: FakeRealtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("twisted_agent.sim.openai_realtime.FakeSession.on_session_update", lambda self, event: None)
    provider = RealtimeProvider(reactor, make_config(fake.url))
    starting = provider.start(CallInfo(RecordingEvents(), ContextConfig()))
    await wait_for(lambda: fake.sessions and sent(fake, "session.update"), what="the session.update")
    starting.cancel()
    await wait_for(lambda: not fake.connections, what="the socket to close")
    with pytest.raises(Exception):  # noqa: B017 - CancelledError, whatever wraps it
        await starting


@pytest_twisted.ensureDeferred
async def test_no_session_updated_in_time_fails_start(fake: FakeRealtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("twisted_agent.sim.openai_realtime.FakeSession.on_session_update", lambda self, event: None)
    provider = RealtimeProvider(reactor, make_config(fake.url, timeout=0.5))
    with pytest.raises(ProviderError, match=r"sent no session.updated within 0.5s"):
        await provider.start(CallInfo(RecordingEvents(), ContextConfig()))
    await wait_for(lambda: not fake.connections, what="the socket to close")


@pytest_twisted.ensureDeferred
async def test_close_is_prompt_idempotent_and_silences_events(fake: FakeRealtime) -> None:
    fake.script = [{"say": LONG}]
    provider, events = await started(fake)
    say(provider)
    await wait_for(lambda: events.audio, what="the reply's audio")
    began = reactor.seconds()
    await provider.close()
    assert reactor.seconds() - began < 2
    seen = list(events.log), {k: len(v) for k, v in events.audio.items()}
    await provider.close()
    provider.push_audio(bytes(320))
    await sleep(0.2)
    assert (events.log, {k: len(v) for k, v in events.audio.items()}) == seen
    assert not fake.connections and fake.violations == []


@pytest_twisted.ensureDeferred
async def test_speak_says_the_text_and_fires_at_its_end(fake: FakeRealtime) -> None:
    provider, events = await started(fake, "beta")
    await provider.speak("Are you still there")
    assert events.of("agent_text") == [("Are you still there", _item_of(events))]
    assert events.of("end") == [(_item_of(events),)]
    assert sent(fake, "response.create")[-1]["response"] == {"instructions": "Say exactly: Are you still there"}
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_speak_is_bounded_when_no_response_comes(fake: FakeRealtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("twisted_agent.sim.openai_realtime.FakeSession.on_response_create", lambda self, event: None)
    provider, events = await started(fake)
    provider.speak_timeout = 0.3
    began = reactor.seconds()
    await provider.speak("Hello")
    assert 0.25 < reactor.seconds() - began < 2
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_a_digit_becomes_a_note_in_the_conversation_without_a_response(fake: FakeRealtime) -> None:
    provider, events = await started(fake)
    provider.dtmf("5")
    await wait_for(lambda: sent(fake, "conversation.item.create"), what="the note")
    [note] = sent(fake, "conversation.item.create")
    assert note["item"] == {"type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": "The caller pressed 5 on the keypad."}]}
    await sleep(0.1)
    assert sent(fake, "response.create") == [] and events.log == []
    await finished(provider, fake)


@pytest_twisted.ensureDeferred
async def test_the_fake_fails_a_ga_session_update_without_a_type(fake: FakeRealtime) -> None:
    """A test can fail: the fake answers a bad client as the service does and records it."""
    messages: list[dict[str, Any]] = []

    class Listener:
        def message(self, body: dict[str, Any]) -> None:
            messages.append(body)

        def audio(self, data: bytes) -> None:
            pass

        def lost(self, reason: str) -> None:
            pass

    socket = await connect(reactor, "fake", f"{fake.url}?model=gpt-realtime",
                           {"Authorization": "Bearer test-key"}, Listener(), 3)
    socket.send_json({"type": "session.update", "session": {"instructions": "hi"}})
    socket.send_json({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0,
                      "audio_end_ms": 10})
    socket.send_json({"type": "output_audio_buffer.clear"})
    await wait_for(lambda: len([m for m in messages if m["type"] == "error"]) == 3, what="three errors")
    codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
    assert codes == ["missing_required_parameter", "item_not_found", "invalid_value"]
    assert fake.violations[0] == "session.update: Missing required parameter: 'session.type'."
    assert len(fake.violations) == 3
    assert messages[0]["type"] == "session.created"
    socket.close()
    await wait_for(lambda: not fake.connections, what="the close")


def test_the_factory_is_ready_with_a_key_and_its_providers_are_providers() -> None:
    factory = RealtimeFactory(reactor, make_config("ws://127.0.0.1:1/v1/realtime"))
    assert verifyObject(IProviderFactory, factory)
    state = factory.readiness()
    assert state.ready and "checked per call" in state.detail
    unset = RealtimeFactory(reactor, make_config("ws://127.0.0.1:1/v1/realtime", key="")).readiness()
    assert not unset.ready and "OPENAI_API_KEY" in unset.fix
    assert verifyObject(IProvider, factory.create())
    assert verifyObject(IProviderEvents, RecordingEvents())
