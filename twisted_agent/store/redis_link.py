"""Where Redis is and how the store talks to it: the address in ``REDIS_URL``, the connection (a
``ClientService`` with back-off whose ``prepareConnection`` sends AUTH and SELECT; txredisapi's
own reconnecting factory is not used), bounded round trips, and what to tell an operator when
Redis cannot be reached.

Every round trip is bounded in time; one that times out drops the connection, which is then
re-established like any other lost one. An outage is logged once, as a warning saying what to fix.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import backoffPolicy
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, FirstError, TimeoutError, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_agent.config_display import mask_url_password
from twisted_agent.reconnect import GuardedEndpoint, QuietClientService
from twisted_agent.tls import load_trust_root, tls_failure

#: seconds to open a TCP/TLS/unix connection to Redis
CONNECT_TIMEOUT = 5.0
#: seconds a handshake or a batch of writes may wait for Redis's replies before the connection is dropped
WRITE_TIMEOUT = 5.0
#: seconds ``stop()`` waits for the queue to reach Redis, and then for the disconnection
STOP_TIMEOUT = 2.0


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


def redis_endpoint(reactor: Any, address: RedisAddress, timeout: float = CONNECT_TIMEOUT,
                   ca_file: str = "") -> IStreamClientEndpoint:
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.scheme == "rediss":
        # verified against REDIS_TLS_CA_FILE (or the system's trusted CAs) and the host name in REDIS_URL
        if ca_file:
            options = optionsForClientTLS(address.host, trustRoot=load_trust_root(ca_file))
        else:
            options = optionsForClientTLS(address.host)
        endpoint = wrapClientTLS(options, endpoint)
    return endpoint


# --- the connection ---------------------------------------------------------------------------


class RedisTimeout(Exception):
    """Redis did not answer in time (the connection is dropped)."""


class RedisConnection(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol, with the handshake left to :class:`RedisLink`.

    Built without password and database, so txredisapi's ``connectionMade`` does no AUTH/SELECT
    through the reconnecting factory it expects; the link sends them in ``prepareConnection``.
    Numbers are not converted: call ids such as Asterisk's ``1700000000.42`` must stay strings.
    """

    def __init__(self, lost: Callable[[RedisConnection, Failure], None], clock: IReactorTime) -> None:
        super().__init__(charset="utf-8", convertNumbers=False)
        # txredisapi schedules its line-mode resumption on the global reactor unless told otherwise
        self.callLater = clock.callLater
        self.prepared = False
        #: why the store dropped this connection ("" if it did not)
        self.abort_reason = ""
        #: why the transport ended, once it did (a TLS failure shows here, not in the replies)
        self.lost_why: Failure | None = None
        self._lost = lost

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        if self.transport is not None:
            self.transport.abortConnection()

    def mark_prepared(self) -> RedisConnection:
        """The handshake succeeded: from now on a lost connection is the store's business."""
        self.prepared = True
        return self

    def lost_unprepared(self, reason: Failure) -> None:
        """The connection ended during the handshake (called instead of ClientService's notification)."""
        self.connectionLost(reason)

    def connectionLost(self, why: Failure = connectionDone) -> None:
        self.lost_why = why  # before the pending replies fail with txredisapi's plain ConnectionError
        super().connectionLost(why)
        if self.prepared:
            self._lost(self, why)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, lost: Callable[[RedisConnection, Failure], None], clock: IReactorTime) -> None:
        self._lost = lost
        self._clock = clock

    def buildProtocol(self, addr: IAddress | None) -> RedisConnection:
        protocol = RedisConnection(self._lost, self._clock)
        protocol.factory = self
        return protocol


