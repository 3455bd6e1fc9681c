"""Inbound RTP ordering: a small reorder buffer and the RFC 3550 interarrival jitter estimator.

The reorder buffer releases in-order packets at once and only holds packets back while there is a
gap, so it adds no delay to a clean stream. It gives up on a gap when more than ``depth`` packets
wait behind it, or when the oldest has waited ``depth`` frame times (the sender may simply have
stopped: Asterisk sends nothing while a caller is silent).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted_agent.media.rtp import seq_distance

T = TypeVar("T")

#: RFC 3550 A.1: a jump larger than this is a restart of the sender, not loss
MAX_DROPOUT = 3000
#: ... and a packet this far behind is from before a restart
MAX_MISORDER = 100


class ReorderBuffer(Generic[T]):
    def __init__(self, depth: int = 2, frame_seconds: float = 0.02) -> None:
        self.depth = depth
        self._max_wait = max(depth, 1) * frame_seconds
        self._expected: int | None = None
        self._held: dict[int, tuple[T, float]] = {}
        self.lost = 0
        self.late = 0
        self.reordered = 0
        self.duplicates = 0
        self.restarts = 0

    def reset(self) -> None:
        self._expected = None
        self._held.clear()

    @property
    def held(self) -> int:
        return len(self._held)

    def push(self, seq: int, item: T, now: float) -> list[T]:
        """Add one packet; return the packets that can now be played, in order."""
        expected = self._expected
        if expected is None or (not self._held and seq == expected):
            # the hot path: the next packet of a clean stream
            self._expected = (seq + 1) & 0xFFFF
            return [item]
        distance = seq_distance(expected, seq)
        if distance < 0:
            if -distance > MAX_MISORDER:
                return self._restart(seq, item)
            self.late += 1
            return []
        if distance > MAX_DROPOUT:
            return self._restart(seq, item)
        if seq in self._held:
            self.duplicates += 1
            return []
        if distance == 0:
            released = [item]
            self._expected = (seq + 1) & 0xFFFF
            self._release_consecutive(released)
            return released
        self._held[seq] = (item, now)
        if len(self._held) > self.depth:
            return self._skip_gap()
        return []

    def tick(self, now: float) -> list[T]:
        """Give up on a gap whose packets waited too long (called every frame time)."""
        if not self._held:
            return []
        oldest = min(arrival for _, arrival in self._held.values())
        if now - oldest >= self._max_wait:
            return self._skip_gap()
        return []

    def drain(self) -> list[T]:
        """Everything held, in order (the stream ended)."""
        released: list[T] = []
        while self._held:
            released.extend(self._skip_gap())
        return released

    def _skip_gap(self) -> list[T]:
        assert self._expected is not None
        expected = self._expected
        first = min(self._held, key=lambda s: seq_distance(expected, s))
        self.lost += seq_distance(expected, first)
        self._expected = first
        released: list[T] = []
        self._release_consecutive(released)
        return released

    def _release_consecutive(self, released: list[T]) -> None:
        assert self._expected is not None
        while self._expected in self._held:
            item, _ = self._held.pop(self._expected)
            released.append(item)
            self.reordered += 1
            self._expected = (self._expected + 1) & 0xFFFF

    def _restart(self, seq: int, item: T) -> list[T]:
        self.restarts += 1
        released = [held for _, (held, _) in sorted(self._held.items(), key=lambda kv: kv[1][1])]
        self._held.clear()
        self._expected = (seq + 1) & 0xFFFF
        released.append(item)
        return released


class JitterEstimator:
    """RFC 3550 §6.4.1 interarrival jitter, in timestamp units, reported in milliseconds."""

    def __init__(self, clock_rate: int) -> None:
        self._rate = clock_rate
        self._previous_transit: float | None = None
        self.jitter = 0.0

    def reset(self) -> None:
        self._previous_transit = None

    def update(self, rtp_timestamp: int, arrival: float) -> None:
        transit = arrival * self._rate - rtp_timestamp
        previous = self._previous_transit
        self._previous_transit = transit
        if previous is None:
            return
        d = transit - previous
        # timestamps wrap at 2**32; a wrap shows as a huge jump in transit
        if d > 0x80000000:
            d -= 0x100000000
        elif d < -0x80000000:
            d += 0x100000000
        self.jitter += (abs(d) - self.jitter) / 16

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self._rate
