"""The shared store: live calls of every engine and the call history, in Redis (txredisapi).

Key layout (``P`` is ``STORE_PREFIX``, default ``ai-agent``; nothing is written outside ``P:``)::

    P:live:<call_id>   string  JSON live record; expires STORE_LIVE_TTL seconds after its engine last
                               refreshed it (every STORE_LIVE_TTL/3 s), so a dead engine's calls vanish
    P:live             zset    index of the live records, to list them without KEYS: member
                               ``["<engine_id>","<call_id>"]`` (JSON), score started_at; a member whose
                               record expired is removed by whichever engine reads it next
    P:call:<call_id>   string  JSON history record; expires STORE_HISTORY_DAYS after its ended_at
    P:history          zset    member call_id, score ended_at; trimmed by age and to STORE_HISTORY_MAX

Several engines (each with its own ``ENGINE_ID``) share one Redis: each writes only its own live
records, reads everyone's, and on every (re)connection rewrites its own (Redis may have restarted
empty) and deletes any other of its own that this process does not know (left by a previous run
of the same engine that crashed).

Writes never wait: ``call_updated``/``call_finished`` put the record in an ordered in-memory queue
(updates of one live call coalesce) that one writer drains, pipelined, while Redis is connected.
While it is not, the queue holds the records, up to ``STORE_BUFFER_MAX``: beyond that the oldest
live updates go first (a later update, the finish or the rewrite on reconnection supersedes them)
and finished records only as a last resort (:mod:`twisted_agent.store.write_queue`).

Reads: this engine's own live calls (and its finished calls not written yet) come from memory,
everything else from Redis; ``history()`` first waits briefly for this engine's queued writes, so
an engine reads its own writes. Without Redis, ``live_calls()`` lists this engine's calls,
``get_call()`` answers for them, and the rest fails with ``StoreUnavailable`` saying why.

The connection is a ``ClientService`` with back-off; ``prepareConnection`` sends AUTH and SELECT
(txredisapi's own reconnecting factory is not used). Every round trip is bounded in time; one that
times out drops the connection, which is then re-established like any other lost one
(:mod:`twisted_agent.store.redis_link`).
"""


from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import StoreConfig
from twisted_agent.status import ComponentStatus
from twisted_agent.store.interfaces import HistoryRecord, ICallStore, LiveRecord, StoreUnavailable
from twisted_agent.store.redis_link import STOP_TIMEOUT, WRITE_TIMEOUT, RedisConnection, RedisLink, parse_redis_url
from twisted_agent.store.redis_records import RedisRecords
from twisted_agent.store.write_queue import Kind, Write, WriteQueue

__all__ = ["RedisStore", "parse_redis_url"]

#: seconds a history read waits for this engine's own queued writes to reach Redis (read your writes)
READ_FLUSH_WAIT = 1.0
#: pause before retrying writes that Redis refused (out of memory, read-only replica ...)
RETRY_AFTER_ERROR = 1.0
#: queued records sent in one pipelined batch
BATCH_RECORDS = 200


def _preview(value: object) -> str:
    return repr(value)[:200]


def _number(value: Any, default: float = 0.0) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


# --- the store --------------------------------------------------------------------------------


