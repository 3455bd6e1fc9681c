"""Interruptions on task.Clock with a fake session and players: the agent's voice ducks under the caller's,
comes back after a backchannel, stops for a barge-in; in file mode the file pauses for Asterisk's talk
detection and resumes only on a backchannel or when the media leg heard nothing of the caller (never on
ChannelTalkingFinished while the detector hears them), or the talk is confirmed as an interruption."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twisted_agent.calls.interruptions import JUDGE_FRAMES, Interruptions
from twisted_agent.calls.playback import FilePlayer, StreamPlayer


class Detector:
    last_voiced_at: float | None = None


class Echo:
    def __init__(self) -> None:
        self.caller = True  # what the echo check says of a voiced frame
        self.judged: list[bytes] = []

    def is_caller(self, pcm: bytes, now: float) -> bool:
        self.judged.append(pcm)
        return self.caller


class Session:
    def __init__(self) -> None:
        self.detector, self.echo, self.gain = Detector(), Echo(), 1.0


class Streaming(StreamPlayer):
    def __init__(self) -> None:  # (no media session behind it)
        pass


class Files(FilePlayer):
    def __init__(self) -> None:  # (no ARI behind it)
        self.paused = False
        self.resumed = 0
        self.done: list[str] = []  # what happened to the reply, in order

    def pause(self) -> Deferred[None]:
        self.paused = True
        self.done.append("pause")
        return succeed(None)

    def resume(self) -> None:
        self.paused = False
        self.resumed += 1
        self.done.append("resume")


class Rig:
    def __init__(self, player: Any, barge_in: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(10)
        self.session, self.player, self.frames = Session(), player, 0
        self.counts: Counter[str] = Counter()
        self.confirmed = 0
        self.interruptions = Interruptions(
            self.clock, "c1", min_ms=120, duck_db=12.0, barge_in=barge_in, session=lambda: self.session,
            player=lambda: self.player, frames_heard=lambda: self.frames,
            count=lambda what: self.counts.update([what]), confirmed=self.confirm)

    def confirm(self) -> None:
        self.confirmed += 1

    def frame(self, voiced: bool, n: int = 1) -> list[bool]:
        """``n`` caller frames 20 ms apart, the VAD's verdict on each given; what frame() said of each."""
        said = []
        for _ in range(n):
            self.clock.advance(0.02)
            self.frames += 1
            if voiced:
                self.session.detector.last_voiced_at = self.clock.seconds()
            said.append(self.interruptions.frame(bytes([self.frames % 256]) * 320))
        return said


def count(rig: Rig, what: str) -> int:
    return rig.counts[what]


def make(player: Any) -> Rig:
    return Rig(player)


def test_the_caller_talking_over_a_stream_ducks_it_then_takes_the_floor_from_their_first_syllable() -> None:
    rig = make(Streaming())
    rig.frame(False, 3)
    assert rig.session.gain == 1.0
    said = rig.frame(True, 5)
    assert said == [False] * 5 and abs(rig.session.gain - 10 ** (-12 / 20)) < 1e-9 and count(rig, "ducks") == 1
    assert rig.frame(True) == [True], "120 ms of the caller's voice: interrupt"
    frames = rig.interruptions.caller_took_floor()
    assert [f[0] for f in frames] == [4, 5, 6, 7, 8, 9], "the frames from the onset, nothing before"
    assert rig.session.gain == 1.0 and not rig.interruptions.detector.armed


def test_the_agents_own_echo_never_interrupts_nor_ducks() -> None:
    rig = make(Streaming())
    rig.session.echo.caller = False
    assert rig.frame(True, 50) == [False] * 50
    assert rig.session.gain == 1.0 and count(rig, "ducks") == 0


def test_a_backchannel_brings_the_voice_back() -> None:
    rig = make(Streaming())
    rig.frame(True, 3)
    assert rig.session.gain < 1.0
    rig.frame(False, 6)
    assert rig.session.gain == 1.0 and count(rig, "backchannels") == 1


def test_without_frames_the_clock_ends_a_backchannel_and_the_end_of_the_reply_hands_over_what_was_heard() -> None:
    rig = make(Streaming())
    rig.frame(True, 2)
    rig.clock.advance(0.2)  # a silent Local channel sends nothing
    rig.interruptions.voice_stopped()
    assert count(rig, "backchannels") == 1 and rig.session.gain == 1.0
    assert rig.interruptions.agent_done() is None, "nobody speaking: no turn to start"
    rig.frame(True, 2)
    frames = rig.interruptions.agent_done()
    assert frames is not None and len(frames) == 2 and rig.session.gain == 1.0


