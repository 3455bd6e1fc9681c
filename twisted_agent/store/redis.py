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
and finished records only as a last resort.

Reads: this engine's own live calls (and its finished calls not written yet) come from memory,
everything else from Redis; ``history()`` first waits briefly for this engine's queued writes, so
an engine reads its own writes. Without Redis, ``live_calls()`` lists this engine's calls,
``get_call()`` answers for them, and the rest fails with ``StoreUnavailable`` saying why.

The connection is a ``ClientService`` with back-off; ``prepareConnection`` sends AUTH and SELECT
(txredisapi's own reconnecting factory is not used). Every round trip is bounded in time; one that
times out drops the connection, which is then re-established like any other lost one.
"""

from __future__ import annotations

import json
import math
import random
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, FirstError, TimeoutError, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import StoreConfig
from twisted_agent.config_display import mask_url_password
from twisted_agent.status import ComponentStatus
from twisted_agent.store.interfaces import HistoryRecord, ICallStore, LiveRecord, StoreUnavailable
from twisted_agent.store.memory import matches

#: seconds to open a TCP/TLS/unix connection to Redis
CONNECT_TIMEOUT = 5.0
#: seconds a handshake or a batch of writes may wait for Redis's replies before the connection is dropped
WRITE_TIMEOUT = 5.0
#: seconds one round trip of a read may take
READ_TIMEOUT = 3.0
#: seconds a history read waits for this engine's own queued writes to reach Redis (read your writes)
READ_FLUSH_WAIT = 1.0
#: seconds ``stop()`` waits for the queue to reach Redis, and then for the disconnection
STOP_TIMEOUT = 2.0
#: pause before retrying writes that Redis refused (out of memory, read-only replica ...)
RETRY_AFTER_ERROR = 1.0
#: queued records sent in one pipelined batch
BATCH_RECORDS = 200
#: history records fetched per round trip while searching
HISTORY_PAGE = 200
#: a history search stops (returning what it found) after scanning this long; the admin UI gives up
#: on a read after 5 s
HISTORY_SEARCH_TIME = 3.0

DAY = 86400.0


# --- where Redis is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """What ``REDIS_URL`` says: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS)
    or ``unix:/path/to/socket[?db=N]``."""

    scheme: str
    host: str
    port: int
    path: str
    username: str
    password: str
    db: int

    @property
    def where(self) -> str:
        """host:port (or the socket path): what an operator looks for in an error message."""
        if self.scheme == "unix":
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return RedisAddress("unix", "", 0, parts.path, username, password, int(db) if db.isdigit() else 0)
    db = parts.path.strip("/")
    return RedisAddress(parts.scheme, parts.hostname or "127.0.0.1", parts.port or 6379, "", username, password,
                        int(db) if db.isdigit() else 0)


def redis_endpoint(reactor: Any, address: RedisAddress, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.scheme == "rediss":
        # verified against the system's trusted CAs and the host name in REDIS_URL
        endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    return endpoint


class RedisKeys:
    """Every key this store writes, all below ``prefix:``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.live_index = f"{prefix}:live"
        self.history = f"{prefix}:history"

    def live(self, call_id: str) -> str:
        return f"{self.prefix}:live:{call_id}"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}:call:{call_id}"


def live_member(engine_id: str, call_id: str) -> str:
    return json.dumps([engine_id, call_id], separators=(",", ":"))


def parse_live_member(member: str) -> tuple[str, str] | None:
    """(engine id, call id) of a live index member; None for anything this store did not write."""
    try:
        value = json.loads(member)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


# --- the connection ---------------------------------------------------------------------------


class RedisTimeout(Exception):
    """Redis did not answer in time (the connection is dropped)."""


