"""What a caller heard, from the WAV files Asterisk's MixMonitor wrote on the caller's channel.

The echo provider speaks with :class:`~twisted_agent.providers.voices.ToneVoice`: one tone burst
per word, its pitch given by the word. :func:`tone_words` reads the bursts back, so a test can tell
*which sentence* the caller heard (the greeting, an answer, the apology) and how much of it.
:func:`sounds` finds where anything audible was, for onsets and stops (benchmarks).
"""

from __future__ import annotations

import wave
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 8000
FRAME = 80  # 10 ms
#: a 10 ms frame with a sample louder than this is sound: -40 dBFS, the edge of speech the tests' speech
#: clips are cut at (tests/media/speech.py), far above μ-law's idle noise
SOUND_PEAK = 328
#: the pitch the dialplan's hand-back tone has (Playtones 1004 Hz): "the agent sent the call back"
HANDBACK_HZ = 1004


def read(path: Path) -> np.ndarray:
    """A MixMonitor WAV file (8 kHz 16-bit mono) as int16 samples."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (RATE, 2, 1), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@dataclass(frozen=True)
class Sound:
    start: float  # seconds from the start of the recording
    end: float
    hz: float  # the dominant pitch


def _peaks(samples: np.ndarray) -> np.ndarray:
    n = len(samples) // FRAME
    return np.abs(samples[: n * FRAME].astype(np.int32).reshape(n, FRAME)).max(axis=1)


def _pitch(samples: np.ndarray) -> float:
    if len(samples) < 64:
        return 0.0
    window = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(window, n=8192))
    return float(np.argmax(spectrum) * RATE / 8192)


def sounds(samples: np.ndarray, gap_ms: int = 20, threshold: int = SOUND_PEAK) -> list[Sound]:
    """The stretches of sound, split at silences longer than ``gap_ms`` (to 10 ms)."""
    loud = _peaks(samples) > threshold
    found: list[Sound] = []
    start = None
    quiet = 0
    for i, on in enumerate([*loud, False]):
        if on:
            if start is None:
                start = i
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet * 10 > gap_ms or i == len(loud):
                end = i - quiet + 1
                found.append(Sound(start * 0.01, end * 0.01, _pitch(samples[start * FRAME:end * FRAME])))
                start, quiet = None, 0
    return found


def word_hz(word: str) -> int:
    """The pitch ToneVoice gives a word (twisted_agent/providers/voices.py)."""
    return 300 + zlib.crc32(word.lower().encode()) % 600


def tone_words(samples: np.ndarray) -> list[Sound]:
    """The ToneVoice words in a recording (bursts of 80-200 ms), in order."""
    return [s for s in sounds(samples) if 0.08 <= s.end - s.start <= 0.2]


def find_sentence(words: list[Sound], text: str, tolerance_hz: float = 6.0) -> list[int]:
    """Where ``text``, spoken by ToneVoice, starts in ``words`` (indices of its first word)."""
    want = [word_hz(w) for w in text.split()]
    return [i for i in range(len(words) - len(want) + 1)
            if all(abs(words[i + k].hz - hz) <= tolerance_hz for k, hz in enumerate(want))]


def prefix_heard(words: list[Sound], text: str, tolerance_hz: float = 6.0) -> int:
    """How many words of ``text`` were heard, from its first word on (0: not even the first)."""
    want = [word_hz(w) for w in text.split()]
    best = 0
    for i in range(len(words)):
        k = 0
        while k < len(want) and i + k < len(words) and abs(words[i + k].hz - want[k]) <= tolerance_hz:
            k += 1
        best = max(best, k)
    return best


def handed_back(samples: np.ndarray) -> bool:
    """The dialplan after Stasis() played its tone: the agent sent the call back."""
    return any(abs(s.hz - HANDBACK_HZ) < 8 and s.end - s.start >= 0.5 for s in sounds(samples))
