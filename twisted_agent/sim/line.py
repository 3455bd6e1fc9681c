"""An imperfect telephone line: the caller's phone sends back part of what it hears, plus noise.

:class:`LineEcho` models hybrid or acoustic echo the way the barge-in work must survive it: what
the caller hears comes back on the inbound stream ``delay_ms`` later, band-limited to the
telephone band (a 101-tap windowed-sinc band-pass, 300-3400 Hz) and ``gain_db`` quieter.
:class:`LineNoise` adds white noise at a fixed level (dBFS, RMS). Both are plain signal logic; the
simulated caller mixes them into every frame it sends while either is on.
"""

from __future__ import annotations

import numpy as np

from twisted_agent.media.interfaces import SAMPLE_RATE

_TAPS = 101


def _band_pass(low: float, high: float) -> np.ndarray:
    n = np.arange(_TAPS) - (_TAPS - 1) / 2

    def low_pass(cutoff: float) -> np.ndarray:
        return 2 * cutoff / SAMPLE_RATE * np.sinc(2 * cutoff / SAMPLE_RATE * n)

    return ((low_pass(high) - low_pass(low)) * np.hamming(_TAPS)).astype(np.float64)


class LineEcho:
    def __init__(self, delay_ms: float = 40.0, gain_db: float = -10.0, band: tuple[float, float] = (300.0, 3400.0)):
        self.delay_samples = round(delay_ms * SAMPLE_RATE / 1000)
        self.gain = 10 ** (gain_db / 20)
        self._kernel = _band_pass(*band)
        self._history = np.zeros(_TAPS - 1)
        # the echo path: a continuous stream of samples, delay_samples behind what was heard
        self._fifo = np.zeros(0)

    def heard(self, pcm: bytes, now: float) -> None:
        """Audio reaching the caller: it comes back ``delay_ms`` later, filtered and attenuated."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        joined = np.concatenate([self._history, samples])
        self._history = joined[-(_TAPS - 1):]
        filtered = np.convolve(joined, self._kernel, mode="valid") * self.gain
        if not len(self._fifo):
            self._fifo = np.zeros(self.delay_samples)  # the line's delay, from the first sound on
        self._fifo = np.concatenate([self._fifo, filtered])

    def take(self, now: float, samples: int) -> np.ndarray:
        """The echo to mix into the next frame of ``samples`` the phone sends."""
        out = np.zeros(samples)
        n = min(samples, len(self._fifo))
        out[:n] = self._fifo[:n]
        self._fifo = self._fifo[n:]
        return out


class LineNoise:
    def __init__(self, dbfs: float = -40.0, seed: int = 0) -> None:
        self.rms = 32768 * 10 ** (dbfs / 20)
        self._rng = np.random.default_rng(seed)

    def take(self, samples: int) -> np.ndarray:
        return self._rng.standard_normal(samples) * self.rms


def mix(frame: bytes, *parts: np.ndarray) -> bytes:
    """``frame`` (s16le) plus ``parts`` (float samples), clipped to 16 bits."""
    total = np.frombuffer(frame, dtype="<i2").astype(np.float64)
    for part in parts:
        total = total + part[: len(total)]
    return np.clip(np.round(total), -32768, 32767).astype("<i2").tobytes()
