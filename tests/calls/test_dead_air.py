"""No dead air, on the engine rig (task.Clock): the filler, the ringback, the inactivity watchdog,
file-mode barge-in through Asterisk's talk detection, and the fall back from streaming to files."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred, succeed

from tests.calls.fakes import channel_json, event
from tests.calls.rig import CALLER, Rig
from twisted_agent.calls.comfort import comfort_tone, filler_phrase, ringback_tone
from twisted_agent.media.codecs import ulaw_encode
from twisted_agent.media.rtp import parse
from twisted_agent.providers.base import ICallInfo
from twisted_agent.providers.echo import EchoProvider


def payloads(rig: Rig, since: int = 0) -> list[bytes]:
    return [parse(data).payload for data, _ in rig.udp.written[since:]]


def frames_of(pcm: bytes) -> list[bytes]:
    """The μ-law payloads a clip goes out as (its last frame padded with silence)."""
    pcm = pcm + bytes(-len(pcm) % 320)
    return [ulaw_encode(pcm[i:i + 320]) for i in range(0, len(pcm), 320)]


def quiet_caller_turn(rig: Rig, ms: int = 600) -> None:
    """The caller says something; the turn ends TURN_END_MS (500 ms) after their last voiced frame."""
    rig.speak(ms)
    rig.speak(520, loud=False)


def stream_rig(tmp_path: Path, **env: str) -> tuple[Rig, Any]:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream", **env)
    call = rig.answered_call()
    for _ in range(500):  # the greeting plays out, then the gate guard passes: the caller's turn
        if call.state == "listening":
            break
        rig.clock.advance(0.02)
    assert call.state == "listening"
    return rig, call


def test_a_slow_reply_gets_the_filler_which_stops_the_moment_the_reply_is_ready(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path)
    call.provider.think_ms = 1300  # the reply is ready 1.3 s after the turn ended: 1.8 s after the last word
    quiet_caller_turn(rig)
    assert call.state == "thinking"
    speech_end = call.turn_clock.marks["speech_end"]
    turn_end = call.turn_clock.marks["turn_end"]
    before = len(rig.udp.written)
    rig.advance(speech_end + 1.2 - rig.clock.seconds() - 0.02)
    assert len(rig.udp.written) == before and not call.fillers, "nothing before the 1.2 s budget"
    rig.advance(0.04)
    assert len(call.fillers) == 1 and abs(call.fillers[0] - (speech_end + 1.2)) < 0.021
    rig.advance(turn_end + 1.3 - rig.clock.seconds() + 0.5)
    sent = payloads(rig, before)
    filler = frames_of(filler_phrase())
    reply = frames_of(call.provider.voice.render(call.conversation[-1][1]))
    heard_filler = [p for p in sent if p in filler]
    start = sent.index(reply[0])
    assert sent[:len(heard_filler)] == filler[:len(heard_filler)], "the filler went out in order, from its start"
    assert start == len(heard_filler), "the reply's first frame follows the filler's last: no gap, no overlap"
    assert 0 < len(heard_filler) < len(filler), "the filler was cut off when the reply was ready"
    ms = len(heard_filler) * 20
    assert abs(ms - (turn_end + 1.3 - (speech_end + 1.2)) * 1000) <= 40
    assert sent[start:start + 20] == reply[:20]
    assert rig.engine.counters["fillers"] == 1
    rig.advance(3)
    assert abs(call.turn_timings[-1]["filler_ms"] - 1200) <= 20 and call.state == "listening"
    assert [text for speaker, text in call.conversation if speaker == "agent"][-1].startswith("You spoke for")


def test_a_quick_reply_gets_no_filler(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path)
    call.provider.think_ms = 600
    quiet_caller_turn(rig)
    rig.advance(3)
    assert call.fillers == [] and rig.engine.counters["fillers"] == 0 and len(call.turn_timings) == 1
    assert "filler_ms" not in call.turn_timings[0]


def test_filler_can_be_switched_off(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, FILLER_MS="0")
    call.provider.think_ms = 3000
    quiet_caller_turn(rig)
    rig.advance(2.5)
    assert call.fillers == [] and call.state == "thinking"


def test_file_mode_filler_is_a_playback_stopped_and_deleted_when_the_reply_comes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    call = rig.answered_call()
    rig.playback_done(call)
    rig.advance(0.3)
    call.provider.think_ms = 2500
    quiet_caller_turn(rig)
    played = len([r for r in rig.ari.requests if r[0] == "play"])
    rig.advance(1.0)
    filler_play = [r for r in rig.ari.requests if r[0] == "play"][played:]
    assert len(filler_play) == 1 and len(rig.files()) == 1, "the filler is one file, played"
    playback_id = filler_play[0][3]
    rig.events.emit(event("PlaybackStarted", playback={"id": playback_id, "media_uri": filler_play[0][2],
                                                       "target_uri": f"channel:{CALLER}", "state": "playing",
                                                       "language": "en"}))
    assert call.state == "thinking" and not call.turn_timings, "the filler is not the reply"
    rig.advance(2.0)
    assert ("stop_playback", playback_id) in rig.ari.requests, "the reply stopped the filler"
    plays = [r for r in rig.ari.requests if r[0] == "play"]
    assert plays[-1][3] != playback_id and call.state == "speaking"
    assert len(rig.files()) == 1, "the filler's file is gone; the reply's is there"
    rig.playback_done(call)
    rig.advance(0.3)
    assert rig.files() == [] and call.state == "listening"


def test_caller_speaking_over_the_filler_takes_the_floor_and_the_pending_reply_is_dropped(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path)
    call.provider.think_ms = 3000
    quiet_caller_turn(rig)
    rig.advance(1.0)
    assert call.fillers and call.state == "thinking"
    turns = len(call.provider.turns)
    rig.speak(200)
    assert call.state == "listening" and len(call.barge_ins) == 1, "the caller has the floor"
    assert call.provider.interruptions[-1] == {}, "the provider hears nothing of the filler"
    quiet_caller_turn(rig, 400)
    rig.advance(10)  # long past PROVIDER_TIMEOUT: the dropped reply's timer went with it
    assert call.state == "listening" and call.end_reason == ""
    assert len(call.provider.turns) == turns + 1
    answers = [text for speaker, text in call.conversation if speaker == "agent"][1:]
    assert len(answers) == 1, "only the turn the caller finished was answered"


class LateGreeter(EchoProvider):
    """A provider whose greeting takes two seconds to prepare (a cold model)."""

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        assert self._clock is not None
        self._clock.callLater(2.0, self._say, call.context.greeting)
        return succeed(None)


def test_ringback_plays_until_the_greeting_is_ready(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream", RINGBACK="yes")
    factory = rig.engine.providers.factories["echo"]
    factory.create = lambda: LateGreeter(rig.clock)
    call = rig.answered_call()
    before = len(rig.udp.written)
    rig.advance(2.0)
    ring = frames_of(ringback_tone(30))
    sent = payloads(rig, before)
    assert sent[0] == ulaw_encode(bytes(320)), "the frame of silence that starts the media"
    assert sent[1:96] == ring[:95], "ringing while the greeting is prepared"
    rig.advance(1.0)
    greeting = frames_of(call.provider.voice.render(call.context.greeting))
    sent = payloads(rig, before)
    start = sent.index(greeting[0])
    assert sent[1:start] == ring[:start - 1] and sent[start:start + 10] == greeting[:10]
    assert 100 <= start <= 102, "the greeting replaced the ring the moment it was ready"
    assert call.state == "speaking"


def until_listening(rig: Rig, call: Any) -> None:
    for _ in range(500):
        if call.state == "listening":
            return
        rig.clock.advance(0.02)
    raise AssertionError(f"still {call.state}")


def test_the_inactivity_watchdog_asks_then_says_goodbye_and_hangs_up(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, INACTIVITY_PROMPT_SECONDS="5", INACTIVITY_HANGUP_SECONDS="3")
    rig.advance(4.9)  # counted from the end of the greeting (and its echo guard)
    assert call.conversation[-1][1] == call.context.greeting
    rig.advance(0.2)
    assert call.conversation[-1] == ("agent", "Are you still there?") and call.state == "speaking"
    until_listening(rig, call)
    rig.advance(2.9)
    assert call.conversation[-1][1] == "Are you still there?" and call.state == "listening"
    rig.advance(0.2)
    assert call.conversation[-1] == ("agent", call.context.goodbye)
    assert ("hangup", CALLER) not in rig.ari.requests, "not before the goodbye is heard"
    rig.advance(call.provider.voice.duration_ms(call.context.goodbye) / 1000 + 0.5)
    assert ("hangup", CALLER) in rig.ari.requests and call.end_reason == "caller inactive"
    assert rig.engine.counters["inactivity_prompts"] == 1 and rig.engine.counters["inactivity_hangups"] == 1


def test_a_caller_who_answers_the_watchdog_starts_it_afresh(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, INACTIVITY_PROMPT_SECONDS="5", INACTIVITY_HANGUP_SECONDS="3")
    rig.advance(5.1)
    assert call.conversation[-1] == ("agent", "Are you still there?")
    until_listening(rig, call)
    rig.advance(1)
    quiet_caller_turn(rig, 400)  # "yes, I am"
    rig.advance(0.1)
    until_listening(rig, call)
    assert call.conversation[-1][1].startswith("You spoke for")
    rig.advance(4.9)  # past the 3 s that would have ended the call
    assert call.end_reason == "" and call.conversation[-1][1].startswith("You spoke for")
    rig.advance(0.2)
    assert call.conversation[-1] == ("agent", "Are you still there?"), "asked again after 5 s more of silence"


def test_the_watchdog_does_not_interrupt_a_long_turn(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, INACTIVITY_PROMPT_SECONDS="2", INACTIVITY_HANGUP_SECONDS="1")
    rig.speak(3000)  # a caller who talks for three seconds without a pause
    assert call.conversation[-1][1] == call.context.greeting and call.state == "listening"


def talking(rig: Rig, started: bool, duration: int = 0) -> None:
    if started:
        rig.events.emit(event("ChannelTalkingStarted", channel=channel_json(CALLER, state="Up")))
    else:
        rig.events.emit(event("ChannelTalkingFinished", channel=channel_json(CALLER, state="Up"), duration=duration))


def playing(rig: Rig, request: tuple[Any, ...]) -> None:
    rig.events.emit(event("PlaybackStarted", playback={"id": request[3], "media_uri": request[2],
                                                       "target_uri": f"channel:{CALLER}", "state": "playing",
                                                       "language": "en"}))


def test_file_mode_talk_pauses_the_reply_and_a_backchannel_lets_it_go_on_from_where_it_stopped(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    call = rig.answered_call()
    play = next(r for r in rig.ari.requests if r[0] == "play")
    playing(rig, play)
    assert call.voice.talk.on and call.state == "speaking"
    rig.advance(0.5)
    talking(rig, True)
    assert ("stop_playback", play[3]) in rig.ari.requests, "the file stops at once: the caller's voice comes through"
    assert call.player.paused and call.state == "speaking" and len(rig.files()) == 1, "the file is kept"
    rig.speak(80)  # "mm"
    rig.speak(120, loud=False)
    talking(rig, False, 80)
    plays = [r for r in rig.ari.requests if r[0] == "play"]
    assert len(plays) == 2 and plays[1][2] == play[2], "the same file again"
    assert abs(rig.ari.offsets[plays[1][3]] - 500) <= 20, "from where the caller stopped hearing it"
    assert not call.barge_ins and rig.engine.counters["backchannels"] == 1 and call.state == "speaking"
    rig.playback_done(call)
    rig.advance(0.3)
    assert call.state == "listening" and rig.files() == []
    assert call.provider.interruptions == []


def test_file_mode_barge_in_judges_the_callers_voice_and_keeps_it_from_the_first_syllable(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    call = rig.answered_call()
    play = next(r for r in rig.ari.requests if r[0] == "play")
    playing(rig, play)
    rig.advance(0.4)
    talking(rig, True)
    rig.speak(160)
    assert len(call.barge_ins) == 1 and call.state == "listening", "the barge-in detector heard the caller"
    rig.clock.advance(0)
    assert rig.files() == [], "the paused file is deleted"
    assert len([r for r in rig.ari.requests if r[0] == "play"]) == 1, "and never played again"
    heard = call.provider.interruptions[-1][f"{CALLER}-1"]
    assert abs(heard - 400) <= 20, "the caller heard 400 ms of the greeting"
    talking(rig, False, 500)
    rig.speak(300)
    rig.speak(600, loud=False)
    assert call.provider.turns[-1] >= 440, "the turn has the caller's voice from the pause on"


def test_file_mode_barge_in_by_asterisks_measure_when_no_audio_comes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    call = rig.answered_call()
    play = next(r for r in rig.ari.requests if r[0] == "play")
    playing(rig, play)
    talking(rig, True)
    rig.advance(0.2)
    assert not call.barge_ins, "confirmed at BARGE_IN_MIN_MS + TALK_SILENCE_MS from the onset"
    rig.advance(0.04)
    assert len(call.barge_ins) == 1 and call.state == "listening"
    rig.clock.advance(0)
    assert rig.files() == [], "the playback's file is deleted"


def test_streaming_that_fails_mid_reply_goes_on_with_file_playback(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream", STREAM_STALL_MS="200")
    call = rig.answered_call()
    greeting = call.provider.voice.render(call.context.greeting)
    rig.advance(0.5)
    sent_before = len(rig.udp.written)
    rig.udp.error = OSError(errno.ENETUNREACH, "Network is unreachable")
    rig.advance(0.15)
    assert not call.stream_fallback, "a short hiccup is not a failure"
    rig.advance(0.1)
    assert call.stream_fallback and rig.engine.counters["playback_fallbacks"] == 1
    plays = [r for r in rig.ari.requests if r[0] == "play"]
    assert len(plays) == 1 and len(rig.files()) == 1, "the rest of the greeting went to a file"
    unsent_ms = len(greeting) // 16 - (sent_before - 1) * 20  # (the first frame sent was the priming silence)
    assert abs(rig.engine._playbacks[plays[0][3]]._queued[plays[0][3]][2] - unsent_ms) <= 20, \
        "the file holds exactly what had not been sent: nothing lost, nothing twice"
    talk = [r for r in rig.ari.requests if r[0] == "set_variable"]
    assert talk == [("set_variable", CALLER, "TALK_DETECT(set)", f"100,{call.voice.talk.threshold.value}")], \
        "barge-in goes on too (deaf to the echo of the rest of the greeting)"
    assert call.voice.talk.threshold.value > 256
    rig.playback_done(call)
    rig.advance(0.3)
    assert call.state == "listening"
    quiet_caller_turn(rig)
    rig.advance(0.1)
    assert [r for r in rig.ari.requests if r[0] == "play"][1:], "the answer is a file as well"
    rig.playback_done(call)
    rig.advance(0.3)
    assert rig.files() == [] and call.state == "listening"


def test_a_long_wait_goes_on_with_soft_pips_after_the_filler_until_the_answer(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path)
    call.provider.think_ms = 4500  # shared models busy with other calls: the answer takes 5 s
    quiet_caller_turn(rig)
    before = len(rig.udp.written)
    rig.advance(5.5)
    sent = payloads(rig, before)
    filler, pips = frames_of(filler_phrase()), frames_of(comfort_tone())
    reply = frames_of(call.provider.voice.render(call.conversation[-1][1]))
    start = sent.index(reply[0])
    assert sent[:len(filler)] == filler, "the filler first"
    waiting = sent[len(filler):start]
    assert len(waiting) > len(pips), "then the pips, again and again"
    assert waiting == (pips * 3)[:len(waiting)], "nothing but the pips, from their start"
    assert sent[start:start + 20] == reply[:20], "and the answer the moment it is ready"
    assert rig.engine.counters["fillers"] == 1, "one slow turn"


def test_a_barge_in_reports_only_the_utterance_it_cut_off(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path, BARGE_IN_DUCK_DB="0")  # the frames on the wire as they were made
    greeting_id = f"{CALLER}-1"
    before = len(rig.udp.written)
    quiet_caller_turn(rig)
    rig.advance(0.3)
    assert call.state == "speaking"
    rig.speak(160)
    assert call.barge_ins and call.state == "listening"
    answer = frames_of(call.provider.voice.render(call.conversation[-1][1]))
    sent = payloads(rig, before)
    on_wire = sent[sent.index(answer[0]):]
    assert on_wire == answer[:len(on_wire)] and 15 < len(on_wire) < len(answer), "the answer was cut off"
    report = call.provider.interruptions[-1]
    assert list(report) == [f"{CALLER}-2"], f"the greeting ({greeting_id}) played out long ago: not cut off"
    assert report[f"{CALLER}-2"] == len(on_wire) * 20, "told exactly what went on the wire of the answer"


def test_a_sentence_with_a_pause_is_one_caller_turn_in_the_transcript(tmp_path: Path) -> None:
    rig, call = stream_rig(tmp_path)
    call.provider.think_ms = 1000
    quiet_caller_turn(rig)  # "What time do you open" ... a pause long enough to end the turn
    assert call.state == "thinking"
    call.transcript("What time do you open", True)  # as a provider that transcribes at once does
    rig.speak(400)  # "... on Sundays?" before any answer was heard
    assert call.state == "listening"
    call.transcript("on Sundays?", True)
    assert [text for speaker, text in call.conversation if speaker == "caller"] == [
        "What time do you open on Sundays?"]
    call.transcript("Thanks.", True)
    assert [text for speaker, text in call.conversation if speaker == "caller"][-1] == "Thanks.", "a new turn"


def test_stream_mode_ducks_the_agent_from_the_callers_first_syllable_and_a_backchannel_lifts_it(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream", CONTEXT_DEFAULT_GREETING="Hello and welcome to the bakery, "
                                                                           "how can we help you today?")
    call = rig.answered_call()
    rig.advance(0.4)
    rig.speak(60)  # "mm": three frames of voice, under BARGE_IN_MIN_MS
    assert call.session.gain == pytest.approx(10 ** (-12 / 20)), "ducked 12 dB at once"
    rig.speak(160, loud=False)
    assert call.session.gain == 1.0 and not call.barge_ins, "a backchannel: full level again, no interruption"
    rig.advance(4)
    voice = call.provider.voice.render(call.context.greeting)
    greeting = frames_of(voice)
    sent = payloads(rig)
    sent = sent[sent.index(greeting[0]):]
    expected = greeting
    assert len(sent) == len(greeting), "nothing dropped, nothing added"
    ducked = [n for n, (got, want) in enumerate(zip(sent, expected, strict=True)) if got != want]
    assert ducked and ducked[-1] - ducked[0] < 10, "one short stretch"
    for n in range(ducked[0], ducked[-1] + 1):  # (silence between the tone voice's words stays silence)
        pcm = np.frombuffer(voice[n * 320:(n + 1) * 320].ljust(320, b"\x00"), dtype="<i2")
        assert sent[n] == ulaw_encode((pcm * 10 ** (-12 / 20)).astype("<i2").tobytes()), "12 dB down"
    assert rig.engine.counters["ducks"] == 1 and rig.engine.counters["backchannels"] == 1


def test_ducking_can_be_switched_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DOWNSTREAM_MODE="stream", BARGE_IN_DUCK_DB="0")
    call = rig.answered_call()
    rig.advance(0.3)
    rig.speak(60)
    assert call.session.gain == 1.0 and rig.engine.counters["ducks"] == 0
