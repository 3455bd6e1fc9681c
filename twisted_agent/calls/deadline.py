"""How long the caller waits for the answer to a turn before the apology: two bounds, one after the other.

A turn's work may wait for the shared models behind other calls' turns (the local pipeline's
worker queues) before it runs at all; that wait says the machine is busy, not that this turn is
stuck. So the wait is bounded in two steps:

- ``QUEUE_TIMEOUT`` from the turn's end until the provider says its work started
  (``IProviderEvents.work_started``: the turn's first model job left the queue and runs);
- ``PROVIDER_TIMEOUT`` from then until the answer's first audio.

A provider that does not queue says its work started as it takes the turn (echo), so only
``PROVIDER_TIMEOUT`` applies to it; providers that take turns themselves (the cloud agents) never
get a turn from the engine. Which bound ran out is the reason the turn failed: ``queue_timeout``
or ``provider_timeout`` (calls/timing.py records it, /metrics counts it).

Plain logic on a clock: the call says when a turn starts and ends, the provider when work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_agent.calls.timer import Timer


class AnswerDeadline:
    """``expired(reason, what)`` is called when a bound runs out, ``reason`` being
    ``queue_timeout`` or ``provider_timeout``, ``what`` what the provider did not do, for the log
    ("provider local " + what)."""

    def __init__(self, clock: IReactorTime, queue_timeout: float, provider_timeout: float,
                 expired: Callable[[str, str], Any]) -> None:
        self._timer = Timer(clock)
        self.queue_timeout = queue_timeout
        self.provider_timeout = provider_timeout
        self._expired = expired
        #: "idle" (no answer awaited), "queued" (the turn's work has not started) or "working"
        self.phase = "idle"

    @property
    def pending(self) -> bool:
        return self._timer.pending

    def turn_started(self) -> None:
        """The turn ended and its answer is awaited: its work has QUEUE_TIMEOUT to start."""
        self.phase = "queued"
        self._timer.start(self.queue_timeout, self._ran_out, "queue_timeout",
                          f"did not start on the turn within {self.queue_timeout:g}s "
                          "(QUEUE_TIMEOUT: its work waited behind other calls' turns)")

    def work_started(self) -> bool:
        """The provider started on the turn: its answer has PROVIDER_TIMEOUT from now. True if this
        started the count (False when no turn waits for its work: a late or repeated report)."""
        if self.phase != "queued":
            return False
        self.phase = "working"
        self._timer.start(self.provider_timeout, self._ran_out, "provider_timeout",
                          f"gave no answer within {self.provider_timeout:g}s of starting on the turn "
                          "(PROVIDER_TIMEOUT)")
        return True

    def cancel(self) -> None:
        """The answer came, was dropped, or the call is failing or ending: no bound any more."""
        self.phase = "idle"
        self._timer.cancel()

    def _ran_out(self, reason: str, what: str) -> None:
        self.phase = "idle"
        self._expired(reason, what)
