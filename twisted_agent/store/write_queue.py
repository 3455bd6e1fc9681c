"""The writes of one engine waiting for Redis: ordered, coalescing, bounded.

Plain logic, with no Redis and no reactor in it: :class:`~twisted_agent.store.redis.RedisStore`
puts records in, its single writer takes them out a batch at a time and puts back a batch Redis
did not take. The rules, which keep Redis's view of this engine's calls right whatever is lost:

- writes reach Redis in the order they were queued; a newer update of a live call replaces the
  queued one (and goes to the end), and a call's finish replaces its queued live update (deleting
  the live record is part of writing the finish);
- beyond ``limit`` writes the oldest live update goes first (a later update, the finish or the
  rewrite of every live record on reconnection supersedes it) and finished records, which nothing
  else would write, only as a last resort;
- a batch put back goes to the front, without what newer writes superseded meanwhile;
- a reader can wait until what was queued so far reached Redis or was superseded (read your own
  writes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from twisted.internet.defer import Deferred

Kind = Literal["live", "finished"]


@dataclass(frozen=True)
class Write:
    kind: Kind
    call_id: str
    #: the record as JSON (serialised when queued: later changes by the caller do not leak in)
    text: str
    #: started_at of a live record, ended_at of a finished one
    score: float
    #: queue order; the queue is always sorted by it (a coalesced update moves to the end)
    seq: int

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.call_id


class WriteQueue:
    """See the module docstring. ``dropped(write)`` is told of each write dropped for the bound."""

    def __init__(self, limit: int, dropped: Callable[[Write], None]) -> None:
        self.limit = limit
        self._dropped = dropped
        #: writes waiting, oldest first, by (kind, call id)
        self._queue: OrderedDict[tuple[str, str], Write] = OrderedDict()
        #: the batch being written (back to the queue's front if it fails)
        self._in_flight: list[Write] = []
        self._seq = 0
        #: (seq, Deferred) fired once every write up to seq reached Redis or was superseded
        self._flush_waiters: list[tuple[int, Deferred[None]]] = []

    @property
    def queued(self) -> int:
        """Writes waiting to be taken."""
        return len(self._queue)

    @property
    def buffered(self) -> int:
        """Writes not in Redis yet: waiting, or being written."""
        return len(self._queue) + len(self._in_flight)

    def writes(self) -> list[Write]:
        """Every write not in Redis yet, in the order they reach it: being written, then waiting."""
        return [*self._in_flight, *self._queue.values()]

    def enqueue(self, kind: Kind, call_id: str, text: str, score: float) -> None:
        self._seq += 1
        write = Write(kind, call_id, text, score, self._seq)
        self._queue.pop(write.key, None)
        if kind == "finished":
            self._queue.pop(("live", call_id), None)  # deleting the live record is part of the finish
        self._queue[write.key] = write
        self._bound()

    def _bound(self) -> None:
        while len(self._queue) > self.limit:
            # a live update is the cheapest loss: a later update, the finish, or the rewrite of every
            # live record on reconnection supersedes it
            victim = next((key for key, write in self._queue.items() if write.kind == "live"), None)
            self._dropped(self._queue.pop(victim if victim is not None else next(iter(self._queue))))
        self.check_flushed()

    # --- the writer's side ------------------------------------------------------------------------

    def take(self, most: int) -> list[Write]:
        """The oldest ``most`` waiting writes, now being written until :meth:`written` or :meth:`not_written`."""
        batch = [self._queue.popitem(last=False)[1] for _ in range(min(most, len(self._queue)))]
        self._in_flight = batch
        return batch

    def written(self) -> None:
        """The batch taken reached Redis."""
        self._in_flight = []

    def not_written(self) -> None:
        """The batch taken did not reach Redis: it goes back to the front."""
        batch, self._in_flight = self._in_flight, []
        self._requeue(batch)

    def _requeue(self, batch: Sequence[Write]) -> None:
        """Put a failed batch back at the queue's front, except what newer writes superseded."""
        for write in reversed(batch):
            if write.key in self._queue or (write.kind == "live" and ("finished", write.call_id) in self._queue):
                continue
            self._queue[write.key] = write
            self._queue.move_to_end(write.key, last=False)
        self._bound()

    def drop_live(self) -> None:
        """Forget every waiting live update: the rewrite of all live records supersedes them."""
        for key in [key for key in self._queue if key[0] == "live"]:
            del self._queue[key]
        self.check_flushed()

    def finishing(self) -> set[str]:
        """Call ids whose finish is not in Redis yet."""
        return {write.call_id for write in self.writes() if write.kind == "finished"}

    def finished_text(self, call_id: str) -> str | None:
        """The newest record of a finished call not in Redis yet (None if there is none)."""
        write = self._queue.get(("finished", call_id))
        if write is not None:
            return write.text
        for write in self._in_flight:
            if write.key == ("finished", call_id):
                return write.text
        return None

    # --- waiting until it is written --------------------------------------------------------------

    def pending_floor(self) -> float:
        """The seq of the oldest write not yet in Redis (infinity if none)."""
        if self._in_flight:
            return self._in_flight[0].seq
        for write in self._queue.values():
            return write.seq
        return math.inf

    def flushed(self) -> Deferred[None] | None:
        """A Deferred that fires once every write queued so far reached Redis or was superseded;
        None if that is already so."""
        if self.pending_floor() > self._seq:
            return None
        d: Deferred[None] = Deferred()
        self._flush_waiters.append((self._seq, d))
        return d

    def check_flushed(self, everything: bool = False) -> None:
        """Fire the waiters whose writes are all done; ``everything``: all of them (nothing more
        reaches Redis for now, so readers should not wait)."""
        floor = math.inf if everything else self.pending_floor()
        ready = [d for seq, d in self._flush_waiters if seq < floor]
        self._flush_waiters = [(seq, d) for seq, d in self._flush_waiters if seq >= floor]
        for d in ready:
            if not d.called:  # it may have timed out
                d.callback(None)