class _RedisConnection(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol, with the handshake left to the store.

    Built without password and database, so txredisapi's ``connectionMade`` does no AUTH/SELECT
    through the reconnecting factory it expects; the store sends them in ``prepareConnection``.
    Numbers are not converted: call ids such as Asterisk's ``1700000000.42`` must stay strings.
    """

    def __init__(self, lost: Callable[[_RedisConnection, Failure], None], clock: IReactorTime) -> None:
        super().__init__(charset="utf-8", convertNumbers=False)
        # txredisapi schedules its line-mode resumption on the global reactor unless told otherwise
        self.callLater = clock.callLater
        self.prepared = False
        #: why the store dropped this connection ("" if it did not)
        self.abort_reason = ""
        self._lost = lost

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        if self.transport is not None:
            self.transport.abortConnection()

    def mark_prepared(self) -> _RedisConnection:
        """The handshake succeeded: from now on a lost connection is the store's business."""
        self.prepared = True
        return self

    def lost_unprepared(self, reason: Failure) -> None:
        """The connection ended during the handshake (called instead of ClientService's notification)."""
        self.connectionLost(reason)

    def connectionLost(self, why: Failure = connectionDone) -> None:
        super().connectionLost(why)
        if self.prepared:
            self._lost(self, why)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, lost: Callable[[_RedisConnection, Failure], None], clock: IReactorTime) -> None:
        self._lost = lost
        self._clock = clock

    def buildProtocol(self, addr: IAddress | None) -> _RedisConnection:
        protocol = _RedisConnection(self._lost, self._clock)
        protocol.factory = self
        return protocol


@implementer(IProtocol)
class _HandshakeGuard:
    """Stands between the transport and ClientService's protocol wrapper.

    ClientService's state machine expects a lost-connection notification only for a connection
    ``prepareConnection`` accepted (anything else raises ``NoTransition``); a connection that ends
    during AUTH/SELECT is a failed attempt, which the failed prepare Deferred already reports. So
    until the handshake succeeds, a lost connection goes to the Redis protocol alone.
    """

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def makeConnection(self, transport: ITransport) -> None:
        self.wrapped.makeConnection(transport)

    def connectionMade(self) -> None:
        """Part of IProtocol; makeConnection already told the wrapped protocol."""

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.wrapped.prepared:
            self.wrapped.connectionLost(reason)
        else:
            self.wrapped.lost_unprepared(reason)


