"""The ARI events WebSocket, server side: ``GET /ari/events?app=NAME`` (PROTOCOLS §1.2).

:class:`EventHub` holds which connection owns which application and stamps every event with
``type``, ``application``, ``timestamp`` (``+0000`` form) and ``asterisk_id``. A newer connection
for an app takes it over and the older one gets ``ApplicationReplaced`` (ari_websockets.c).
Events for an app nobody owns are dropped, as Asterisk drops them.

Client text frames: a frame that is not a JSON object is answered with a ``RESTResponse`` of
status 400, as Asterisk 22 does. A well-formed frame (for example a ``RESTRequest``) is ignored:
REST over the WebSocket is optional (§1.2) and the simulator serves REST over HTTP only.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_agent.sim.control import Timers
from twisted_agent.sim.model import ari_timestamp

__all__ = ["EventHub", "EventsProtocol", "events_factory", "parse_apps"]


def parse_apps(values: list[str]) -> list[str]:
    """``app=a,b&app=c`` -> ``["a", "b", "c"]`` (allowMultiple, comma separated)."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


class EventHub:
    """App ownership and event delivery; records every event actually sent."""

    log = Logger()

    def __init__(self, timers: Timers, asterisk_id: str) -> None:
        self._timers = timers
        self.asterisk_id = asterisk_id
        self.owners: dict[str, EventsProtocol] = {}
        self.subscribe_all: set[str] = set()
        self.connections: set[EventsProtocol] = set()
        self.sent: list[dict[str, Any]] = []
        self.connections_opened = 0

    def seconds(self) -> float:
        return self._timers.seconds()

    def owns(self, app: str) -> bool:
        return app in self.owners

    def register(self, connection: EventsProtocol, apps: list[str], subscribe_all: bool) -> None:
        self.connections.add(connection)
        self.connections_opened += 1
        for app in apps:
            previous = self.owners.get(app)
            self.owners[app] = connection
            if subscribe_all:
                self.subscribe_all.add(app)
            else:
                self.subscribe_all.discard(app)
            if previous is not None and previous is not connection:
                previous.apps.discard(app)
                self._deliver(previous, app, {"type": "ApplicationReplaced"})
        self.log.info("events connection for {apps} open", apps=apps)

    def unregister(self, connection: EventsProtocol) -> None:
        self.connections.discard(connection)
        for app in list(connection.apps):
            if self.owners.get(app) is connection:
                del self.owners[app]
                self.subscribe_all.discard(app)
        connection.apps.clear()

    def send(self, apps: set[str] | list[str] | str, event_type: str, **fields: Any) -> None:
        """Send one event to each of ``apps`` that a connection owns (and to subscribeAll apps)."""
        targets = {apps} if isinstance(apps, str) else set(apps)
        targets |= self.subscribe_all
        for app in sorted(targets):
            connection = self.owners.get(app)
            if connection is not None:
                self._deliver(connection, app, {"type": event_type, **fields})

    def _deliver(self, connection: EventsProtocol, app: str, event: dict[str, Any]) -> None:
        event["timestamp"] = ari_timestamp(self._timers.seconds())
        event["asterisk_id"] = self.asterisk_id
        event["application"] = app
        self.sent.append(event)
        try:
            connection.sendMessage(json.dumps(event).encode("utf-8"), isBinary=False)
        except Disconnected:
            pass  # the connection is closing (Asterisk drops events for a client that is gone)

    async def drop_all(self) -> None:
        """Abort every connection (no close handshake) and wait until each is gone."""
        waits = []
        for connection in list(self.connections):
            waits.append(connection.lost)
            connection.abort()
        for waiter in waits:
            await waiter


class EventsProtocol(WebSocketServerProtocol):
    """One events connection. The HTTP side already checked auth and ``app`` before the upgrade."""

    hub: EventHub

    def __init__(self) -> None:
        super().__init__()
        self.apps: set[str] = set()
        self._requested: list[str] = []
        self._subscribe_all = False
        self.lost: Deferred[None] = Deferred()

    def onConnect(self, request: ConnectionRequest) -> str | None:
        self._requested = parse_apps(request.params.get("app", []))
        self._subscribe_all = request.params.get("subscribeAll", ["false"])[-1].lower() in ("true", "yes", "1", "on")
        if not request.protocols:
            # Asterisk accepts a client that offers no sub-protocol when only "ari" is registered.
            return None
        if "ari" in request.protocols:
            return "ari"
        raise ConnectionDeny(400, "no protocols out of '{}' supported".format(", ".join(request.protocols)))

    def onOpen(self) -> None:
        self.apps = set(self._requested)
        self.hub.register(self, self._requested, self._subscribe_all)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if isinstance(message, dict):
            return
        reply = {
            "type": "RESTResponse",
            "transaction_id": "",
            "request_id": "",
            "status_code": 400,
            "reason_phrase": "Bad Request",
            "uri": "",
            "content_type": "application/json",
            "message_body": json.dumps({"message": "Unable to parse the message as JSON"}),
            "timestamp": ari_timestamp(self.hub.seconds()),
            "asterisk_id": self.hub.asterisk_id,
            "application": ",".join(sorted(self.apps)),
        }
        self.sendMessage(json.dumps(reply).encode("utf-8"), isBinary=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.hub.unregister(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.hub.unregister(self)
        if not self.lost.called:
            self.lost.callback(None)

    def abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif not self.lost.called:
            self.lost.callback(None)


def events_factory(hub: EventHub) -> WebSocketServerFactory:
    factory = WebSocketServerFactory()

    class BoundEventsProtocol(EventsProtocol):
        """A protocol class per simulator, so two simulators in one process never share a hub."""

    BoundEventsProtocol.hub = hub
    factory.protocol = BoundEventsProtocol
    return factory