def test_ducking_is_for_streams_only() -> None:
    rig = make(Files())
    rig.frame(True, 3)
    assert rig.session.gain == 1.0 and count(rig, "ducks") == 0


def test_talk_over_a_file_pauses_it_and_a_short_talk_resumes_it() -> None:
    player = Files()
    rig = make(player)
    rig.frames = 40
    rig.interruptions.talk_started()
    assert player.paused and rig.interruptions.paused_at == 40
    rig.interruptions.talk_started()  # Asterisk says it again: one pause, one confirmation pending
    rig.interruptions.talk_finished(60)
    assert not player.paused and player.resumed == 1 and count(rig, "backchannels") == 1
    rig.clock.advance(1)
    assert rig.confirmed == 0


def test_talk_still_going_with_nothing_on_the_media_leg_is_an_interruption() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.clock.advance(0.219)
    assert rig.confirmed == 0
    rig.clock.advance(0.002)  # BARGE_IN_MIN_MS + SILENCE_MS
    assert rig.confirmed == 1 and player.paused


def test_when_the_callers_audio_reached_us_the_detector_judges_not_asterisk() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.session.echo.caller = False  # what came was the agent's echo
    rig.frame(True, 50)
    assert rig.confirmed == 0 and player.paused
    rig.interruptions.talk_finished(1000)
    rig.frame(True, JUDGE_FRAMES - 1)
    assert player.paused, "the VAD is given its frames to find the caller's voice"
    rig.frame(True)
    assert not player.paused and count(rig, "backchannels") == 1, "the reply goes on from where it paused"


def test_asterisks_talk_finished_does_not_resume_a_file_while_the_media_leg_hears_the_caller() -> None:
    """Issue 15: the caller's loud first syllable crosses Asterisk's threshold, their quieter
    speech does not; ChannelTalkingFinished comes ~100 ms after ChannelTalkingStarted while their
    voice reaches the media leg, and must not resume the reply."""
    player = Files()
    rig = make(player)
    rig.frames = 40
    rig.interruptions.talk_started()  # the first syllable
    said = rig.frame(True, 5)  # their voice on the media leg once the file is paused
    rig.interruptions.talk_finished(20)  # 100 ms after Started: the quieter speech is under the threshold
    said += rig.frame(True)
    assert said == [False] * 5 + [True], "the barge-in at BARGE_IN_MIN_MS (120 ms) of the caller's voice"
    assert player.done == ["pause"] and count(rig, "backchannels") == 0, "never resumed"
    frames = rig.interruptions.caller_took_floor()
    assert [f[0] for f in frames] == [41, 42, 43, 44, 45, 46], "their turn from the first frame after the pause"
    rig.clock.advance(1)
    assert rig.confirmed == 0 and player.done == ["pause"]


def test_a_backchannel_judged_on_the_media_leg_resumes_the_file_after_asterisks_talk_finished() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.frame(True, 3)  # "mm"
    rig.interruptions.talk_finished(60)
    assert player.done == ["pause"], "the detector is still hearing the caller"
    said = rig.frame(False, 5)
    assert said == [False] * 5 and player.done == ["pause", "resume"], \
        "resumed when the detector judged the voice stopped too soon (its 100 ms gap), not at Finished"
    assert count(rig, "backchannels") == 1 and rig.interruptions.paused_at is None


def test_a_file_resumes_after_talk_finished_when_the_media_leg_heard_nothing_of_the_caller() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.frame(False, 4)  # a cough: loud, no voice
    rig.interruptions.talk_finished(40)
    rig.frame(False, JUDGE_FRAMES - 1)
    assert player.done == ["pause"], "not before the VAD judged the frames after Finished"
    rig.frame(False)
    assert player.done == ["pause", "resume"] and count(rig, "backchannels") == 1


def test_a_voice_onset_the_vad_finds_late_is_judged_by_the_detector_not_resumed() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.frame(False, 3)  # the caller's quieter speech, its onset not yet found (Silero's confirmation lags)
    rig.interruptions.talk_finished(40)
    said = rig.frame(False, 2) + rig.frame(True, 6)
    assert said == [False] * 7 + [True] and player.done == ["pause"], "a barge-in, never resumed"


