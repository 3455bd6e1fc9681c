"""What a simulated caller heard, on a wall clock: 8 kHz samples indexed by time since answer.

Two ways audio lands on the track:

* **Streams** (RTP or AudioSocket audio from the agent, relayed by the bridge) are placed at
  their arrival time through a per-stream playout cursor, like a phone's jitter buffer: a frame
  that arrives up to :data:`JITTER_ALLOWANCE_S` after the previous one ended follows it without
  a gap (normal network jitter is not heard as clicks); a later frame starts a new talkspurt at
  its arrival time (the sender paused, the caller hears silence). A sender running faster than
  real time fills the buffer; once a frame would play more than :data:`MAX_QUEUE_S` after it
  arrived, it is dropped (counted in ``overflow_dropped``), as a phone's jitter buffer would.
* **Playbacks** are placed at exact positions, frame after frame, by the playback engine.

Overlapping audio is mixed (summed, clipped to 16 bits when read). Segments record where
non-silent audio was placed, per source label.
"""

from __future__ import annotations

import numpy as np

from twisted_agent.media.interfaces import SAMPLE_RATE

__all__ = ["JITTER_ALLOWANCE_S", "MAX_QUEUE_S", "HeardTrack"]

JITTER_ALLOWANCE_S = 0.020
MAX_QUEUE_S = 0.200

_JITTER = int(JITTER_ALLOWANCE_S * SAMPLE_RATE)
_MAX_QUEUE = int(MAX_QUEUE_S * SAMPLE_RATE)


class HeardTrack:
    def __init__(self) -> None:
        self.origin: float | None = None
        self.end: float | None = None
        self._samples = np.zeros(SAMPLE_RATE * 16, dtype=np.int32)
        self._cursors: dict[str, int] = {}
        self._segments: list[list[int | str]] = []
        self._last_segment: dict[str, int] = {}
        self.first_heard_at: float | None = None
        self.overflow_dropped = 0

    @property
    def open(self) -> bool:
        return self.origin is not None and self.end is None

    def start(self, now: float) -> None:
        if self.origin is None:
            self.origin = now

    def stop(self, now: float) -> None:
        if self.origin is not None and self.end is None:
            self.end = now

    def position(self, now: float) -> int:
        """Sample index of reactor time ``now`` (0 before the origin)."""
        if self.origin is None:
            return 0
        return max(0, round((now - self.origin) * SAMPLE_RATE))

    def hear_stream(self, key: str, pcm: bytes, now: float, label: str) -> None:
        """A frame of a live stream arrived at ``now``; place it through the stream's playout cursor."""
        if not self.open or not pcm:
            return
        arrival = self.position(now)
        cursor = self._cursors.get(key)
        if cursor is None or arrival > cursor + _JITTER:
            cursor = arrival
        elif cursor - arrival > _MAX_QUEUE:
            self.overflow_dropped += 1
            return
        samples = np.frombuffer(pcm, dtype="<i2")
        self._place(cursor, samples, label)
        self._cursors[key] = cursor + len(samples)

    def hear_at(self, position: int, pcm: bytes, label: str) -> None:
        """Place ``pcm`` at an exact sample position (file playback)."""
        if not self.open or not pcm:
            return
        self._place(position, np.frombuffer(pcm, dtype="<i2"), label)

    def _place(self, position: int, samples: np.ndarray, label: str) -> None:
        end = position + len(samples)
        if end > len(self._samples):
            grown = np.zeros(max(end, 2 * len(self._samples)), dtype=np.int32)
            grown[: len(self._samples)] = self._samples
            self._samples = grown
        self._samples[position:end] += samples
        if not samples.any():
            return
        assert self.origin is not None
        heard_at = self.origin + position / SAMPLE_RATE
        if self.first_heard_at is None or heard_at < self.first_heard_at:
            self.first_heard_at = heard_at
        index = self._last_segment.get(label)
        if index is not None:
            segment = self._segments[index]
            if int(segment[0]) <= position <= int(segment[1]):
                segment[1] = max(int(segment[1]), end)
                return
        self._last_segment[label] = len(self._segments)
        self._segments.append([position, end, label])

    def pcm(self, now: float) -> bytes:
        """Everything heard from the origin to ``now`` (or to the end of the call), as s16le."""
        if self.origin is None:
            return b""
        length = self.position(self.end if self.end is not None else now)
        window = np.zeros(length, dtype=np.int32)
        available = min(length, len(self._samples))
        window[:available] = self._samples[:available]
        return np.clip(window, -32768, 32767).astype("<i2").tobytes()

    def segments(self, now: float) -> list[tuple[float, float, str]]:
        """``(start_s, end_s, label)`` relative to the origin, cut at ``now`` / the end of the call."""
        limit = self.position(self.end if self.end is not None else now)
        result = []
        for start, end, label in self._segments:
            if int(start) >= limit:
                continue
            result.append((int(start) / SAMPLE_RATE, min(int(end), limit) / SAMPLE_RATE, str(label)))
        return sorted(result)
