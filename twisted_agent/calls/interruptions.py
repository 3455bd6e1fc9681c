"""Caller speech while the agent has the floor: its echo, a backchannel, or an interruption.

The call hands over every caller frame that arrives while the agent has the floor (:meth:`frame`).
Each is judged voice or not (the VAD's verdict, then media/echo.py: not the agent's own voice coming
back) and fed to the barge-in detector (calls/bargein.py). While the detector hears the caller, the
agent's streamed voice is ducked; when the caller stops too soon it comes back (a backchannel);
when the caller goes on, :meth:`frame` says the barge-in is due and the call hands them the floor.

File mode adds Asterisk's talk detection (calls/talkdetect.py): on ``ChannelTalkingStarted`` the
file is paused at once so the caller's voice reaches the media leg and is judged as above. Once the
media leg carries the caller's audio, what it hears decides, not Asterisk: the file resumes from
where it stopped only when the detector judged a backchannel, or when the media leg heard nothing
of the caller (no frame of the caller's voice since the pause, the VAD given
:data:`JUDGE_FRAMES` more frames after ``ChannelTalkingFinished`` to judge an onset). Talk
detection's threshold sits just under the agent's loudest audio, so only the caller's loud
syllables cross it: a ``ChannelTalkingFinished`` ~100 ms after the first syllable, while the caller
goes on more quietly, never resumes the file while the detector hears them (resumed, the file
kept the caller's voice from the media leg: on a real Asterisk the reply stopped only at the next
loud syllable, 980 ms after the caller began). When no audio reaches the media leg at all,
Asterisk's own measure decides: talk still going ``BARGE_IN_MIN_MS + SILENCE_MS`` after it started
is an interruption (``confirmed``), a ``ChannelTalkingFinished`` before that resumes the file.

A cloud voice agent (Deepgram, OpenAI Realtime) finds the caller's speech itself, in the audio it
is sent, and interrupts itself when it hears any; it would hear the agent's own voice coming back
on the line too, and take it for the caller. So while the agent's streamed voice has the floor,
:meth:`for_cloud` judges each caller frame the same way (media/echo.py) and sends silence in place
of the agent's echo and of line noise, as an echo canceller's non-linear processor does; the
caller's voice passes, and for :data:`CLOUD_HANGOVER_FRAMES` after it every frame passes unjudged,
so a syllable taken for echo (a few per cent of the caller's frames over the echo) does not chop
their speech. With ``BARGE_IN=off`` the cloud agent hears silence while the agent has the floor, as
the local pipeline's gate hears nothing: the caller cannot interrupt it.

Plain logic on a clock; the call owns the session, the player and the state machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_agent.calls.bargein import BargeInDetector
from twisted_agent.calls.playback import FilePlayer, StreamPlayer
from twisted_agent.calls.talkdetect import SILENCE_MS as TALK_SILENCE_MS
from twisted_agent.calls.timer import Timer
from twisted_agent.media.interfaces import FRAME_MS

#: the VAD judged a frame just before the call hands it over: voiced if its last voiced frame is this one
_SAME_FRAME_S = 0.015
#: after a frame judged the caller's, this many go to a cloud agent unjudged (200 ms: double talk)
CLOUD_HANGOVER_FRAMES = 10
#: frames the VAD is given after Asterisk's talk ended to find a voice onset in the caller's audio
#: (webrtcvad judges a frame as it comes; Silero's confirmation comes ~80 ms later: media/vad.py)
JUDGE_FRAMES = 5


@dataclass
class _Paused:
    """The file is paused for the caller's talk."""

    #: the count of inbound frames at the pause (more since: the media leg carries the caller's audio)
    at: int
    #: the count when Asterisk said the talk finished and the detector was not hearing the caller
    talk_over_at: int | None = None