def test_when_the_media_leg_goes_quiet_the_clock_ends_what_the_detector_heard() -> None:
    """A Local channel sends nothing while the caller is silent (and Asterisk, reading nothing, sends
    no ChannelTalkingFinished either): the detector's gap on the clock decides."""
    for voiced in (True, False):
        player = Files()
        rig = make(player)
        rig.interruptions.talk_started()
        rig.frame(voiced, 2)
        if voiced:
            rig.interruptions.talk_finished(40)
        rig.clock.advance(0.119)
        assert player.done == ["pause"], voiced
        rig.clock.advance(0.002)  # the detector's 100 ms gap and a frame
        assert player.done == ["pause", "resume"] and count(rig, "backchannels") == 1, voiced
        rig.clock.advance(1)
        assert rig.confirmed == 0 and player.done == ["pause", "resume"], voiced


def test_talk_again_after_finished_keeps_the_file_paused_for_the_detector() -> None:
    player = Files()
    rig = make(player)
    rig.interruptions.talk_started()
    rig.frame(False, 3)
    rig.interruptions.talk_finished(40)
    rig.frame(False, 2)
    rig.interruptions.talk_started()  # another loud syllable: Asterisk's talk is not over
    rig.frame(False, JUDGE_FRAMES)
    assert player.done == ["pause"] and rig.confirmed == 0
    rig.interruptions.talk_finished(40)
    rig.frame(False, JUDGE_FRAMES)
    assert player.done == ["pause", "resume"]


def test_a_barge_in_or_the_end_of_the_call_cancels_the_pending_confirmation() -> None:
    for finish in ("caller_took_floor", "close"):
        rig = make(Files())
        rig.interruptions.talk_started()
        getattr(rig.interruptions, finish)()
        rig.clock.advance(1)
        assert rig.confirmed == 0, finish
    streaming = make(Streaming())
    streaming.interruptions.talk_started()
    streaming.clock.advance(1)
    assert streaming.confirmed == 0, "a stream is never paused for Asterisk's talk detection"


# --- what a cloud agent hears while the agent speaks -------------------------------------------------


def cloud(rig: Rig, verdicts: list[bool], floor: bool = True) -> list[bytes]:
    """Caller frames 1, 2, ... sent on to a cloud agent; the echo check says ``verdicts`` of them."""
    sent = []
    for verdict in verdicts:
        rig.clock.advance(0.02)
        rig.frames += 1
        rig.session.echo.caller = verdict
        sent.append(rig.interruptions.for_cloud(bytes([rig.frames]) * 320, floor))
    return sent


def test_a_cloud_agent_hears_silence_for_its_echo_and_the_caller_over_it() -> None:
    rig = make(Streaming())
    sent = cloud(rig, [False] * 5 + [True] + [False] * 12)
    silence = bytes(320)
    assert sent[:5] == [silence] * 5, "the agent's echo: silence, so the cloud agent cannot take it for the caller"
    assert [f[0] for f in sent[5:16]] == list(range(6, 17)), \
        "the caller, and 200 ms after them unjudged (a syllable taken for echo does not chop their speech)"
    assert sent[16:] == [silence] * 2, "then judged again"
    assert rig.session.echo.judged[5] == bytes([5]) * 320 + bytes([6]) * 320, "40 ms judged: the last two frames"
    assert rig.interruptions.cloud_suppressed == 7


def test_a_cloud_agent_hears_everything_when_the_agent_is_quiet_or_plays_files() -> None:
    rig = make(Streaming())
    assert [f[0] for f in cloud(rig, [False] * 3, floor=False)] == [1, 2, 3]
    rig = make(Files())
    assert [f[0] for f in cloud(rig, [False] * 3)] == [1, 2, 3], "file mode: Asterisk keeps the caller off"
    assert rig.session.echo.judged == [] and rig.interruptions.cloud_suppressed == 0


def test_without_barge_in_a_cloud_agent_hears_silence_while_the_agent_speaks() -> None:
    for player in (Streaming(), Files()):  # files: between two of them Asterisk passes the caller on
        rig = Rig(player, barge_in=False)
        assert cloud(rig, [True] * 4) == [bytes(320)] * 4
        assert [f[0] for f in cloud(rig, [True] * 2, floor=False)] == [5, 6]
