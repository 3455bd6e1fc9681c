"""Outbound pacing: one timer for every call, on a drift-corrected 20 ms schedule.

Tick *k* is due at ``start + k * interval``: each wake-up computes the next deadline from the start
time, never from the previous wake-up, so lateness does not accumulate. When the reactor was busy
and several ticks are overdue, every session gets each overdue tick (its audio keeps its place in
time, the receiver's jitter buffer absorbs the burst); beyond ``max_catch_up`` ticks the pacer
skips ahead and counts the skipped ticks.

One shared timer measured better than a ``LoopingCall`` per call. Calls are spread over ``phases``
slots of the 20 ms period (call *n*'s frames are due at ``start + slot * 20/phases ms + k * 20 ms``),
so each wake-up sends a fraction of the calls' packets: with every call in one slot, the 500th
packet of a tick leaves ~5 ms after the first (see BENCHMARKS.md, media capacity).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_agent.media.interfaces import FRAME_SECONDS


class Paced(Protocol):
    def tick(self, index: int, deadline: float, now: float) -> None: ...


class LatenessHistogram:
    """Send lateness in fixed 0.25 ms buckets up to 100 ms: cheap to add to, percentiles on demand."""

    BUCKET = 0.00025
    BUCKETS = 400

    def __init__(self) -> None:
        self.counts = [0] * (self.BUCKETS + 1)
        self.count = 0
        self.maximum = 0.0

    def add(self, seconds: float) -> None:
        index = int(seconds / self.BUCKET) if seconds > 0 else 0
        self.counts[index if index < self.BUCKETS else self.BUCKETS] += 1
        self.count += 1
        if seconds > self.maximum:
            self.maximum = seconds

    def percentile_ms(self, fraction: float) -> float:
        """Upper edge of the bucket holding the given fraction of samples, in ms (0 when empty)."""
        if not self.count:
            return 0.0
        wanted = math.ceil(self.count * fraction)
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= wanted:
                return min((index + 1) * self.BUCKET, self.maximum) * 1000
        return self.maximum * 1000

    def merge(self, other: LatenessHistogram) -> None:
        for index, n in enumerate(other.counts):
            self.counts[index] += n
        self.count += other.count
        self.maximum = max(self.maximum, other.maximum)

    def summary(self) -> dict[str, float]:
        return {"p50_ms": round(self.percentile_ms(0.5), 3), "p99_ms": round(self.percentile_ms(0.99), 3),
                "max_ms": round(self.maximum * 1000, 3), "frames": self.count}


class Pacer:
    def __init__(self, clock: IReactorTime, interval: float = FRAME_SECONDS, max_catch_up: int = 10,
                 phases: int = 4) -> None:
        self._clock = clock
        self.interval = interval
        self.phases = phases
        self._step = interval / phases
        self.max_catch_up = max_catch_up
        self._slots: list[dict[int, Paced]] = [{} for _ in range(phases)]
        self._slot_of: dict[int, int] = {}
        self._call: IDelayedCall | None = None
        self._start = 0.0
        self._next = 0  # the next step (a phase of a tick) to run
        self.ticks = 0
        self.skipped = 0
        self.wakeups = 0

    @property
    def running(self) -> bool:
        return self._call is not None

    def seconds(self) -> float:
        """Now, on the pacer's clock: sessions stamp each frame as it leaves."""
        return self._clock.seconds()

    def add(self, client: Paced) -> None:
        key = id(client)
        if key in self._slot_of:
            return
        slot = min(range(self.phases), key=lambda s: len(self._slots[s]))  # keep the slots even
        self._slots[slot][key] = client
        self._slot_of[key] = slot

    def remove(self, client: Paced) -> None:
        slot = self._slot_of.pop(id(client), None)
        if slot is not None:
            del self._slots[slot][id(client)]

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def index(self) -> int:
        """The next tick (20 ms frame) to run."""
        return -(-self._next // self.phases)

    def start(self) -> None:
        if self._call is None:
            self._start = self._clock.seconds()
            self._next = 0
            self._call = self._clock.callLater(0, self._run)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _run(self) -> None:
        self.wakeups += 1
        now = self._clock.seconds()
        # the last step whose deadline has passed (a microsecond of slack absorbs float rounding)
        due = int((now - self._start + 1e-6) / self._step)
        limit = self.max_catch_up * self.phases
        if due - self._next >= limit:
            skip = due - self._next - limit + 1
            self.skipped += skip // self.phases
            self._next += skip
        while self._next <= due:
            step = self._next
            index, slot = divmod(step, self.phases)
            deadline = self._start + step * self._step
            for client in list(self._slots[slot].values()):
                client.tick(index, deadline, now)
            self._next += 1
            if slot == self.phases - 1:
                self.ticks += 1
        # wake a microsecond early: the slack in `due` counts the step as due, and float rounding
        # of clock arithmetic can no longer push a wake-up past its deadline
        delay = self._start + self._next * self._step - self._clock.seconds() - 1e-6
        self._call = self._clock.callLater(max(delay, 0.0), self._run)


class OutboundAudio:
    """One call's queue of utterances, cut into frames for the pacer.

    Audio played under the same utterance id as the tail of the queue is appended to it (TTS
    sentences of one reply). Milliseconds are counted from the audio itself, not the padding that
    completes a last partial frame.
    """

    def __init__(self, frame_bytes: int) -> None:
        self.frame_bytes = frame_bytes
        self._bytes_per_ms = frame_bytes // 20
        # each entry: [utterance_id, bytearray of pending audio]
        self._queue: deque[list[Any]] = deque()
        # bytes sent per utterance, across every stretch queued under its id (bounded: old ids go)
        self._sent: OrderedDict[str, int] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def pending_ms(self) -> int:
        return sum(len(entry[1]) for entry in self._queue) // self._bytes_per_ms

    def enqueue(self, pcm: bytes, utterance_id: str) -> None:
        if not pcm:
            return
        if self._queue and self._queue[-1][0] == utterance_id:
            self._queue[-1][1].extend(pcm)
        else:
            self._queue.append([utterance_id, bytearray(pcm)])
            if utterance_id not in self._sent:
                self._sent[utterance_id] = 0
                while len(self._sent) > 64:
                    self._sent.popitem(last=False)

    def next_frame(self) -> tuple[bytes, str, int] | None:
        """The next frame, its utterance, and the utterance's ms sent so far if this frame emptied
        its queue (else -1)."""
        if not self._queue:
            return None
        utterance_id, pending = self._queue[0]
        size = self.frame_bytes
        if len(pending) >= size:
            frame = bytes(pending[:size])
            del pending[:size]  # CPython trims a bytearray's head in O(1)
            audio = size
        else:
            audio = len(pending)
            frame = bytes(pending) + bytes(size - audio)
            pending.clear()
        sent = self._sent.get(utterance_id, 0) + audio
        self._sent[utterance_id] = sent
        if pending:
            return frame, utterance_id, -1
        self._queue.popleft()
        return frame, utterance_id, sent // self._bytes_per_ms

    def flush(self) -> dict[str, int]:
        """Drop everything queued; per queued utterance, the ms that went out before."""
        report = {entry[0]: self._sent.get(entry[0], 0) // self._bytes_per_ms for entry in self._queue}
        self._queue.clear()
        return report

    def unsend(self, frame: bytes, utterance_id: str) -> None:
        """Put back a frame :meth:`next_frame` gave out but that could not be sent."""
        if self._queue and self._queue[0][0] == utterance_id:
            self._queue[0][1][:0] = frame
        else:
            self._queue.appendleft([utterance_id, bytearray(frame)])
        self._sent[utterance_id] = max(0, self._sent.get(utterance_id, 0) - len(frame))

    def drop(self, utterance_id: str) -> None:
        """Drop what is queued of one utterance; the rest keeps its place."""
        kept = [entry for entry in self._queue if entry[0] != utterance_id]
        self._queue = deque(kept)

    def take(self) -> list[tuple[str, bytes]]:
        """Empty the queue and hand over what was not sent, utterance by utterance."""
        taken = [(entry[0], bytes(entry[1])) for entry in self._queue]
        self._queue.clear()
        return taken

    def sent_ms(self, utterance_id: str) -> int:
        return self._sent.get(utterance_id, 0) // self._bytes_per_ms
