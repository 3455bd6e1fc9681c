"""The ARI events WebSocket: a reconnecting client that hands typed events to listeners.

Layers, outermost first:

- :class:`ARIEventsService`, a ``ClientService`` with exponential back-off. Its
  ``prepareConnection`` waits for the WebSocket upgrade, so "connected" means Asterisk accepted
  the credentials and the app; a refused upgrade (401, 403, 503 while Asterisk boots ...) counts as
  a failed attempt and is retried like a refused TCP connection.
- :class:`ARIEventsProtocol`, a thin Autobahn protocol: text frames go to the dispatcher.
- :class:`EventDispatcher`, a plain object: parses frames and calls listeners. A malformed frame or
  a listener that raises is logged and skipped; the connection stays up.

State changes are logged once: the first failure of an outage as a warning (with what to fix),
repeats at debug, the connection at info.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import backoffPolicy
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent import __version__
from twisted_agent.ari.errors import describe_unreachable, summary
from twisted_agent.ari.events import ApplicationReplaced, ARIEventError, Event, parse_event
from twisted_agent.ari.interfaces import IARIEvents
from twisted_agent.config import ARIConfig
from twisted_agent.reconnect import GuardedEndpoint, QuietClientService
from twisted_agent.status import ComponentStatus
from twisted_agent.tls import client_tls_options

Listener = Callable[[Event], None]
ConnectionListener = Callable[[bool], None]

#: seconds between keepalive pings, and how long a pong may take before the connection is dropped
AUTO_PING_INTERVAL = 10
AUTO_PING_TIMEOUT = 5

_FRAME_PREVIEW = 200


# --- where and how to connect -----------------------------------------------------------------


def _host_port(config: ARIConfig) -> tuple[str, int, bool]:
    parts = urlsplit(config.url)
    secure = parts.scheme == "https"
    return parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80), secure


def events_url(config: ARIConfig) -> str:
    """``ws(s)://host:port[/prefix]/ari/events?app=NAME&subscribeAll=false`` for ``ARI_URL``."""
    host, port, secure = _host_port(config)
    shown = f"[{host}]" if ":" in host else host
    path = urlsplit(config.url).path.rstrip("/") + "/events"
    query = urlencode({"app": config.app, "subscribeAll": "false"})
    return f"{'wss' if secure else 'ws'}://{shown}:{port}{path}?{query}"


def events_endpoint(reactor: Any, config: ARIConfig) -> IStreamClientEndpoint:
    """TCP to Asterisk's HTTP port, wrapped in TLS (with ARI_TLS_CA_FILE) for https:// URLs."""
    host, port, secure = _host_port(config)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=config.request_timeout)
    if secure:
        endpoint = wrapClientTLS(client_tls_options(config, host), endpoint)
    return endpoint


def basic_auth_header(username: str, password: str) -> str:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


# --- why a connection attempt failed ----------------------------------------------------------