class Interruptions:
    log = Logger()

    def __init__(self, clock: IReactorTime, call_id: str, *, min_ms: int, duck_db: float, barge_in: bool,
                 session: Callable[[], Any], player: Callable[[], Any], frames_heard: Callable[[], int],
                 count: Callable[[str], None], confirmed: Callable[[], None]) -> None:
        self._clock = clock
        self.call_id = call_id
        self.detector = BargeInDetector(min_ms)
        self._min_ms = min_ms
        self._duck_gain = 10 ** (-duck_db / 20)
        self._session = session
        self._player = player
        self._frames_heard = frames_heard
        self._count = count
        self._confirmed = confirmed
        self._barge_in = barge_in
        #: for_cloud(): the previous caller frame (the judge looks at 40 ms), frames still passing unjudged
        self._cloud_previous = b""
        self._cloud_hangover = 0
        self._cloud_silence = b""  # what goes in place of a frame (made once: this runs for every frame)
        #: caller frames a cloud agent got as silence while the agent had the floor (echo, noise)
        self.cloud_suppressed = 0
        self._paused: _Paused | None = None
        self._talk_timer = Timer(clock)
        #: while paused: no frame came for the detector's gap, the media leg went quiet
        self._quiet_timer = Timer(clock)

    # --- stream mode (and file mode once the file is paused) -------------------------------------

    def frame(self, frame: bytes) -> bool:
        """A caller frame while the agent has the floor: True when the caller interrupts now."""
        now = self._clock.seconds()
        session = self._session()
        last_voiced = session.detector.last_voiced_at
        voice = last_voiced is not None and now - last_voiced < _SAME_FRAME_S
        if voice and not session.echo.is_caller(self.detector.recent(1) + frame, now):
            voice = False  # the agent's own voice coming back on the line, or line noise
        if self.detector.frame(frame, now, voice):
            self._backchannel()
        if self.detector.due():
            return True
        self.duck(self.detector.armed)
        if self._paused is not None:
            self._judged_while_paused()
        return False

    def for_cloud(self, frame: bytes, agent_has_floor: bool) -> bytes:
        """What a cloud agent is sent of a caller frame: the frame, or silence in place of the agent's
        echo (or noise) while its streamed voice has the floor."""
        previous, self._cloud_previous = self._cloud_previous, frame
        session = self._session()
        if not agent_has_floor or session is None:
            self._cloud_hangover = 0
            return frame
        if self._barge_in:
            if not isinstance(self._player(), StreamPlayer):
                return frame  # files: Asterisk keeps the caller off the media leg while one plays (no echo)
            if self._cloud_hangover > 0:
                self._cloud_hangover -= 1
                return frame
            if session.echo.is_caller(previous + frame, self._clock.seconds()):
                self._cloud_hangover = CLOUD_HANGOVER_FRAMES
                return frame
        self.cloud_suppressed += 1
        if len(self._cloud_silence) != len(frame):
            self._cloud_silence = bytes(len(frame))
        return self._cloud_silence

    def voice_stopped(self) -> None:
        """No frame may come to end the caller's voice (a silent Local channel): ask the clock."""
        if self.detector.expire(self._clock.seconds()):
            self._backchannel()

    def duck(self, duck: bool) -> None:
        """Stream mode: the caller may be interrupting: the agent's voice drops at once (and comes
        back if it was only a backchannel)."""
        session = self._session()
        if session is None:
            return
        gain = self._duck_gain if duck and isinstance(self._player(), StreamPlayer) else 1.0
        if session.gain != gain:
            session.gain = gain
            if duck:
                self._count("ducks")

    def _backchannel(self) -> None:
        """The caller's voice over the agent stopped too soon to interrupt: the agent goes on (from
        where it paused, in file mode)."""
        self.duck(False)
        if not self._resume():
            self._count("backchannels")

    def agent_done(self) -> list[bytes] | None:
        """The agent's reply is over: the caller's voice still being judged (the frames from its
        onset) starts their turn; None when there is none."""
        self.voice_stopped()
        self.duck(False)
        armed = self.detector.armed
        frames = self.detector.take()
        return frames if armed else None

    def caller_took_floor(self) -> list[bytes]:
        """The caller interrupts: the frames from their onset (their turn's start); all is reset."""
        frames = self.detector.take()
        self._talk_timer.cancel()
        self._quiet_timer.cancel()
        self._paused = None
        self.duck(False)
        return frames

    # --- file mode: Asterisk's talk detection -------------------------------------------------

    @property
    def paused_at(self) -> int | None:
        """The count of inbound frames when the file was paused for the caller's talk; None: not paused."""
        return self._paused.at if self._paused is not None else None

    def talk_started(self) -> None:
        """Asterisk heard the caller over a file: the file stops at once. Asterisk passes the caller's
        voice to the media leg only while no file plays, and the new turn must start with their
        first syllable."""
        player = self._player()
        if not isinstance(player, FilePlayer):
            return
        if not player.paused:
            self._paused = _Paused(self._frames_heard())
            player.pause().addErrback(
                lambda f: self.log.failure("call {call_id}: pausing the reply failed", f, call_id=self.call_id))
        elif self._paused is not None:
            self._paused.talk_over_at = None  # talk again (a louder syllable): Asterisk's talk is not over
        if not self._talk_timer.pending:
            self._talk_timer.start((self._min_ms + TALK_SILENCE_MS) / 1000, self._talk_confirmed)

    def talk_finished(self, duration_ms: int) -> None:
        """Asterisk's talk is over. It only measures the loud syllables, so once the caller's audio
        reaches the media leg, what the media leg hears decides whether the file goes on."""
        self._talk_timer.cancel()
        paused = self._paused
        if paused is None:
            return
        if self._frames_heard() == paused.at:
            if self._resume():  # the media leg carries nothing: Asterisk's measure decides
                self.log.debug("call {call_id}: {ms} ms of talk over the reply, none on the media leg: going on",
                               call_id=self.call_id, ms=duration_ms)
        elif self.detector.armed:
            self.log.debug("call {call_id}: Asterisk's talk is over after {ms} ms but the caller's voice is on "
                           "the media leg: the barge-in detector decides", call_id=self.call_id, ms=duration_ms)
        else:
            paused.talk_over_at = self._frames_heard()
            if not self._quiet_timer.pending:  # (restarted by every frame judged)
                self._quiet_timer.start(self.detector.gap_s + FRAME_MS / 1000, self._media_leg_quiet)
            self.log.debug("call {call_id}: Asterisk's talk is over after {ms} ms: going on unless the next "
                           "{frames} frames hold the caller's voice", call_id=self.call_id, ms=duration_ms,
                           frames=JUDGE_FRAMES)

    def _judged_while_paused(self) -> None:
        """A caller frame was judged while the file is paused for their talk."""
        paused = self._paused
        assert paused is not None
        over_at = paused.talk_over_at
        if not self.detector.armed and over_at is not None and self._frames_heard() - over_at >= JUDGE_FRAMES:
            self.log.debug("call {call_id}: no voice of the caller on the media leg: going on", call_id=self.call_id)
            self._resume()
            return
        # Asterisk sends nothing while a Local channel is silent (and then no ChannelTalkingFinished
        # either): the detector's gap with no frame ends what it hears, or shows there is nothing to hear
        self._quiet_timer.start(self.detector.gap_s + FRAME_MS / 1000, self._media_leg_quiet)

    def _media_leg_quiet(self) -> None:
        """No frame for longer than the detector's gap since the caller's audio reached the media leg."""
        if self.detector.expire(self._clock.seconds()):
            self._backchannel()
        elif self._paused is not None and not self.detector.armed:
            self.log.debug("call {call_id}: the media leg went quiet without the caller's voice: going on",
                           call_id=self.call_id)
            self._resume()

    def _resume(self) -> bool:
        """The talk that paused the file was not an interruption: play on (counted as a backchannel)."""
        player = self._player()
        if self._paused is None or not isinstance(player, FilePlayer) or not player.paused:
            return False
        self._paused = None
        self._quiet_timer.cancel()
        self._talk_timer.cancel()  # judged not an interruption, whatever Asterisk still measures
        self.detector.reset()  # the file suspends the caller again: no frame will end what it was judging
        self._count("backchannels")
        player.resume()
        return True

    def _talk_confirmed(self) -> None:
        """BARGE_IN_MIN_MS of talk by Asterisk's measure. When the caller's audio reached us since the
        pause, the detector has judged it (and not found a voice): Asterisk's measure is only for a
        media leg that carries nothing."""
        if self._paused is not None and self._frames_heard() > self._paused.at:
            return
        self._confirmed()

    def close(self) -> None:
        self._talk_timer.cancel()
        self._quiet_timer.cancel()
