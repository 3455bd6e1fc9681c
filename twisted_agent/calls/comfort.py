"""What the caller hears instead of dead air: the filler, the comfort tone, the ringback.

All three are plain 8 kHz PCM made once per engine: the filler phrase is a recording (so it plays
whatever the provider, even while its TTS is busy with the reply it stands in for), the tones are
generated. A call plays them through its player like any agent audio, under utterance ids of their
own (:func:`is_comfort`), and drops them the moment real audio is ready (:class:`ComfortSounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_agent.calls.timer import Timer
from twisted_agent.media.codecs import resample, ulaw_decode
from twisted_agent.media.wav import parse_wav

RATE = 8000
COMFORT_PREFIX = "comfort-"


def is_comfort(utterance_id: str) -> bool:
    return utterance_id.startswith(COMFORT_PREFIX)


def _tone(frequencies: tuple[float, ...], on_ms: int, off_ms: int, cycles: int, dbfs: float) -> bytes:
    """``cycles`` of ``on_ms`` of the summed sines then ``off_ms`` of silence, 10 ms ramps (no clicks)."""
    on = RATE * on_ms // 1000
    t = np.arange(on) / RATE
    wave = sum(np.sin(2 * np.pi * f * t) for f in frequencies) / len(frequencies)
    ramp = min(on // 2, RATE // 100)
    envelope = np.ones(on)
    envelope[:ramp] = np.linspace(0, 1, ramp)
    envelope[on - ramp:] = np.linspace(1, 0, ramp)
    burst = (wave * envelope * 32767 * 10 ** (dbfs / 20)).astype("<i2").tobytes()
    return (burst + bytes(RATE * off_ms // 1000 * 2)) * cycles


def comfort_tone() -> bytes:
    """Two soft 440 Hz pips a second apart, -24 dBFS: "still working", not a ring or a busy signal."""
    return _tone((440.0,), 150, 850, 2, -24.0)


def ringback_tone(seconds: float = 30.0) -> bytes:
    """North American ringback (ITU-T E.180: 440 + 480 Hz, 2 s on, 4 s off), -16 dBFS."""
    return _tone((440.0, 480.0), 2000, 4000, max(1, int(seconds // 6) + 1), -16.0)


def filler_phrase() -> bytes:
    """The recorded "One moment, please." (Piper en_US joe, 8 kHz μ-law, in the package)."""
    return ulaw_decode(resources.files("twisted_agent").joinpath("sounds/one-moment.ulaw").read_bytes())


def load_filler(choice: str) -> bytes:
    """The filler FILLER names, as 8 kHz PCM (empty for none). A path was checked at config load."""
    if choice == "none":
        return b""
    if choice == "tone":
        return comfort_tone()
    if choice == "phrase":
        return filler_phrase()
    with open(choice, "rb") as stream:
        pcm, rate = parse_wav(stream.read())
    return resample(pcm, rate, RATE) if rate != RATE else pcm


class ComfortSounds:
    """What one call plays while the caller waits: the ringback before the greeting, the filler
    FILLER_MS after the caller stopped when the answer is not ready, then soft pips until it is.

    The call says when a turn starts waiting for its answer (:meth:`turn_started`), when real audio
    is ready (:meth:`stop`) and when its player ran dry (:meth:`played_out`); ``waiting()`` says
    whether the answer is still awaited. While a sound plays, and for ``guard_s`` after it played
    out (its echo tail), :attr:`playing` is true: the caller's audio is gated.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, call_id: str, *, filler: bytes, pips: bytes, filler_ms: int,
                 guard_s: float, player: Callable[[], Any], play: Callable[[bytes, int, str], None],
                 waiting: Callable[[], bool], on_filler: Callable[[], None]) -> None:
        self._clock = clock
        self.call_id = call_id
        self._filler = filler
        self._pips = pips
        self._filler_ms = filler_ms
        self._guard_s = guard_s
        self._player = player
        self._play = play
        self._waiting = waiting
        self._on_filler = on_filler
        #: the sound playing now (an utterance id of its own), and until when its echo tail gates the caller
        self.utterance_id: str | None = None
        self._count = 0
        self._until = 0.0
        self._filler_timer = Timer(clock)
        #: reactor times the filler started playing, one per slow turn
        self.fillers: list[float] = []

    @property
    def playing(self) -> bool:
        """A sound is playing (or its echo tail is still coming back)."""
        return self.utterance_id is not None or self._clock.seconds() < self._until

    def start(self, pcm: bytes, kind: str) -> None:
        if self._player() is None or not pcm:
            return
        self._count += 1
        self.utterance_id = f"{COMFORT_PREFIX}{kind}-{self._count}"
        self._play(pcm, RATE, self.utterance_id)

    def turn_started(self, since_speech_end: float) -> None:
        """The answer is awaited: the filler is due FILLER_MS after the caller stopped speaking."""
        if self._filler_ms and self._filler:
            self._filler_timer.start(max(0.0, self._filler_ms / 1000 - since_speech_end), self._filler_due)

    def cancel_filler(self) -> None:
        self._filler_timer.cancel()

    def _filler_due(self) -> None:
        if self._waiting() and self.utterance_id is None:
            self.fillers.append(self._clock.seconds())
            self._on_filler()
            self.start(self._filler, "filler")

    def stop(self) -> None:
        """Real audio is ready: the sound stops now (what is queued of it is dropped)."""
        comfort, self.utterance_id = self.utterance_id, None
        player = self._player()
        if comfort is None or player is None:
            return
        self._until = 0.0
        player.drop(comfort).addErrback(
            lambda f: self.log.failure("call {call_id}: stopping the filler failed", f, call_id=self.call_id))

    def forget(self) -> None:
        """The player that played the sound stopped everything (barge-in) or was replaced."""
        self.utterance_id = None

    def played_out(self) -> None:
        """The player ran dry: a sound that was playing has been heard to its end."""
        player = self._player()
        if self.utterance_id is None or player is None or not player.idle:
            return
        self.utterance_id = None
        if self._waiting() and self._pips:
            # the filler played out and the answer is still not ready: soft pips until it is
            self.start(self._pips, "tone")
        else:
            # its echo tail still gates the caller for a moment
            self._until = self._clock.seconds() + self._guard_s
