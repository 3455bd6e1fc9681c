"""The default store: this engine's live calls and a bounded history, in memory.

Nothing survives a restart; the history keeps the newest ``STORE_HISTORY_MAX`` calls for at most
``STORE_HISTORY_DAYS``. For several engines, or a history that outlives the process, use Redis.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twisted_agent.config import StoreConfig
from twisted_agent.status import ComponentStatus
from twisted_agent.store.interfaces import HistoryRecord, ICallStore, LiveRecord


def matches(record: HistoryRecord, number: str, since: float | None, until: float | None) -> bool:
    """The history search both stores use: part of the caller's number, and a start-time window."""
    started = float(record.get("started_at", 0.0))
    if since is not None and started < since:
        return False
    if until is not None and started > until:
        return False
    return not number or number in str(record.get("caller_number", ""))


@dataclass(frozen=True)
class _Kept:
    """A stored record: its JSON (what Redis would hold) and the fields searches look at."""

    text: str
    started_at: float
    ended_at: float
    caller_number: str

    @classmethod
    def of(cls, record: dict[str, Any], engine_id: str) -> _Kept:
        # JSON, not a deep copy: the caller goes on changing its own dicts, a stored record must not
        # change under readers; serialising is also cheaper than copy.deepcopy (bench/store.py) and
        # gives what the Redis store gives back for values JSON cannot hold
        return cls(json.dumps({**record, "engine_id": engine_id}, default=str),
                   _number(record.get("started_at")), _number(record.get("ended_at")),
                   str(record.get("caller_number", "")))

    def record(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.text)
        return value


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@implementer(ICallStore)
class MemoryStore:
    component = "store"

    def __init__(self, clock: IReactorTime, config: StoreConfig, engine_id: str | None = None) -> None:
        self._clock = clock
        self._config = config
        self.engine_id = engine_id or config.engine_id
        self.errors = 0
        self._live: dict[str, _Kept] = {}
        #: call id -> record, in the order the calls ended
        self._history: OrderedDict[str, _Kept] = OrderedDict()

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def call_updated(self, record: LiveRecord) -> None:
        self._live[record["call_id"]] = _Kept.of(record, self.engine_id)

    def call_finished(self, record: HistoryRecord) -> None:
        call_id = record["call_id"]
        self._live.pop(call_id, None)
        self._history.pop(call_id, None)
        self._history[call_id] = _Kept.of(record, self.engine_id)
        self._trim()

    def _trim(self) -> None:
        while len(self._history) > self._config.history_max:
            self._history.popitem(last=False)
        horizon = self._clock.seconds() - self._config.history_days * 86400
        for call_id, kept in list(self._history.items()):
            if kept.ended_at >= horizon:
                break
            del self._history[call_id]

    def live_calls(self) -> Deferred[list[LiveRecord]]:
        kept = sorted(self._live.items(), key=lambda item: (item[1].started_at, item[0]))
        return succeed([k.record() for _, k in kept])

    def get_call(self, call_id: str) -> Deferred[LiveRecord | HistoryRecord | None]:
        kept = self._live.get(call_id) or self._history.get(call_id)
        return succeed(kept.record() if kept is not None else None)

    def history(self, number: str = "", since: float | None = None, until: float | None = None,
                limit: int = 100) -> Deferred[list[HistoryRecord]]:
        self._trim()
        found: list[HistoryRecord] = []
        for kept in reversed(self._history.values()):
            if matches({"started_at": kept.started_at, "caller_number": kept.caller_number}, number, since, until):
                found.append(kept.record())
                if len(found) >= limit:
                    break
        return succeed(found)

    def cluster_active(self) -> int | None:
        return len(self._live)

    def status(self) -> ComponentStatus:
        return ComponentStatus(
            "running", True, f"in memory: {len(self._live)} live call(s), {len(self._history)} in the history "
            f"(newest {self._config.history_max} kept); nothing survives a restart")

    def stats(self) -> dict[str, Any]:
        return {"live": len(self._live), "history": len(self._history), "buffered": 0, "errors": self.errors}
