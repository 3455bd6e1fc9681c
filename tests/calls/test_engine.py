"""The call engine with a fake ARI, a real media plane on a fake UDP transport, and task.Clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail

from tests.calls.fakes import channel_json, event
from tests.calls.rig import CALLER, Rig
from twisted_agent.ari.errors import ARIUnavailable
from twisted_agent.calls.engine import APOLOGY_NAME
from twisted_agent.calls.talkdetect import loudest_frame
from twisted_agent.media.rtp import parse


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_the_ari_requests_of_a_call_in_order(rig: Rig) -> None:
    rig.ring()
    assert rig.ari.names() == ["get_variable", "get_variable", "answer", "create_bridge", "external_media"]
    external = rig.ari.requests[4][1]
    assert external == {"app": "asterisk-ai-voice-agent", "channel_id": f"ai-media-{CALLER}",
                        "external_host": "10.0.0.9:18080", "format": "ulaw"}
    assert rig.ari.requests[3][1:] == (f"ai-bridge-{CALLER}", "mixing")
    rig.media_up()  # only now may the media channel join the bridge (earlier: 422)
    names = rig.ari.names()
    assert names[5] == "add_channel"
    # absorbDTMF: a key the caller presses reaches us once, as ChannelDtmfReceived, not also on the media leg
    assert rig.ari.requests[5][1:] == (f"ai-bridge-{CALLER}", [CALLER, f"ai-media-{CALLER}"], True)
    # file mode: Asterisk takes the caller out of the bridge while a file plays to them; its talk
    # detection is what hears a barge-in then, at a threshold the greeting's echo cannot reach
    call = rig.engine.calls[CALLER]
    assert rig.ari.requests[6][1:] == (CALLER, "TALK_DETECT(set)", "100,256")
    greeting = call.provider.voice.render(call.context.greeting)
    threshold = round(loudest_frame(greeting, call.provider.voice.rate) * 10 ** (-8 / 20))
    assert 256 < threshold < 4000
    assert rig.ari.requests[7][1:] == (CALLER, "TALK_DETECT(set)", f"100,{threshold}")
    assert names[8] == "play", "the greeting plays from a file"
    assert call.state == "speaking"
    # the media session was primed with silence at once (Asterisk waits for a first frame after Answer)
    rig.clock.advance(0.02)
    sent = [parse(data) for data, addr in rig.udp.written]
    assert sent and all(addr == rig.ari.peers[f"ai-media-{CALLER}"] for _, addr in rig.udp.written)


def test_greeting_file_is_written_played_and_deleted(rig: Rig) -> None:
    call = rig.answered_call()
    play = next(r for r in rig.ari.requests if r[0] == "play")
    media = play[2]
    assert media.startswith(f"sound:{rig.media_dir}/ai-{CALLER}-") and not media.endswith(".ulaw")
    files = rig.files()
    assert len(files) == 1 and files[0].endswith(".ulaw")
    size = os.path.getsize(rig.media_dir / files[0])
    assert size == call.provider.voice.duration_ms(call.context.greeting) * 8, "μ-law at 8 kHz: 8 bytes per ms"
    rig.playback_done(call)
    assert rig.files() == []
    rig.advance(0.3)  # the gate guard
    assert call.state == "listening"


def test_a_turn_gets_an_answer_and_gating_keeps_the_agent_from_hearing_itself(rig: Rig) -> None:
    call = rig.answered_call()
    provider = call.provider
    rig.speak(100)  # a backchannel over the greeting: gated, not a turn, too short to interrupt
    rig.speak(300, loud=False)
    assert provider._turn_frames == 0 and call.state == "speaking" and not provider.interruptions
    assert rig.engine.counters["backchannels"] == 1
    rig.playback_done(call)
    rig.advance(0.3)
    assert call.state == "listening"
    rig.speak(600)
    rig.speak(200, loud=False)
    assert call.state == "listening", "a pause shorter than TURN_END_MS does not end the turn"
    rig.advance(0.5)
    assert provider.turns and call.state == "speaking"
    assert call.conversation[-1][0] == "agent" and call.conversation[-1][1].startswith("You spoke for")
    rig.playback_done(call)
    rig.advance(0.3)
    assert call.state == "listening"
    timing = call.turn_timings[-1]
    assert timing["turn_end_wait_ms"] == pytest.approx(500, abs=25)


def test_barge_in_over_a_file_reply_stops_the_playback_deletes_the_file_and_keeps_the_callers_words(
        rig: Rig) -> None:
    call = rig.answered_call()
    provider = call.provider
    play = next(r for r in rig.ari.requests if r[0] == "play")
    rig.events.emit(event("PlaybackStarted", playback={"id": play[3], "media_uri": play[2],
                                                       "target_uri": f"channel:{CALLER}", "state": "playing",
                                                       "language": "en"}))
    assert rig.files() and call.state == "speaking"
    rig.speak(100)
    assert call.state == "speaking", "not yet: 120 ms of speech interrupt"
    rig.speak(60)
    assert call.state == "listening" and len(call.barge_ins) == 1, "the caller has the floor"
    assert ("stop_playback", play[3]) in [r[:2] for r in rig.ari.requests], "the ARI playback was stopped"
    rig.clock.advance(0)
    assert rig.files() == [], "and its file deleted"
    assert provider.interruptions and list(provider.interruptions[0]) == [f"{CALLER}-1"], "told what was heard"
    rig.speak(400)
    rig.speak(600, loud=False)
    assert provider.turns[-1] >= 560, "the new turn holds the speech from its onset, barge-in audio included"
    assert call.state == "speaking" and rig.engine.counters["barge_ins"] == 1


def test_barge_in_can_be_switched_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path, BARGE_IN="false")
    call = rig.answered_call()
    rig.speak(400)
    assert call.state == "speaking" and not call.provider.interruptions and not call.barge_ins


def test_caller_going_on_before_the_reply_starts_gets_one_answer(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream")
    call = rig.answered_call()
    provider = call.provider
    provider.think_ms = 400  # the reply takes a while
    rig.advance(3)  # the greeting played out
    assert call.state == "listening"
    rig.speak(600)
    rig.speak(600, loud=False)  # a 600 ms pause: the turn ends at 500 ms
    assert call.state == "thinking"
    rig.speak(400)  # ... and goes on before the answer came
    assert call.state == "listening" and rig.engine.counters["turns_resumed"] == 1
    rig.speak(800, loud=False)
    rig.advance(1)
    answers = [text for speaker, text in call.conversation if speaker == "agent"][1:]
    assert len(answers) == 1, "one answer to the whole sentence, none to its first half"


def test_caller_hangs_up_while_the_agent_speaks_everything_is_released(rig: Rig) -> None:
    call = rig.answered_call()
    assert rig.files()
    rig.events.emit(event("ChannelHangupRequest", channel=channel_json(CALLER), cause=16))
    rig.ari.channels.pop(CALLER)
    rig.clock.advance(0)
    assert call.state == "ended" and call.ended.called
    assert CALLER not in rig.engine.calls and len(rig.registry) == 0
    assert rig.ari.channels == {} and rig.ari.bridges == {}, "no media channel, no bridge left"
    assert rig.files() == [], "no reply file left"
    assert rig.media.sessions == {}
    assert ("hangup", CALLER) not in rig.ari.requests, "the caller is gone: nothing to hang up"
    assert any(r[0] == "stop_playback" for r in rig.ari.requests), "the queued greeting was stopped"


def test_caller_hangs_up_during_setup(rig: Rig) -> None:
    rig.ring()
    call = rig.engine.calls[CALLER]
    rig.ari.channels.pop(CALLER)
    rig.events.emit(event("StasisEnd", channel=channel_json(CALLER)))
    assert call.state == "ended"
    assert rig.ari.channels == {} and rig.ari.bridges == {}
    assert rig.media.sessions == {} and len(rig.registry) == 0


def test_selection_from_channel_variables(tmp_path: Path) -> None:
    rig = Rig(tmp_path, AI_PROVIDER="local", CONTEXT_SALES_GREETING="Welcome to sales")
    call = rig.answered_call(variables={"AI_PROVIDER": "echo", "AI_CONTEXT": "sales"})
    assert (call.provider_name, call.context_name) == ("echo", "sales")
    assert call.conversation[0] == ("agent", "Welcome to sales")


def test_selection_from_stasis_start_channelvars_needs_no_requests(rig: Rig) -> None:
    rig.ring(in_event={"AI_PROVIDER": "echo", "AI_CONTEXT": "default"})
    assert "get_variable" not in rig.ari.names()


def test_bad_selection_falls_back_to_defaults(rig: Rig) -> None:
    call = rig.answered_call(variables={"AI_PROVIDER": "watson", "AI_CONTEXT": "nope"})
    assert (call.provider_name, call.context_name) == ("echo", "default")


def test_an_unavailable_provider_sends_the_caller_back_unanswered(tmp_path: Path) -> None:
    rig = Rig(tmp_path, AI_PROVIDER="local", FALLBACK_CONTEXT="voicemail", FALLBACK_EXTENSION="s")
    rig.ring()
    assert rig.ari.names() == ["get_variable", "get_variable", "continue_in_dialplan"]
    assert rig.ari.requests[-1] == ("continue_in_dialplan", CALLER, "voicemail", "s", 1)
    assert rig.engine.calls == {} and rig.engine.counters["provider_unavailable"] == 1


def test_provider_failure_mid_call_apologises_then_returns_to_the_dialplan(tmp_path: Path) -> None:
    rig = Rig(tmp_path, FALLBACK_CONTEXT="operator")
    call = rig.answered_call()
    rig.playback_done(call)
    rig.advance(0.3)
    call.provider.end_of_turn = lambda: fail(RuntimeError("model crashed"))
    rig.speak(400)
    rig.advance(0.6)
    apology = [r for r in rig.ari.requests if r[0] == "play" and APOLOGY_NAME in r[2]]
    assert apology, "the caller hears an apology"
    assert "continue_in_dialplan" not in rig.ari.names(), "only after the apology was heard"
    playback_id = apology[0][3]
    rig.events.emit(event("PlaybackFinished", playback={"id": playback_id, "media_uri": apology[0][2],
                                                         "target_uri": f"channel:{CALLER}", "state": "done",
                                                         "language": "en"}))
    assert rig.ari.requests[-1] == ("continue_in_dialplan", CALLER, "operator", None, 1)
    assert call.state == "ended" and rig.ari.bridges == {} and rig.files() == []
    assert list(rig.ari.channels) == [], "media channel deleted; the caller left our app"


def test_a_provider_that_never_answers_gets_the_apology_too(tmp_path: Path) -> None:
    rig = Rig(tmp_path, PROVIDER_TIMEOUT="2", FAILURE_ACTION="hangup")
    call = rig.answered_call()
    rig.playback_done(call)
    rig.advance(0.3)

    def started_and_stuck() -> Deferred[None]:
        call.events.work_started()  # it started on the turn at once (nothing queued), then nothing came
        return Deferred()

    call.provider.end_of_turn = started_and_stuck
    rig.speak(400)
    rig.advance(2.7)
    apology = next(r for r in rig.ari.requests if r[0] == "play" and APOLOGY_NAME in r[2])
    rig.events.emit(event("PlaybackFinished", playback={"id": apology[3], "media_uri": apology[2],
                                                         "target_uri": f"channel:{CALLER}", "state": "done",
                                                         "language": "en"}))
    assert ("hangup", CALLER) in rig.ari.requests and call.state == "ended"


def test_engine_shutdown_hands_calls_back_to_the_dialplan(rig: Rig) -> None:
    call = rig.answered_call()
    drained = rig.registry.drain(5)
    rig.advance(5.1)
    assert drained.called and call.state == "ended"
    assert ("continue_in_dialplan", CALLER, None, None, None) in rig.ari.requests
    assert rig.ari.bridges == {} and rig.files() == []


def test_draining_engine_refuses_new_calls_without_answering(rig: Rig) -> None:
    rig.registry.drain(5)
    rig.ring("1700000000.9")
    assert rig.ari.names() == ["continue_in_dialplan"]
    assert rig.engine.counters["refused_draining"] == 1


def test_full_engine_refuses_beyond_max_calls(tmp_path: Path) -> None:
    rig = Rig(tmp_path, MAX_CALLS="1")
    rig.answered_call("1700000000.1")
    rig.ring("1700000000.2")
    assert rig.ari.requests[-1][0:2] == ("continue_in_dialplan", "1700000000.2")


def test_media_channel_that_never_starts_fails_setup(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SETUP_TIMEOUT="1")
    rig.ring()
    call = rig.engine.calls[CALLER]
    rig.advance(1.1)
    assert call._failing
    apology = next(r for r in rig.ari.requests if r[0] == "play")
    assert APOLOGY_NAME in apology[2]


def test_reconnect_ends_calls_whose_caller_left_during_the_outage(rig: Rig) -> None:
    kept = rig.answered_call("1700000000.1")
    lost = rig.answered_call("1700000000.2")
    rig.events.connection(False)
    rig.ari.channels.pop("1700000000.2")  # hung up while nobody listened
    rig.events.connection(True)
    assert lost.state == "ended" and kept.state != "ended"
    assert lost.end_reason == "caller left during the ARI outage"
    assert rig.engine.counters["lost_during_outage"] == 1
    assert "ai-bridge-1700000000.2" not in rig.ari.bridges
    assert lost.outcome == "lost" and rig.engine.outcomes["lost"] == 1


def test_unexpected_end_of_the_media_channel_fails_the_call(rig: Rig) -> None:
    call = rig.answered_call()
    rig.events.emit(event("StasisEnd", channel=channel_json(f"ai-media-{CALLER}")))
    assert call._failing


def test_stray_media_channel_from_an_old_run_is_hung_up(rig: Rig) -> None:
    rig.ari.channels["ai-media-old"] = {}
    rig.events.emit(event("StasisStart", channel=channel_json("ai-media-old", state="Up"), args=[]))
    assert ("hangup", "ai-media-old") in rig.ari.requests and rig.engine.calls == {}


def test_stream_mode_replies_go_on_the_media_leg(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream")
    call = rig.answered_call()
    assert "play" not in rig.ari.names() and rig.files() == []
    greeting_ms = call.provider.voice.duration_ms(call.context.greeting)
    rig.advance(greeting_ms / 1000 + 0.4)
    frames = [parse(data) for data, _ in rig.udp.written]
    assert len(frames) >= greeting_ms // 20
    assert call.state == "listening"


def test_agent_hangup_tool_waits_for_the_reply_to_be_heard(rig: Rig) -> None:
    call = rig.answered_call()
    result = call.tool_request("hangup", {})
    assert result.called and call.state == "speaking" and ("hangup", CALLER) not in rig.ari.requests
    rig.playback_done(call)
    rig.advance(0.3)
    assert ("hangup", CALLER) in rig.ari.requests and call.state == "ended"


def test_release_survives_ari_being_down(rig: Rig) -> None:
    call = rig.answered_call()
    rig.ari.failures["continue_in_dialplan"] = ARIUnavailable("POST", "/channels/x/continue", "connection refused")
    finished = call.release("shutdown")
    assert finished.called and call.state == "ended" and len(rig.registry) == 0


def test_the_transfer_key_sends_the_caller_to_a_human_other_keys_go_to_the_provider(tmp_path: Path) -> None:
    rig = Rig(tmp_path, TRANSFER_DIGIT="0", TRANSFER_CONTEXT="humans", TRANSFER_EXTENSION="100")
    call = rig.answered_call()
    rig.events.emit(event("ChannelDtmfReceived", channel=channel_json(CALLER), digit="5", duration_ms=120))
    rig.clock.advance(0)
    assert call.provider.digits == ["5"] and call.state != "ended"
    rig.events.emit(event("ChannelDtmfReceived", channel=channel_json(CALLER), digit="0", duration_ms=120))
    rig.clock.advance(0)
    rig.clock.advance(1)
    assert call.state == "ended" and call.end_reason == "caller asked for a human"
    assert ("continue_in_dialplan", CALLER, "humans", "100", 1) in rig.ari.requests
    assert call.provider.digits == ["5"], "the transfer key is not the provider's"
    assert rig.files() == [] and rig.ari.bridges == {}


def test_a_key_reported_both_by_ari_and_on_the_media_leg_is_one_press(rig: Rig) -> None:
    call = rig.answered_call()
    provider = call.provider
    call.dtmf("5")  # ChannelDtmfReceived
    rig.clock.advance(0.03)
    call.dtmf_received("5")  # the same press as an AudioSocket DTMF frame (a bridge that passed it on)
    call.dtmf_received("7")  # a press only the media leg saw
    rig.clock.advance(0.03)
    call.dtmf("7")
    call.dtmf("5")  # pressed again: a second press
    rig.clock.advance(1.0)
    call.dtmf_received("5")  # too late to be the other report of that press
    assert provider.digits == ["5", "7", "5", "5"]