@implementer(ICallStore)
class RedisStore:
    """Live calls and history in a Redis shared by several engines; see the module docstring."""

    component = "store"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: StoreConfig,
        engine_id: str | None = None,
        *,
        retry_policy: Callable[[int], float] | None = None,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self._clock: IReactorTime = reactor
        self._config = config
        # an empty id would make this engine delete other id-less engines' calls as its own leftovers
        self.engine_id = engine_id or config.engine_id or socket.gethostname()
        self._link = RedisLink(reactor, config.redis_url, self.log, connected=self._connected,
                               lost=self._connection_lost, retry_policy=retry_policy, endpoint=endpoint,
                               ca_file=config.tls_ca_file)
        self.address = self._link.address
        #: REDIS_URL with the password masked, for logs and /health
        self.url = self._link.url
        self._records = RedisRecords(self._link, config, self.engine_id, self._clock, self.log, self._decode)
        self.keys = self._records.keys
        #: failed or dropped writes and failed refreshes since start (for /metrics)
        self.errors = 0
        #: records dropped because the queue was full
        self.dropped = 0

        #: this engine's live calls: call id -> (started_at, JSON of the record)
        self._live: dict[str, tuple[float, str]] = {}
        #: writes waiting for Redis
        self._writes = WriteQueue(config.buffer_max, self._dropped)

        self._needs_resync = False
        self._draining = False
        self._refreshing = False
        #: live calls of other engines, as last counted (None: not known yet)
        self._others_live: int | None = None
        self._write_error = ""

        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self._clock

    @property
    def reconnects(self) -> int:
        """Successful connections after the first."""
        return self._link.reconnects

    @property
    def last_error(self) -> str:
        """Why the last attempt failed or the last connection ended ("" if nothing went wrong yet)."""
        return self._link.last_error

    # --- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._link.running:
            return
        self._link.start()
        self._heartbeat.start(self._config.live_ttl / 3, now=False)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._link.running:
            return
        try:
            if self._link.protocol is not None:
                await self._wait_flushed(STOP_TIMEOUT)
        except Exception:
            self.log.failure("Redis store: waiting for the last writes failed")
        # whatever the wait did, the heartbeat and the connection stop: nothing is left running
        if self._heartbeat.running:
            self._heartbeat.stop()
        waiting = self._writes.buffered
        if waiting:
            self.log.warn("Redis store: stopping with {waiting} record(s) not written to {url} ({problem})",
                          waiting=waiting, url=self.url, problem=self.last_error or "Redis was too slow")
        await self._link.stop()

    # --- writes ---------------------------------------------------------------------------------

    def call_updated(self, record: LiveRecord) -> None:
        try:
            call_id = str(record["call_id"])
            text = json.dumps({**record, "engine_id": self.engine_id}, default=str)
            started = _number(record.get("started_at"))
            self._live[call_id] = (started, text)
            self._enqueue("live", call_id, text, started)
        except Exception:  # the call goes on whatever happens to its record
            self.errors += 1
            self.log.failure("Redis store: cannot keep the live record {record!r}", record=_preview(record))

    def call_finished(self, record: HistoryRecord) -> None:
        try:
            call_id = str(record["call_id"])
            text = json.dumps({**record, "engine_id": self.engine_id}, default=str)
            self._live.pop(call_id, None)
            self._enqueue("finished", call_id, text, _number(record.get("ended_at"), self._clock.seconds()))
        except Exception:
            self.errors += 1
            self.log.failure("Redis store: cannot keep the finished record {record!r}", record=_preview(record))

    def _enqueue(self, kind: Kind, call_id: str, text: str, score: float) -> None:
        self._writes.enqueue(kind, call_id, text, score)
        self._kick()

    def _dropped(self, write: Write) -> None:
        """The queue was full: ``write`` will not reach Redis."""
        self.errors += 1
        self.dropped += 1
        if write.kind == "live":
            self.log.error(
                "Redis store: {limit} records wait for Redis (STORE_BUFFER_MAX); dropped an update of live "
                "call {call_id} (rewritten when Redis is back if the call still goes on)",
                limit=self._config.buffer_max, call_id=write.call_id, url=self.url)
        else:
            self.log.error(
                "Redis store: {limit} finished calls wait for Redis (STORE_BUFFER_MAX); dropped the record of "
                "call {call_id}: it will be missing from the history",
                limit=self._config.buffer_max, call_id=write.call_id, url=self.url)

    def _kick(self) -> None:
        if self._draining or self._link.protocol is None:
            return
        self._draining = True
        Deferred.fromCoroutine(self._drain()).addErrback(
            lambda failure: self.log.failure("Redis store: the writer failed", failure))

    async def _drain(self) -> None:
        """The single writer: while connected, write the queue in order, a pipelined batch at a time."""
        protocol = None
        try:
            while (protocol := self._link.protocol) is not None:
                if self._needs_resync:
                    self._needs_resync = False
                    try:
                        await self._resync(protocol)
                    except Exception as e:
                        self._needs_resync = True
                        if not await self._write_failed(protocol, e):
                            break
                    continue
                if not self._writes.queued:
                    break
                batch = self._writes.take(BATCH_RECORDS)
                try:
                    await self._records.write(protocol, batch)
                except Exception as e:
                    self._writes.not_written()
                    if not await self._write_failed(protocol, e):
                        break
                else:
                    self._writes.written()
                    self._write_error = ""
                self._writes.check_flushed()
        finally:
            self._draining = False
            self._writes.check_flushed()
        # a new connection may have come while the last write on the old one was failing
        if self._link.protocol not in (None, protocol) and (self._writes.queued or self._needs_resync):
            self._kick()

    async def _write_failed(self, protocol: RedisConnection, e: Exception) -> bool:
        """Whether to go on writing on this connection after ``e``."""
        if not isinstance(e, txredisapi.ResponseError):
            return False  # the connection is gone (or dropped after a timeout): reconnection resumes
        self.errors += 1
        problem = str(e)
        if problem != self._write_error:
            self._write_error = problem
            self.log.warn("Redis store: Redis at {where} refused a write ({problem}); retrying every {delay}s, "
                          "{waiting} record(s) waiting", where=self.address.where, problem=problem,
                          delay=RETRY_AFTER_ERROR, waiting=self._writes.buffered)
        await deferLater(self._clock, RETRY_AFTER_ERROR, lambda: None)
        return self._link.protocol is protocol

    async def _resync(self, protocol: RedisConnection) -> None:
        """On (re)connection: delete this engine's live records this process does not know, and
        rewrite all it does (Redis may have restarted empty, or expired them during the outage)."""
        members = await self._records.live_index(protocol, WRITE_TIMEOUT)
        stale = self._records.stale(members, self._live, self._writes.finishing())
        self._writes.drop_live()  # the rewrite below supersedes every live update still queued
        await self._records.rewrite(protocol, stale, self._live)
        if stale:
            self.log.info("Redis store: removed {count} live record(s) of engine {engine_id} left by a previous run",
                          count=len(stale), engine_id=self.engine_id, call_ids=[c for _, c in stale])
        self._beat()

    async def _wait_flushed(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until what was queued so far reached Redis: read your own writes.

        Cancelling the caller cancels the wait (only the timeout ends it quietly)."""
        d = self._writes.flushed()
        if d is None:
            return
        timer = self._clock.callLater(timeout, lambda: None if d.called else d.callback(None))
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    # --- the heartbeat ----------------------------------------------------------------------------

    def _beat(self) -> Deferred[None] | None:
        protocol = self._link.protocol
        if protocol is None or self._refreshing or self._needs_resync:
            return None
        self._refreshing = True
        return Deferred.fromCoroutine(self._refresh(protocol))

    async def _refresh(self, protocol: RedisConnection) -> None:
        """Keep this engine's live records alive, and count everyone's (pruning the expired)."""
        try:
            lost, others = await self._records.refresh(protocol, list(self._live))
            for call_id in lost:
                if call_id in self._live:
                    # Redis lost it (flushed, or restarted without persistence): write it again
                    started, text = self._live[call_id]
                    self._enqueue("live", call_id, text, started)
            found = await self._records.existing(protocol, others)
            self._others_live = len(found)
        except Exception as e:
            if isinstance(e, txredisapi.ResponseError):
                self.errors += 1
                self.log.warn("Redis store: refreshing the live records failed: {problem}", problem=str(e))
            # otherwise the connection is gone: the loss is logged where it is noticed
        finally:
            self._refreshing = False

    # --- reads ----------------------------------------------------------------------------------

    def live_calls(self) -> Deferred[list[LiveRecord]]:
        return Deferred.fromCoroutine(self._live_calls())

    async def _live_calls(self) -> list[LiveRecord]:
        # this engine's own calls come from memory: always current, whether or not Redis is
        records = [json.loads(text) for _, text in self._live.values()]
        protocol = self._link.protocol
        if protocol is not None:
            try:
                others = await self._records.others_live(protocol)
                self._others_live = len(others)  # a fresher count for cluster_active() than the heartbeat's
                records += others
            except CancelledError:
                raise
            except Exception as e:
                # the admin page polls this: show this engine's calls, and say nothing more than debug
                self.log.debug("Redis store: listing live calls failed: {problem}", problem=self._link.describe(e))
        records.sort(key=lambda r: (_number(r.get("started_at")), str(r.get("call_id", ""))))
        return records

    def get_call(self, call_id: str) -> Deferred[LiveRecord | HistoryRecord | None]:
        return Deferred.fromCoroutine(self._get_call(call_id))

    async def _get_call(self, call_id: str) -> LiveRecord | HistoryRecord | None:
        local = self._local_text(call_id)
        if local is not None:
            return self._decode(local)
        protocol = self._link.protocol
        if protocol is None:
            raise StoreUnavailable(self._link.unavailable())
        try:
            text = await self._records.call(protocol, call_id)
        except CancelledError:
            raise
        except Exception as e:
            raise StoreUnavailable(self._link.unavailable(e)) from None
        return None if text is None else self._decode(text)

    def _local_text(self, call_id: str) -> str | None:
        """This engine's freshest record of a call: live, or finished and not yet written."""
        if call_id in self._live:
            return self._live[call_id][1]
        return self._writes.finished_text(call_id)

    def history(self, number: str = "", since: float | None = None, until: float | None = None,
                limit: int = 100) -> Deferred[list[HistoryRecord]]:
        return Deferred.fromCoroutine(self._history(number, since, until, limit))

    async def _history(self, number: str, since: float | None, until: float | None,
                       limit: int) -> list[HistoryRecord]:
        if self._link.protocol is None:
            raise StoreUnavailable(self._link.unavailable())
        await self._wait_flushed(READ_FLUSH_WAIT)
        protocol = self._link.protocol
        if protocol is None:
            raise StoreUnavailable(self._link.unavailable())
        try:
            return await self._records.search(protocol, number, since, until, limit)
        except CancelledError:
            raise
        except Exception as e:
            raise StoreUnavailable(self._link.unavailable(e)) from None

    def _decode(self, text: str) -> dict[str, Any] | None:
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.errors += 1
            self.log.warn("Redis store: ignoring a record that is not a JSON object: {text!r}", text=text[:200])
            return None
        return record

    def cluster_active(self) -> int | None:
        if self._others_live is None:
            return None
        return self._others_live + len(self._live)

    # --- the connection's life --------------------------------------------------------------------

    def _connected(self, outage: float | None) -> None:
        if outage is not None:
            self.log.info("Redis store: reconnected to {url} after {outage:.1f}s; writing {waiting} waiting "
                          "record(s)", url=self.url, outage=outage, waiting=self._writes.buffered,
                          reconnects=self.reconnects)
        else:
            self.log.info("Redis store: connected to {url} as engine {engine_id}", url=self.url,
                          engine_id=self.engine_id, waiting=self._writes.buffered)
        self._needs_resync = True
        self._kick()

    def _connection_lost(self) -> None:
        self._writes.check_flushed(everything=True)  # nothing more reaches Redis for now: readers stop waiting

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> ComponentStatus:
        try:
            return self._status()
        except Exception as e:  # must not raise: /health calls it
            return ComponentStatus("error", True, f"Redis store status failed: {type(e).__name__}: {e}")

    def _status(self) -> ComponentStatus:
        waiting = self._writes.buffered
        drops = f"; {self.dropped} record(s) dropped (buffer full)" if self.dropped else ""
        if self._link.protocol is not None:
            cluster = self.cluster_active()
            detail = (f"connected to {self.url} as engine {self.engine_id!r}: {len(self._live)} live call(s) here, "
                      f"{'?' if cluster is None else cluster} on all engines")
            if self._records.history_size is not None:
                detail += f", {self._records.history_size} in the history"
            if waiting:
                detail += f"; {waiting} record(s) being written"
            return ComponentStatus("connected", True, detail + drops)
        # calls never depend on the store: it never makes the engine unready
        if not self._link.running:
            return ComponentStatus("stopped", True, f"not connected to {self.url}; {waiting} record(s) not "
                                   f"written{drops}")
        tail = f"calls go on, {waiting} record(s) waiting to be written{drops}"
        if self.last_error:
            return ComponentStatus("disconnected", True,
                                   f"not connected to {self.url}: {self.last_error} (retrying); {tail}")
        return ComponentStatus("connecting", True, f"connecting to {self.url}; {tail}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "buffered": self._writes.buffered, "errors": self.errors, "connected": self._link.protocol is not None,
            "live": len(self._live), "dropped": self.dropped, "reconnects": self.reconnects,
        }
        cluster = self.cluster_active()
        if cluster is not None:
            stats["cluster_active"] = cluster
        if self._records.history_size is not None:
            stats["history"] = self._records.history_size
        return stats
