"""The person on the phone: speaks into the call in real time and records what they hear.

A :class:`SimulatedCaller` is handed out by ``AsteriskSimulator.originate``. Speech given to
:meth:`~SimulatedCaller.say` is cut into 20 ms frames (the last one may be shorter) and sent one
per 20 ms tick into the caller's channel; the bridge relays it to the ExternalMedia leg. With
``idle="silent"`` nothing is sent between utterances, which is what Asterisk forwards for a
Local channel (PROTOCOLS §6); with ``idle="silence_frames"`` the phone keeps sending silence,
like a SIP phone without VAD, from answer to hang-up. TALK_DETECT measures the frames the phone
sends, as Asterisk reads them (sim/talkdetect.py): a silent phone ends no talk.
"""

from __future__ import annotations

import wave
from collections import deque
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from twisted_agent.media.interfaces import FRAME_BYTES, FRAME_SECONDS, SAMPLE_RATE
from twisted_agent.sim.heard import HeardTrack
from twisted_agent.sim.line import LineEcho, LineNoise, mix
from twisted_agent.sim.talkdetect import TalkDetect

if TYPE_CHECKING:
    from twisted_agent.sim.control import Timers
    from twisted_agent.sim.model import Channel

__all__ = ["IDLE_MODES", "CallerHost", "SimulatedCaller"]

IDLE_MODES = ("silent", "silence_frames")
_SILENCE = bytes(FRAME_BYTES)
_DTMF_DIGITS = frozenset("0123456789ABCD*#")
#: most frames one late tick may catch up on (a reactor stall longer than this is not replayed)
_MAX_CATCH_UP = 10


class CallerHost(Protocol):
    """What the caller needs from the simulated PBX."""

    timers: Timers

    def caller_audio(self, channel: Channel, pcm: bytes) -> None: ...

    def caller_dtmf(self, channel: Channel, digit: str, duration_ms: int) -> None: ...

    def caller_hangup(self, channel: Channel) -> Deferred[None]: ...

    def caller_talking(self, channel: Channel, talking: bool, duration_ms: int) -> None: ...