class RedisLink:
    """The store's connection to Redis, kept up with back-off while running.

    ``connected(outage)`` is called when a connection is ready (``outage``: seconds without one,
    None the first time), ``lost()`` when it ended; ``protocol`` is the ready connection, if any.
    Messages go to ``log``, the store's logger: an operator sees them all from the store.
    """

    def __init__(
        self,
        reactor: Any,
        redis_url: str,
        log: Logger,
        *,
        connected: Callable[[float | None], None],
        lost: Callable[[], None],
        retry_policy: Callable[[int], float] | None = None,
        endpoint: IStreamClientEndpoint | None = None,
        ca_file: str = "",
    ) -> None:
        self._clock: IReactorTime = reactor
        self.log = log
        self.address = parse_redis_url(redis_url)
        #: REDIS_URL with the password masked, for logs and /health
        self.url = mask_url_password(redis_url)
        #: successful connections after the first
        self.reconnects = 0
        #: why the last attempt failed or the last connection ended ("" if nothing went wrong yet)
        self.last_error = ""
        #: the connection, once AUTH and SELECT succeeded
        self.protocol: RedisConnection | None = None
        #: whether the store wants to be connected (between start() and stop())
        self.running = False
        self._on_connected = connected
        self._on_lost = lost
        self._ever_connected = False
        self._outage_since: float | None = None
        self._outage_logged = False
        if retry_policy is None:
            retry_policy = backoffPolicy(initialDelay=0.5, factor=2, maxDelay=10, jitter=random.random)
        self._service = QuietClientService(
            GuardedEndpoint(endpoint or redis_endpoint(reactor, self.address, ca_file=ca_file), self._attempt_failed),
            _ConnectionFactory(self._connection_lost, self._clock),
            retryPolicy=retry_policy,
            clock=self._clock,
            prepareConnection=self._prepare,
        )

    def start(self) -> None:
        self.running = True
        self._service.startService()

    async def stop(self) -> None:
        self.running = False
        stopped = self._service.stopService()
        stopped.addTimeout(STOP_TIMEOUT, self._clock)
        try:
            await stopped
        except (TimeoutError, CancelledError):
            self.log.warn("Redis store: the connection to {url} did not close within {timeout}s",
                          url=self.url, timeout=STOP_TIMEOUT)

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
            await self.run(protocol, commands, WRITE_TIMEOUT)
        except Exception as e:
            lost = protocol.lost_why
            protocol.abort("handshake failed")
            if not (isinstance(e, CancelledError) and not self.running):
                # the transport's reason says more than "closed" (e.g. the server's certificate was refused)
                cause = lost.value if lost is not None and not lost.check(
                    net_error.ConnectionDone, net_error.ConnectionLost) else e
                self._attempt_failed(Failure(cause))
            raise
        self._connected(protocol.mark_prepared())

    def _connected(self, protocol: RedisConnection) -> None:
        self.protocol = protocol
        outage = None
        if self._ever_connected:
            self.reconnects += 1
            outage = self._clock.seconds() - self._outage_since if self._outage_since is not None else 0.0
        self._ever_connected = True
        self._outage_since = None
        self._outage_logged = False
        self._on_connected(outage)

    def _connection_lost(self, protocol: RedisConnection, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self._on_lost()
        if not self.running:
            self.log.info("Redis store: disconnected from {url}", url=self.url)
            return
        problem = protocol.abort_reason or self.describe(reason.value)
        self.last_error = problem
        self._outage_since = self._clock.seconds()
        self._outage_logged = True
        self.log.warn("Redis store: lost the connection to {url}: {problem}; calls go on, their records wait in "
                      "memory until Redis is back", url=self.url, problem=problem)

    def _attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError, net_error.ConnectingCancelledError) and not self.running:
            return  # stop() cancelled the attempt
        problem = self.describe(failure.value)
        self.last_error = problem
        if self._outage_since is None:
            self._outage_since = self._clock.seconds()
        if not self._outage_logged:
            self._outage_logged = True
            self.log.warn("Redis store: cannot connect to {url}: {problem}; retrying with back-off (calls go on, "
                          "their records wait in memory)", url=self.url, problem=problem)
        else:
            self.log.debug("Redis store: connecting to {url} failed again: {problem}", url=self.url, problem=problem)

    # --- saying what went wrong -------------------------------------------------------------------

    def describe(self, error: object) -> str:
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
        if isinstance(error, Exception) and type(error).__module__.startswith(("OpenSSL", "service_identity")):
            return (f"TLS with {where} failed ({tls_failure(error)}): "
                    "check rediss://, the host name in REDIS_URL and REDIS_TLS_CA_FILE")
        text = " ".join(str(error).split())
        return f"{type(error).__name__}: {text}" if text else type(error).__name__

    def unavailable(self, error: object = None) -> str:
        """The text of StoreUnavailable: what an admin sees instead of the page."""
        if error is None:
            problem = self.last_error or ("stopped" if not self.running else "not connected yet")
        else:
            problem = self.describe(error)
        if problem.startswith("Redis at"):
            return problem  # it says where already, and that Redis answered
        return f"Redis at {self.address.where} is unreachable: {problem}"

    # --- round trips ------------------------------------------------------------------------------

    async def run(self, protocol: Any, commands: Sequence[tuple[Any, ...]], timeout: float) -> list[Any]:
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
                protocol.abort(self.describe(timed_out))
                raise timed_out from None
            e.subFailure.raiseException()
        finally:
            if timer.active():
                timer.cancel()
