"""What the engine and the admin UI need of a call store, and the records it holds.

A store keeps two kinds of record, both plain JSON-able dicts (so Redis and memory hold the same):

*live record*, one per call in progress, replaced whole on every change::

    {"call_id": str, "engine_id": str, "caller_number": str, "caller_name": str,
     "provider": str, "provider_source": str, "context": str, "context_source": str,
     "state": "connecting" | "listening" | "thinking" | "speaking" | "ended",
     "transport": str, "downstream_mode": str,
     "started_at": float (epoch seconds), "updated_at": float,
     "transcript": [{"speaker": "caller" | "agent", "text": str}, ...],
     "turns": [{"voice_to_voice_ms": float, "turn_end_wait_ms": float, ...}, ...],
     "last_turn": {...} | None}

*history record*, written once when the call ends: the live record's fields plus::

    {"ended_at": float, "duration_s": float, "outcome": str, "end_reason": str,
     "hangup_cause": str, "media": {...per-call media statistics...}}

Writes never fail and never wait: a store whose backend is down keeps them in memory, in order,
and writes them when it can (``status()`` says how many are waiting). Reads return Deferreds and
may fail with :class:`StoreUnavailable`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute

from twisted_agent.status import IStatusSource

LiveRecord = dict[str, Any]
HistoryRecord = dict[str, Any]


class StoreUnavailable(Exception):
    """A read could not be answered (Redis down); the text says why."""


class ICallStore(IStatusSource):
    """Live call records of every engine that shares the store, and the finished calls' history."""

    engine_id = Attribute("this engine's id; live records it writes carry it")
    errors = Attribute("count of failed backend operations since start (for /metrics)")

    def start() -> None:
        """Connect (and keep reconnecting) to the backend; returns at once."""

    def stop() -> Deferred[None]:
        """Write what is waiting (bounded in time), then disconnect. Never fails."""

    def call_updated(record: LiveRecord) -> None:
        """Create or replace this engine's live record of a call. Never raises, never blocks."""

    def call_finished(record: HistoryRecord) -> None:
        """Remove the call's live record and add the finished call to the history. Never raises."""

    def live_calls() -> Deferred[list[LiveRecord]]:
        """Every live call the store knows (all engines for a shared store), oldest first."""

    def get_call(call_id: str) -> Deferred[LiveRecord | HistoryRecord | None]:
        """The live record of a call in progress, else its history record, else None."""

    def history(number: str = "", since: float | None = None, until: float | None = None,
                limit: int = 100) -> Deferred[list[HistoryRecord]]:
        """Finished calls, the latest to end first; ``number`` matches part of the caller's number,
        ``since``/``until`` bound ``started_at`` (epoch seconds, inclusive)."""

    def cluster_active() -> int | None:
        """Live calls of all engines sharing the store, as last seen (None: not known yet). Cheap."""

    def stats() -> dict[str, Any]:
        """Cheap counters for /metrics: at least ``buffered`` (writes waiting for the backend) and
        ``errors``."""