class SimulatedCaller:
    """One simulated call from the caller's side. Create it with ``AsteriskSimulator.originate``."""

    def __init__(self, host: CallerHost, channel: Channel, idle: str = "silent") -> None:
        if idle not in IDLE_MODES:
            raise ValueError(f"idle must be one of {IDLE_MODES}, got {idle!r}")
        self._host = host
        self._timers = host.timers
        self.channel = channel
        self.channel_id = channel.id
        self.idle = idle
        self.answered: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self.end_reason: str | None = None
        self.dialplan_continued = False
        self.continued_to: tuple[str, str, int] | None = None
        self.redirected_to: str | None = None
        #: digits the agent sent with POST /channels/{id}/dtmf
        self.dtmf_heard: list[str] = []
        self.frames_sent = 0
        self._track = HeardTrack()
        self._speech: deque[tuple[bytearray, Deferred[None]]] = deque()
        self._mouth: LoopingCall | None = None
        #: TALK_DETECT on this caller's channel (sim/talkdetect.py), fed what Asterisk reads from the phone
        self._talk = TalkDetect()
        #: an imperfect line (see :meth:`line`): echo of what the caller hears, and noise
        self.echo: LineEcho | None = None
        self.noise: LineNoise | None = None

    # -- speaking ---------------------------------------------------------------------------------

    def say(self, pcm: bytes) -> Deferred[None]:
        """Stream 8 kHz s16le ``pcm`` into the call in real time; fires once its last frame is sent."""
        if len(pcm) % 2:
            raise ValueError(f"PCM must be whole 16-bit samples, got {len(pcm)} bytes")
        done: Deferred[None] = Deferred()
        if self.end_reason is not None or not pcm:
            done.callback(None)
            return done
        self._speech.append((bytearray(pcm), done))
        self._start_mouth()
        return done

    def line(self, echo: LineEcho | None = None, noise: LineNoise | None = None) -> None:
        """Make the line imperfect: what the caller hears comes back (``echo``) and/or noise is
        added; the phone then sends a frame every 20 ms from answer to hang-up, as a real line
        carries echo and noise whether the caller speaks or not."""
        self.echo, self.noise = echo, noise
        if self.channel.state == "Up":
            self._start_mouth()

    def _start_mouth(self) -> None:
        if self._mouth is None and self.end_reason is None:
            self._mouth = self._timers.loop(FRAME_SECONDS, self._tick)

    def _stop_mouth(self) -> None:
        self._timers.stop_loop(self._mouth)
        self._mouth = None

    def _tick(self, count: int) -> None:
        for _ in range(min(count, _MAX_CATCH_UP)):
            line = self.echo is not None or self.noise is not None
            if self._speech:
                buffer, done = self._speech[0]
                frame = bytes(buffer[:FRAME_BYTES])
                del buffer[:FRAME_BYTES]
                self._send(self._through_line(frame) if line else frame)
                if not buffer:
                    self._speech.popleft()
                    done.callback(None)
            elif (self.idle == "silence_frames" or line) and self.channel.state == "Up":
                self._send(self._through_line(_SILENCE) if line else _SILENCE)
            else:
                self._stop_mouth()
                return
            if self.end_reason is not None:
                return

    def _through_line(self, frame: bytes) -> bytes:
        samples = len(frame) // 2
        parts = []
        if self.echo is not None:
            parts.append(self.echo.take(self._timers.seconds(), samples))
        if self.noise is not None:
            parts.append(self.noise.take(samples))
        return mix(frame, *parts)

    def _send(self, frame: bytes) -> None:
        self.frames_sent += 1
        self._detect_talking(frame)
        self._host.caller_audio(self.channel, frame)

    # -- TALK_DETECT (func_talkdetect.c): on every frame read, Finished after silence_ms of silent frames -----

    def _detect_talking(self, frame: bytes) -> None:
        settings = self.channel.talk_detect
        if settings is None:
            self._talk.reset()
            return
        silence_ms, threshold = settings
        said = self._talk.frame(frame, self._timers.seconds(), silence_ms, threshold, self.channel.format)
        if said is not None and self.end_reason is None:
            self._host.caller_talking(self.channel, said[0] == "ChannelTalkingStarted", said[1])

    # -- keys and hang-up -----------------------------------------------------------------------------

    def send_dtmf(self, digit: str, duration_ms: int = 100) -> None:
        """Press a key; ``ChannelDtmfReceived`` arrives when the key is released (after ``duration_ms``)."""
        if len(digit) != 1 or digit.upper() not in _DTMF_DIGITS:
            raise ValueError(f"DTMF digit must be one of 0-9 A-D * #, got {digit!r}")
        self._timers.later(duration_ms / 1000, self._host.caller_dtmf, self.channel, digit.upper(), duration_ms)

    def hangup(self) -> Deferred[None]:
        """The caller hangs up; fires once Asterisk has destroyed the channel."""
        if self.end_reason is not None:
            done: Deferred[None] = Deferred()
            done.callback(None)
            return done
        return self._host.caller_hangup(self.channel)

    # -- what the PBX tells the caller ---------------------------------------------------------------

    def on_answered(self) -> None:
        now = self._timers.seconds()
        self._track.start(now)
        if not self.answered.called:
            self.answered.callback(None)
        if self.idle == "silence_frames" or self.echo is not None or self.noise is not None:
            self._start_mouth()

    def on_ended(self, reason: str) -> None:
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._track.stop(self._timers.seconds())
        self._stop_mouth()
        while self._speech:
            _, done = self._speech.popleft()
            done.callback(None)
        self.ended.callback(reason)

    def hear_stream(self, key: str, pcm: bytes, label: str) -> None:
        now = self._timers.seconds()
        self._track.hear_stream(key, pcm, now, label)
        if self.echo is not None:
            self.echo.heard(pcm, now)

    def playback_position(self) -> int:
        """Where a file starting to play now lands on the heard track."""
        return self._track.position(self._timers.seconds())

    def hear_at(self, position: int, pcm: bytes, label: str) -> None:
        self._track.hear_at(position, pcm, label)
        if self.echo is not None:
            self.echo.heard(pcm, self._timers.seconds())  # a file played to the caller echoes like any sound

    # -- what the caller heard -------------------------------------------------------------------------

    def heard(self) -> bytes:
        """Everything heard since answer, 8 kHz s16le, silence where nothing was heard."""
        return self._track.pcm(self._timers.seconds())

    def heard_segments(self) -> list[tuple[float, float, str]]:
        """``(start_s, end_s, source)`` relative to answer: ``rtp``, ``audiosocket`` or ``playback:<id>``."""
        return self._track.segments(self._timers.seconds())

    def first_heard_at(self) -> float | None:
        """Reactor time the first non-silent audio reached the caller."""
        return self._track.first_heard_at

    @property
    def answered_at(self) -> float | None:
        return self._track.origin

    @property
    def overflow_dropped(self) -> int:
        """Agent frames dropped because they arrived more than 200 ms ahead of playout."""
        return self._track.overflow_dropped

    def write_wav(self, path: str) -> None:
        """:meth:`heard` as a WAV file: 8 kHz, mono, 16-bit."""
        with wave.open(path, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(self.heard())
