"""Voices that need no model: for the echo provider, tests and benchmarks.

``ToneVoice`` renders text as a tone burst per word: deterministic, instant, measurable on the
wire (a test can tell which sentence the caller heard by its length), and obviously not speech.
"""

from __future__ import annotations

import math
import struct
import zlib

RATE = 8000


class ToneVoice:
    rate = RATE

    def __init__(self, word_ms: int = 120, gap_ms: int = 40, amplitude: int = 6000) -> None:
        self.word_ms = word_ms
        self.gap_ms = gap_ms
        self.amplitude = amplitude
        self._cache: dict[int, bytes] = {}

    def duration_ms(self, text: str) -> int:
        return len(text.split()) * (self.word_ms + self.gap_ms)

    def render(self, text: str) -> bytes:
        return b"".join(self._word(word) for word in text.split())

    def _word(self, word: str) -> bytes:
        frequency = 300 + zlib.crc32(word.lower().encode()) % 600  # 300-900 Hz: inside the phone band
        cached = self._cache.get(frequency)
        if cached is None:
            n = RATE * self.word_ms // 1000
            fade = RATE * 5 // 1000  # 5 ms ramps: no clicks
            samples = []
            for i in range(n):
                envelope = min(1.0, i / fade, (n - 1 - i) / fade)
                samples.append(int(self.amplitude * envelope * math.sin(2 * math.pi * frequency * i / RATE)))
            cached = struct.pack(f"<{n}h", *samples) + bytes(RATE * self.gap_ms // 1000 * 2)
            if len(self._cache) < 64:
                self._cache[frequency] = cached
        return cached