@implementer(IProtocolFactory)
class _GuardFactory:
    def __init__(self, wrapped: IProtocolFactory) -> None:
        self._wrapped = wrapped

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        built = self._wrapped.buildProtocol(addr)
        return None if built is None else _HandshakeGuard(built)

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """Connects through ``inner``, guarding each connection; reports failed connection attempts."""

    def __init__(self, inner: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self._inner = inner
        self._failed = failed

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def unguard(guard: Any) -> Any:
            return guard.wrapped

        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        return self._inner.connect(_GuardFactory(protocolFactory)).addCallbacks(unguard, failed)


@implementer(ILogObserver)
class _AsDebug:
    """Passes events on to the global log publisher at debug level."""

    def __call__(self, event: LogEvent) -> None:
        globalLogPublisher({**event, "log_level": LogLevel.debug})


class _RedisService(ClientService):
    # ClientService logs every scheduled retry at info; the store logs the outage once instead
    _log = Logger(observer=_AsDebug())


# --- the queue of writes ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Write:
    kind: Literal["live", "finished"]
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
        self.address = parse_redis_url(config.redis_url)
        #: REDIS_URL with the password masked, for logs and /health
        self.url = mask_url_password(config.redis_url)
        self.keys = RedisKeys(config.prefix)
        #: failed or dropped writes and failed refreshes since start (for /metrics)
        self.errors = 0
        #: records dropped because the queue was full
        self.dropped = 0
        #: successful connections after the first
        self.reconnects = 0
        #: why the last attempt failed or the last connection ended ("" if nothing went wrong yet)
        self.last_error = ""

        #: this engine's live calls: call id -> (started_at, JSON of the record)
        self._live: dict[str, tuple[float, str]] = {}
        #: writes waiting for Redis, oldest first, by (kind, call id)
        self._queue: OrderedDict[tuple[str, str], _Write] = OrderedDict()
        #: the batch being written (back to the queue's front if it fails)
        self._in_flight: list[_Write] = []
        self._seq = 0
        #: (seq, Deferred) fired once every write up to seq reached Redis or was superseded
        self._flush_waiters: list[tuple[int, Deferred[None]]] = []

        #: the connection, once AUTH and SELECT succeeded
        self._protocol: _RedisConnection | None = None
        self._needs_resync = False
        self._draining = False
        self._refreshing = False
        #: live calls of other engines, as last counted (None: not known yet)
        self._others_live: int | None = None
        self._history_size: int | None = None
        self._running = False
        self._ever_connected = False
        self._outage_since: float | None = None
        self._outage_logged = False
        self._write_error = ""

        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self._clock
        if retry_policy is None:
            retry_policy = backoffPolicy(initialDelay=0.5, factor=2, maxDelay=10, jitter=random.random)
        self._service = _RedisService(
            _GuardedEndpoint(endpoint or redis_endpoint(reactor, self.address), self._attempt_failed),
            _ConnectionFactory(self._connection_lost, self._clock),
            retryPolicy=retry_policy,
            clock=self._clock,
            prepareConnection=self._prepare,
        )

    # --- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._service.startService()
        self._heartbeat.start(self._config.live_ttl / 3, now=False)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._running:
            return
        try:
            if self._protocol is not None:
                await self._wait_flushed(STOP_TIMEOUT)
            self._running = False
            if self._heartbeat.running:
                self._heartbeat.stop()
            waiting = self._buffered()
            if waiting:
                self.log.warn("Redis store: stopping with {waiting} record(s) not written to {url} ({problem})",
                              waiting=waiting, url=self.url, problem=self.last_error or "Redis was too slow")
            stopped = self._service.stopService()
            stopped.addTimeout(STOP_TIMEOUT, self._clock)
            try:
                await stopped
            except (TimeoutError, CancelledError):
                self.log.warn("Redis store: the connection to {url} did not close within {timeout}s",
                              url=self.url, timeout=STOP_TIMEOUT)
        except Exception:
            self.log.failure("Redis store: stopping failed")
        finally:
            self._running = False

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

    def _enqueue(self, kind: Literal["live", "finished"], call_id: str, text: str, score: float) -> None:
        self._seq += 1
        write = _Write(kind, call_id, text, score, self._seq)
        self._queue.pop(write.key, None)
        if kind == "finished":
            self._queue.pop(("live", call_id), None)  # deleting the live record is part of the finish
        self._queue[write.key] = write
        self._bound()
        self._kick()

    def _bound(self) -> None:
        while len(self._queue) > self._config.buffer_max:
            # a live update is the cheapest loss: a later update, the finish, or the rewrite of every
            # live record on reconnection supersedes it
            victim = next((key for key, write in self._queue.items() if write.kind == "live"), None)
            write = self._queue.pop(victim if victim is not None else next(iter(self._queue)))
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
        self._check_flushed()

    def _buffered(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def _kick(self) -> None:
        if self._draining or self._protocol is None:
            return
        self._draining = True
        Deferred.fromCoroutine(self._drain()).addErrback(
            lambda failure: self.log.failure("Redis store: the writer failed", failure))

    async def _drain(self) -> None:
        """The single writer: while connected, write the queue in order, a pipelined batch at a time."""
        protocol = None
        try:
            while (protocol := self._protocol) is not None:
                if self._needs_resync:
                    self._needs_resync = False
                    try:
                        await self._resync(protocol)
                    except Exception as e:
                        self._needs_resync = True
                        if not await self._write_failed(protocol, e):
                            break
                    continue
                if not self._queue:
                    break
                batch = [self._queue.popitem(last=False)[1] for _ in range(min(BATCH_RECORDS, len(self._queue)))]
                self._in_flight = batch
                try:
                    await self._write(protocol, batch)
                except Exception as e:
                    self._in_flight = []
                    self._requeue(batch)
                    if not await self._write_failed(protocol, e):
                        break
                else:
                    self._in_flight = []
                    self._write_error = ""
                self._check_flushed()
        finally:
            self._draining = False
            self._check_flushed()
        # a new connection may have come while the last write on the old one was failing
        if self._protocol not in (None, protocol) and (self._queue or self._needs_resync):
            self._kick()

    async def _write_failed(self, protocol: _RedisConnection, e: Exception) -> bool:
        """Whether to go on writing on this connection after ``e``."""
        if not isinstance(e, txredisapi.ResponseError):
            return False  # the connection is gone (or dropped after a timeout): reconnection resumes
        self.errors += 1
        problem = str(e)
        if problem != self._write_error:
            self._write_error = problem
            self.log.warn("Redis store: Redis at {where} refused a write ({problem}); retrying every {delay}s, "
                          "{waiting} record(s) waiting", where=self.address.where, problem=problem,
                          delay=RETRY_AFTER_ERROR, waiting=self._buffered())
        await deferLater(self._clock, RETRY_AFTER_ERROR, lambda: None)
        return self._protocol is protocol

    def _requeue(self, batch: Sequence[_Write]) -> None:
        """Put a failed batch back at the queue's front, except what newer writes superseded."""
        for write in reversed(batch):
            if write.key in self._queue or (write.kind == "live" and ("finished", write.call_id) in self._queue):
                continue
            self._queue[write.key] = write
            self._queue.move_to_end(write.key, last=False)
        self._bound()

    async def _write(self, protocol: _RedisConnection, batch: Sequence[_Write]) -> None:
        keys = self.keys
        now = self._clock.seconds()
        live_ms = max(1, int(self._config.live_ttl * 1000))
        keep_s = self._config.history_days * DAY
        commands: list[tuple[Any, ...]] = []
        finished = False
        for write in batch:
            member = live_member(self.engine_id, write.call_id)
            if write.kind == "live":
                # the record before its index entry: whoever sees the entry finds the record
                commands += [("SET", keys.live(write.call_id), write.text, "PX", live_ms),
                             ("ZADD", keys.live_index, write.score, member)]
                continue
            finished = True
            keep_ms = int((write.score + keep_s - now) * 1000)
            if keep_ms > 0:  # a call that ended before the history's horizon is not kept at all
                commands += [("SET", keys.call(write.call_id), write.text, "PX", keep_ms),
                             ("ZADD", keys.history, write.score, write.call_id)]
            commands += [("DEL", keys.live(write.call_id)), ("ZREM", keys.live_index, member)]
        if finished:
            beyond = -(self._config.history_max + 1)
            commands += [("ZREMRANGEBYSCORE", keys.history, "-inf", f"({now - keep_s:.6f}"),
                         ("ZRANGE", keys.history, 0, beyond),
                         ("ZREMRANGEBYRANK", keys.history, 0, beyond),
                         ("ZCARD", keys.history)]
        replies = await self._run(protocol, commands, WRITE_TIMEOUT)
        if finished:
            self._history_size = int(replies[-1])
            trimmed = replies[-3]
            if trimmed:
                await self._run(protocol, [("DEL", *[keys.call(call_id) for call_id in trimmed])], WRITE_TIMEOUT)

    async def _resync(self, protocol: _RedisConnection) -> None:
        """On (re)connection: delete this engine's live records this process does not know, and
        rewrite all it does (Redis may have restarted empty, or expired them during the outage)."""
        members = (await self._run(protocol, [("ZRANGE", self.keys.live_index, 0, -1)], WRITE_TIMEOUT))[0]
        finishing = {write.call_id for write in [*self._in_flight, *self._queue.values()] if write.kind == "finished"}
        stale = []
        for member in members:
            parsed = parse_live_member(member)
            if parsed is None or parsed[0] != self.engine_id or parsed[1] in finishing:
                continue  # another engine's, or one whose queued finish deletes it in order
            if parsed[1] not in self._live:
                stale.append((member, parsed[1]))
        # the rewrite below supersedes every live update still queued
        for key in [key for key in self._queue if key[0] == "live"]:
            del self._queue[key]
        self._check_flushed()
        live_ms = max(1, int(self._config.live_ttl * 1000))
        commands: list[tuple[Any, ...]] = []
        for member, call_id in stale:
            commands += [("DEL", self.keys.live(call_id)), ("ZREM", self.keys.live_index, member)]
        for call_id, (started, text) in self._live.items():
            commands += [("SET", self.keys.live(call_id), text, "PX", live_ms),
                         ("ZADD", self.keys.live_index, started, live_member(self.engine_id, call_id))]
        if commands:
            await self._run(protocol, commands, WRITE_TIMEOUT)
        if stale:
            self.log.info("Redis store: removed {count} live record(s) of engine {engine_id} left by a previous run",
                          count=len(stale), engine_id=self.engine_id, call_ids=[c for _, c in stale])
        self._beat()

    # --- waiting for the queue --------------------------------------------------------------------

    def _pending_floor(self) -> float:
        """The seq of the oldest write not yet in Redis (infinity if none)."""
        if self._in_flight:
            return self._in_flight[0].seq
        for write in self._queue.values():
            return write.seq
        return math.inf

    def _check_flushed(self, everything: bool = False) -> None:
        floor = math.inf if everything else self._pending_floor()
        ready = [d for seq, d in self._flush_waiters if seq < floor]
        self._flush_waiters = [(seq, d) for seq, d in self._flush_waiters if seq >= floor]
        for d in ready:
            if not d.called:  # it may have timed out
                d.callback(None)

    async def _wait_flushed(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until what was queued so far reached Redis: read your own writes.

        Cancelling the caller cancels the wait (only the timeout ends it quietly)."""
        if self._pending_floor() > self._seq:
            return
        d: Deferred[None] = Deferred()
        self._flush_waiters.append((self._seq, d))
        timer = self._clock.callLater(timeout, lambda: None if d.called else d.callback(None))
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    # --- the heartbeat ----------------------------------------------------------------------------

    def _beat(self) -> Deferred[None] | None:
        protocol = self._protocol
        if protocol is None or self._refreshing or self._needs_resync:
            return None
        self._refreshing = True
        return Deferred.fromCoroutine(self._refresh(protocol))

    async def _refresh(self, protocol: _RedisConnection) -> None:
        """Keep this engine's live records alive, and count everyone's (pruning the expired)."""
        try:
            own = list(self._live)
            live_ms = max(1, int(self._config.live_ttl * 1000))
            commands: list[tuple[Any, ...]] = [("PEXPIRE", self.keys.live(call_id), live_ms) for call_id in own]
            commands += [("ZRANGE", self.keys.live_index, 0, -1), ("ZCARD", self.keys.history)]
            replies = await self._run(protocol, commands, READ_TIMEOUT)
            for call_id, kept in zip(own, replies, strict=False):
                if not kept and call_id in self._live:
                    # Redis lost it (flushed, or restarted without persistence): write it again
                    started, text = self._live[call_id]
                    self._enqueue("live", call_id, text, started)
            self._history_size = int(replies[-1])
            others = []
            for member in replies[-2]:
                parsed = parse_live_member(member)
                if parsed is not None and parsed[0] != self.engine_id:
                    others.append((member, parsed[1]))
            found = await self._existing(protocol, others)
            self._others_live = len(found)
        except Exception as e:
            if isinstance(e, txredisapi.ResponseError):
                self.errors += 1
                self.log.warn("Redis store: refreshing the live records failed: {problem}", problem=str(e))
            # otherwise the connection is gone: the loss is logged where it is noticed
        finally:
            self._refreshing = False

    async def _existing(self, protocol: _RedisConnection, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The live index entries whose record still exists; removes the others from the index."""
        if not entries:
            return []
        exists = await self._run(protocol, [("EXISTS", self.keys.live(call_id)) for _, call_id in entries],
                                 READ_TIMEOUT)
        gone = [member for (member, _), there in zip(entries, exists, strict=True) if not there]
        if gone:
            await self._run(protocol, [("ZREM", self.keys.live_index, *gone)], READ_TIMEOUT)
        return [entry for entry, there in zip(entries, exists, strict=True) if there]

    # --- reads ----------------------------------------------------------------------------------

    def live_calls(self) -> Deferred[list[LiveRecord]]:
        return Deferred.fromCoroutine(self._live_calls())

    async def _live_calls(self) -> list[LiveRecord]:
        # this engine's own calls come from memory: always current, whether or not Redis is
        records = [json.loads(text) for _, text in self._live.values()]
        protocol = self._protocol
        if protocol is not None:
            try:
                records += await self._others_records(protocol)
            except CancelledError:
                raise
            except Exception as e:
                # the admin page polls this: show this engine's calls, and say nothing more than debug
                self.log.debug("Redis store: listing live calls failed: {problem}", problem=self._describe(e))
        records.sort(key=lambda r: (_number(r.get("started_at")), str(r.get("call_id", ""))))
        return records

    async def _others_records(self, protocol: _RedisConnection) -> list[LiveRecord]:
        members = (await self._run(protocol, [("ZRANGE", self.keys.live_index, 0, -1)], READ_TIMEOUT))[0]
        others = []
        for member in members:
            parsed = parse_live_member(member)
            if parsed is not None and parsed[0] != self.engine_id:
                others.append((member, parsed[1]))
        if not others:
            self._others_live = 0
            return []
        texts = (await self._run(protocol, [("MGET", *[self.keys.live(c) for _, c in others])], READ_TIMEOUT))[0]
        records = []
        gone = []
        for (member, _), text in zip(others, texts, strict=True):
            if text is None:
                gone.append(member)  # its engine stopped refreshing it: it is dead
            elif (record := self._decode(text)) is not None:
                records.append(record)
        if gone:
            await self._run(protocol, [("ZREM", self.keys.live_index, *gone)], READ_TIMEOUT)
        self._others_live = len(records)  # a fresher count for cluster_active() than the heartbeat's
        return records

    def get_call(self, call_id: str) -> Deferred[LiveRecord | HistoryRecord | None]:
        return Deferred.fromCoroutine(self._get_call(call_id))

    async def _get_call(self, call_id: str) -> LiveRecord | HistoryRecord | None:
        local = self._local_text(call_id)
        if local is not None:
            return self._decode(local)
        protocol = self._protocol
        if protocol is None:
            raise StoreUnavailable(self._unavailable())
        try:
            live, finished = await self._run(protocol, [("GET", self.keys.live(call_id)),
                                                        ("GET", self.keys.call(call_id))], READ_TIMEOUT)
        except CancelledError:
            raise
        except Exception as e:
            raise StoreUnavailable(self._unavailable(e)) from None
        text = live if live is not None else finished
        return None if text is None else self._decode(text)

    def _local_text(self, call_id: str) -> str | None:
        """This engine's freshest record of a call: live, or finished and not yet written."""
        if call_id in self._live:
            return self._live[call_id][1]
        write = self._queue.get(("finished", call_id))
        if write is not None:
            return write.text
        for write in self._in_flight:
            if write.key == ("finished", call_id):
                return write.text
        return None

    def history(self, number: str = "", since: float | None = None, until: float | None = None,
                limit: int = 100) -> Deferred[list[HistoryRecord]]:
        return Deferred.fromCoroutine(self._history(number, since, until, limit))

    async def _history(self, number: str, since: float | None, until: float | None,
                       limit: int) -> list[HistoryRecord]:
        if self._protocol is None:
            raise StoreUnavailable(self._unavailable())
        await self._wait_flushed(READ_FLUSH_WAIT)
        protocol = self._protocol
        if protocol is None:
            raise StoreUnavailable(self._unavailable())
        try:
            return await self._search(protocol, number, since, until, limit)
        except CancelledError:
            raise
        except Exception as e:
            raise StoreUnavailable(self._unavailable(e)) from None

    async def _search(self, protocol: _RedisConnection, number: str, since: float | None, until: float | None,
                      limit: int) -> list[HistoryRecord]:
        now = self._clock.seconds()
        lowest = now - self._config.history_days * DAY
        if since is not None:
            lowest = max(lowest, since)  # a call cannot end before it started
        deadline = now + HISTORY_SEARCH_TIME
        found: list[HistoryRecord] = []
        seen: set[str] = set()
        offset = 0
        while len(found) < limit and offset < self._config.history_max:
            page = min(HISTORY_PAGE, self._config.history_max - offset)
            call_ids = (await self._run(protocol, [("ZREVRANGEBYSCORE", self.keys.history, "+inf", f"{lowest:.6f}",
                                                    "LIMIT", offset, page)], READ_TIMEOUT))[0]
            if not call_ids:
                break
            texts = (await self._run(protocol, [("MGET", *[self.keys.call(c) for c in call_ids])], READ_TIMEOUT))[0]
            for call_id, text in zip(call_ids, texts, strict=True):
                record = None if text is None or call_id in seen else self._decode(text)
                seen.add(call_id)
                if record is not None and matches(record, number, since, until):
                    found.append(record)
                    if len(found) >= limit:
                        break
            offset += len(call_ids)
            if len(call_ids) < page:
                break
            if self._clock.seconds() > deadline:
                self.log.info("Redis store: a history search stopped after {scanned} calls ({seconds}s)",
                              scanned=offset, seconds=HISTORY_SEARCH_TIME)
                break
        return found

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

    def _prepare(self, protocol: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self._handshake(protocol))

    async def _handshake(self, protocol: Any) -> None:
        commands: list[tuple[Any, ...]] = []
        if self.address.password:
            auth = (self.address.username, self.address.password) if self.address.username else \
                (self.address.password,)
            commands.append(("AUTH", *auth))
        if self.address.db:
            commands.append(("SELECT", self.address.db))
        commands.append(("PING",))  # NOAUTH and LOADING show here, before anything is written
        try:
            await self._run(protocol, commands, WRITE_TIMEOUT)
        except Exception as e:
            protocol.abort("handshake failed")
            if not (isinstance(e, CancelledError) and not self._running):
                self._attempt_failed(Failure(e))
            raise
        self._connected(protocol.mark_prepared())

    def _connected(self, protocol: _RedisConnection) -> None:
        self._protocol = protocol
        if self._ever_connected:
            self.reconnects += 1
            outage = self._clock.seconds() - self._outage_since if self._outage_since is not None else 0.0
            self.log.info("Redis store: reconnected to {url} after {outage:.1f}s; writing {waiting} waiting "
                          "record(s)", url=self.url, outage=outage, waiting=self._buffered(),
                          reconnects=self.reconnects)
        else:
            self.log.info("Redis store: connected to {url} as engine {engine_id}", url=self.url,
                          engine_id=self.engine_id, waiting=self._buffered())
        self._ever_connected = True
        self._outage_since = None
        self._outage_logged = False
        self._needs_resync = True
        self._kick()

    def _connection_lost(self, protocol: _RedisConnection, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._check_flushed(everything=True)  # nothing more reaches Redis for now: readers stop waiting
        if not self._running:
            self.log.info("Redis store: disconnected from {url}", url=self.url)
            return
        problem = protocol.abort_reason or self._describe(reason.value)
        self.last_error = problem
        self._outage_since = self._clock.seconds()
        self._outage_logged = True
        self.log.warn("Redis store: lost the connection to {url}: {problem}; calls go on, their records wait in "
                      "memory until Redis is back", url=self.url, problem=problem)

    def _attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError, net_error.ConnectingCancelledError) and not self._running:
            return  # stop() cancelled the attempt
        problem = self._describe(failure.value)
        self.last_error = problem
        if self._outage_since is None:
            self._outage_since = self._clock.seconds()
        if not self._outage_logged:
            self._outage_logged = True
            self.log.warn("Redis store: cannot connect to {url}: {problem}; retrying with back-off (calls go on, "
                          "their records wait in memory)", url=self.url, problem=problem)
        else:
            self.log.debug("Redis store: connecting to {url} failed again: {problem}", url=self.url, problem=problem)

    def _describe(self, error: object) -> str:
        where = self.address.where
        if isinstance(error, txredisapi.ResponseError):
            text = str(error)
            if text.startswith(("WRONGPASS", "invalid password", "invalid username")):
                return f"Redis at {where} rejected the credentials ({text}): check the password in REDIS_URL"
            if text.startswith("NOAUTH"):
                return (f"Redis at {where} requires a password: put it in REDIS_URL "
                        "(redis://:PASSWORD@host:port/db)")
            if "DB index" in text:
                return f"Redis at {where} has no database {self.address.db} ({text}): fix the number in REDIS_URL"
            if text.startswith("LOADING"):
                return f"Redis at {where} is still loading its data"
            return f"Redis at {where} answered with an error: {text}"
        if isinstance(error, RedisTimeout):
            return f"{where} did not answer within {error}"
        if isinstance(error, net_error.ConnectionRefusedError):
            return f"connection refused by {where}"
        if isinstance(error, net_error.DNSLookupError):
            return f"cannot resolve the host name of {where}"
        if isinstance(error, net_error.TimeoutError | net_error.TCPTimedOutError):
            return f"connecting to {where} timed out"
        if isinstance(error, net_error.ConnectionDone | net_error.ConnectionLost | txredisapi.ConnectionError):
            return f"{where} closed the connection"
        if type(error).__module__.startswith(("OpenSSL", "service_identity")):
            return f"TLS with {where} failed ({error}): check rediss:// and the host name in REDIS_URL"
        text = " ".join(str(error).split())
        return f"{type(error).__name__}: {text}" if text else type(error).__name__

    def _unavailable(self, error: object = None) -> str:
        """The text of StoreUnavailable: what an admin sees instead of the page."""
        if error is None:
            problem = self.last_error or ("stopped" if not self._running else "not connected yet")
        else:
            problem = self._describe(error)
        if problem.startswith("Redis at"):
            return problem  # it says where already, and that Redis answered
        return f"Redis at {self.address.where} is unreachable: {problem}"

    async def _run(self, protocol: Any, commands: Sequence[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send ``commands`` at once (pipelined) and return their replies, bounded by ``timeout``.

        An error reply raises its ``ResponseError``. No reply in time raises :class:`RedisTimeout`
        and drops the connection: a Redis that stalls is treated like one that went away.
        """
        pending: list[Deferred[Any]] = []
        try:
            for command in commands:
                pending.append(protocol.execute_command(*command))
        except Exception:
            for d in pending:
                d.addErrback(lambda _: None)
            raise
        gathered = gatherResults(pending, consumeErrors=True)
        expired = []

        def expire() -> None:
            expired.append(True)
            gathered.cancel()

        timer = self._clock.callLater(timeout, expire)
        try:
            return await gathered
        except FirstError as e:
            if expired:
                timed_out = RedisTimeout(f"{timeout:g}s")
                protocol.abort(self._describe(timed_out))
                raise timed_out from None
            e.subFailure.raiseException()
        finally:
            if timer.active():
                timer.cancel()

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> ComponentStatus:
        try:
            return self._status()
        except Exception as e:  # must not raise: /health calls it
            return ComponentStatus("error", True, f"Redis store status failed: {type(e).__name__}: {e}")

    def _status(self) -> ComponentStatus:
        waiting = self._buffered()
        drops = f"; {self.dropped} record(s) dropped (buffer full)" if self.dropped else ""
        if self._protocol is not None:
            cluster = self.cluster_active()
            detail = (f"connected to {self.url} as engine {self.engine_id!r}: {len(self._live)} live call(s) here, "
                      f"{'?' if cluster is None else cluster} on all engines")
            if self._history_size is not None:
                detail += f", {self._history_size} in the history"
            if waiting:
                detail += f"; {waiting} record(s) being written"
            return ComponentStatus("connected", True, detail + drops)
        # calls never depend on the store: it never makes the engine unready
        if not self._running:
            return ComponentStatus("stopped", True, f"not connected to {self.url}; {waiting} record(s) not "
                                   f"written{drops}")
        tail = f"calls go on, {waiting} record(s) waiting to be written{drops}"
        if self.last_error:
            return ComponentStatus("disconnected", True,
                                   f"not connected to {self.url}: {self.last_error} (retrying); {tail}")
        return ComponentStatus("connecting", True, f"connecting to {self.url}; {tail}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "buffered": self._buffered(), "errors": self.errors, "connected": self._protocol is not None,
            "live": len(self._live), "dropped": self.dropped, "reconnects": self.reconnects,
        }
        cluster = self.cluster_active()
        if cluster is not None:
            stats["cluster_active"] = cluster
        if self._history_size is not None:
            stats["history"] = self._history_size
        return stats