class UpgradeRejected(Exception):
    """Asterisk answered the upgrade request with an HTTP error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}".strip()


class UpgradeFailed(Exception):
    """The connection ended before the WebSocket upgrade completed."""


def upgrade_hint(status: int, reason: str, config: ARIConfig) -> str:
    """One line for a refused upgrade, with what to fix."""
    if status == 401:
        return "401 Authentication required: check ARI_USERNAME/ARI_PASSWORD (a user in ari.conf)"
    if status == 403:
        return (f"403 Forbidden: ARI user {config.username!r} is not allowed "
                "(ari.conf read_only, or an ACL in http.conf/ari.conf)")
    if status == 400:
        return f"400 Bad Request: Asterisk rejected the events request for app {config.app!r} (check ARI_APP)"
    if status == 404:
        return "404 Not Found: no ARI events endpoint there: check the prefix in ARI_URL and that res_ari is loaded"
    if status == 503:
        return "503 Service Unavailable: Asterisk is not fully booted yet"
    return f"{status} {reason or 'error'}: Asterisk refused the events WebSocket"


# --- frames to listeners ----------------------------------------------------------------------


class EventDispatcher:
    """Parse event frames and hand each event to every listener, in order received."""

    log = Logger()

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        #: counters, for status and tests
        self.received = 0
        self.malformed = 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def dispatch(self, frame: bytes | str) -> Event | None:
        """Parse one text frame and deliver it; None (logged) when it is not an ARI event."""
        try:
            event = parse_event(frame)
        except ARIEventError as e:
            self.malformed += 1
            preview = frame[:_FRAME_PREVIEW]
            self.log.warn("ignoring a malformed ARI event frame ({problem}): {frame!r}", problem=str(e),
                          frame=preview)
            return None
        self.received += 1
        self.deliver(event)
        return event

    def deliver(self, event: Event) -> None:
        for listener in list(self._listeners):
            with self.log.failuresHandled("ARI event listener {listener!r} failed on {event_type}",
                                          level=LogLevel.error, listener=listener, event_type=event.type):
                listener(event)


# --- the protocol -----------------------------------------------------------------------------


class ARIEventsProtocol(WebSocketClientProtocol):
    """Thin: frames to the dispatcher, and what became of the upgrade to the service."""

    factory: ARIEventsFactory

    def __init__(self) -> None:
        super().__init__()
        #: fires when the upgrade completes; fails with why it did not
        self.opened: Deferred[None] = Deferred(self._cancel_opening)
        self.upgraded = False
        self._rejection: Exception | None = None

    def _cancel_opening(self, _: Deferred[None]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def onOpen(self) -> None:
        self.upgraded = True
        if not self.opened.called:
            self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.factory.dispatcher.log.warn("ignoring a binary frame of {size} bytes on the ARI events socket",
                                             size=len(payload))
            return
        self.factory.dispatcher.dispatch(payload)

    def failHandshake(self, reason: str) -> None:
        # Autobahn logs each failed upgrade at info; the service logs the outage once instead.
        status_line = (getattr(self, "http_status_line", "") or "").split(None, 2)
        if len(status_line) >= 2 and status_line[1].isdigit() and status_line[1] != "101":
            self._rejection = UpgradeRejected(int(status_line[1]), status_line[2] if len(status_line) > 2 else "")
        else:
            self._rejection = UpgradeFailed(reason)
        self.wasNotCleanReason = reason
        self.dropConnection(abort=True)

    @property
    def prepared(self) -> bool:
        """For the guard in :mod:`twisted_agent.reconnect`: the handshake ClientService waits for is the upgrade."""
        return self.upgraded

    def lost_unprepared(self, reason: Failure) -> None:
        """The connection ended without an upgrade (called instead of the ClientService notification)."""
        self.connectionLost(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Autobahn's Twisted adapter only logs here (a TLS failure at error level, on every retry)
        # before the WebSocket teardown; the service logs the outage once instead.
        self._connectionLost(reason)
        if not self.opened.called:
            if self._rejection is not None:
                self.opened.errback(Failure(self._rejection))
            elif _is_tls_error(reason.value):
                self.opened.errback(reason)
            else:
                self.opened.errback(Failure(UpgradeFailed(self.wasNotCleanReason or reason.getErrorMessage())))
        elif self.upgraded:
            self.factory.service.connection_lost(self._loss(reason))

    def _loss(self, reason: Failure) -> str:
        not_clean = self.wasNotCleanReason or ""
        if "ping" in not_clean.lower():
            return f"no answer to a keepalive ping within {getattr(self, 'autoPingTimeout', AUTO_PING_TIMEOUT):g}s"
        code = getattr(self, "remoteCloseCode", None)
        if code is not None and not self.closedByMe:
            said = getattr(self, "remoteCloseReason", None)
            return f"Asterisk closed the WebSocket (code {code}{': ' + said if said else ''})"
        if not_clean:
            return f"connection lost ({not_clean})"
        return f"connection lost ({summary(reason.value) if reason.value is not None else 'no reason given'})"


def _is_tls_error(error: object) -> bool:
    return type(error).__module__.startswith(("OpenSSL", "service_identity"))


class ARIEventsFactory(WebSocketClientFactory):
    protocol = ARIEventsProtocol  # type: ignore[assignment]
    noisy = False  # no "Starting factory" at info on every attempt: the service logs the outage once

    def __init__(self, service: ARIEventsService, config: ARIConfig, reactor: Any) -> None:
        super().__init__(
            url=events_url(config),
            protocols=["ari"],
            useragent=f"twisted-agent/{__version__}",
            headers={"Authorization": basic_auth_header(config.username, config.password)},
            reactor=reactor,
        )
        self.setProtocolOptions(
            autoPingInterval=AUTO_PING_INTERVAL,
            autoPingTimeout=AUTO_PING_TIMEOUT,
            openHandshakeTimeout=config.request_timeout,
            closeHandshakeTimeout=1,
        )
        self.service = service
        self.dispatcher = service.dispatcher


# --- the service ------------------------------------------------------------------------------


@implementer(IARIEvents)
class ARIEventsService(QuietClientService):
    """The events WebSocket, reconnected with back-off for as long as the service runs."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: ARIConfig,
        *,
        clock: IReactorTime | None = None,
        retry_policy: Callable[[int], float] | None = None,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.config = config
        self.url = events_url(config)
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.dispatcher = EventDispatcher()
        self.dispatcher.add_listener(self._watch)
        if retry_policy is None:
            retry_policy = backoffPolicy(initialDelay=0.5, factor=2, maxDelay=config.reconnect_max_delay,
                                         jitter=random.random)
        #: the WebSocket factory (protocol options such as the keepalive live here)
        self.factory = ARIEventsFactory(self, config, reactor)
        super().__init__(
            GuardedEndpoint(endpoint or events_endpoint(reactor, config), self._attempt_failed),
            self.factory,
            retryPolicy=retry_policy,
            clock=self._clock,
            prepareConnection=self._prepare,
        )
        self.connected = False
        #: clock time of the current connection's upgrade
        self.connected_since: float | None = None
        #: successful connections after the first
        self.reconnects = 0
        #: why the last attempt failed or the last connection ended ("" if nothing went wrong yet)
        self.last_error = ""
        #: True after ApplicationReplaced, until the next connection
        self.replaced = False
        self._attempts = 0
        self._ever_connected = False
        self._logged_problem = ""
        self._connection_listeners: list[ConnectionListener] = []
        self._protocol: Any = None

    # --- listeners ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self.dispatcher.add_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        self.dispatcher.remove_listener(listener)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """``listener(True)`` on each (re)connection, ``listener(False)`` on each loss."""
        self._connection_listeners.append(listener)

    def remove_connection_listener(self, listener: ConnectionListener) -> None:
        if listener in self._connection_listeners:
            self._connection_listeners.remove(listener)

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> ComponentStatus:
        app = self.config.app
        if self.connected and self.replaced:
            return ComponentStatus("connected", False,
                                   f"another ARI client took over Stasis app {app!r} (ApplicationReplaced); "
                                   "this engine gets no calls until it reconnects")
        if self.connected:
            detail = f"connected to {self.url} as app {app!r}"
            if self.reconnects:
                detail += f"; {self.reconnects} reconnect(s), last error: {self.last_error}"
            return ComponentStatus("connected", True, detail)
        if not self.running:
            return ComponentStatus("disconnected", False, f"not connected to {self.url}: stopped")
        if self.last_error:
            return ComponentStatus("disconnected", False,
                                   f"not connected to {self.url}: {self.last_error} (retrying)")
        return ComponentStatus("connecting", False, f"connecting to {self.url} as app {app!r}")

    # --- the connection's life ------------------------------------------------------------------

    def _prepare(self, protocol: Any) -> Deferred[None]:
        opened: Deferred[None] = protocol.opened

        def upgraded(_: None) -> None:
            self._connection_made(protocol)

        def failed(failure: Failure) -> Failure:
            self._attempt_failed(failure)
            return failure

        return opened.addCallbacks(upgraded, failed)

    def _connection_made(self, protocol: Any) -> None:
        self._attempts += 1
        self._protocol = protocol
        self.connected = True
        self.connected_since = self._clock.seconds()
        self.replaced = False
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.log.info("ARI events connected to {url} as app {app} after {attempts} attempt(s)",
                      url=self.url, app=self.config.app, attempts=self._attempts, reconnects=self.reconnects)
        self._attempts = 0
        self._logged_problem = ""
        self._notify(True)

    def connection_lost(self, problem: str) -> None:
        """An upgraded connection ended (called by the protocol)."""
        self.connected = False
        self.connected_since = None
        self._protocol = None
        if self.running:
            self.last_error = problem
            self._logged_problem = problem
            self.log.warn("ARI events connection to {url} lost: {problem}; reconnecting", url=self.url,
                          problem=problem)
        else:
            self.log.info("ARI events connection to {url} closed", url=self.url)
        self._notify(False)

    def _attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return  # stopService cancelled the attempt
        self._attempts += 1
        problem = self._describe(failure)
        self.last_error = problem
        if problem != self._logged_problem:
            self._logged_problem = problem
            self.log.warn("ARI events: cannot connect to {url}: {problem}; retrying with back-off",
                          url=self.url, problem=problem, attempt=self._attempts)
        else:
            self.log.debug("ARI events: attempt {attempt} to connect to {url} failed: {problem}",
                           url=self.url, problem=problem, attempt=self._attempts)

    def _describe(self, failure: Failure) -> str:
        error = failure.value
        host, port, _ = _host_port(self.config)
        where = f"{host}:{port}"
        if isinstance(error, UpgradeRejected):
            return upgrade_hint(error.status, error.reason, self.config)
        if isinstance(error, UpgradeFailed):
            return f"the WebSocket upgrade at {where} failed ({error}): check http:// versus https:// in ARI_URL"
        if isinstance(error, net_error.ConnectionRefusedError):
            return (f"connection refused by {where}: is Asterisk running with its HTTP server on "
                    "(http.conf enabled, bindaddr, bindport)?")
        if isinstance(error, BaseException):
            return describe_unreachable(error, where)
        return str(error)

    def _notify(self, connected: bool) -> None:
        for listener in list(self._connection_listeners):
            with self.log.failuresHandled("ARI connection listener {listener!r} failed", level=LogLevel.error,
                                          listener=listener):
                listener(connected)

    def _watch(self, event: Event) -> None:
        if isinstance(event, ApplicationReplaced):
            self.replaced = True
            self.last_error = "ApplicationReplaced: another ARI client subscribed the app"
            self.log.error(
                "another ARI client took over Stasis app {app} (ApplicationReplaced): this engine no longer "
                "receives its calls. Only one engine may use an app name: stop the other client or give "
                "this engine its own ARI_APP", app=self.config.app)

    def stopService(self) -> Deferred[None]:
        if self._protocol is not None:
            # say goodbye properly; ClientService then closes the transport
            self._protocol.sendClose(code=1000)
        return super().stopService()
