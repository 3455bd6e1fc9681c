"""A tiny ARI client for driving the simulator as an application would (no twisted_agent.ari).

REST goes through treq with Basic auth on a non-persistent pool; events come from an Autobahn
WebSocket client; RTP and AudioSocket peers are plain sockets that record what arrives.
"""

from __future__ import annotations

import json
import struct
from typing import Any
from urllib.parse import urlencode

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from twisted_agent.media.audiosocket_framing import AudioSocketDecoder

_reactor: Any = reactor
_pool = HTTPConnectionPool(reactor, persistent=False)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Any, timeout: float = 2.0, interval: float = 0.005) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await sleep(interval)


class Response:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


class Ari:
    def __init__(self, base: str, user: str = "ai-agent", password: str = "secret") -> None:
        self.base = base
        self.auth = (user, password)

    async def call(self, method: str, path: str, params: dict[str, Any] | None = None,
                   json_body: Any = None, auth: Any = "default", raw_query: str | None = None,
                   data: bytes | None = None, headers: dict[str, str] | None = None) -> Response:
        url = self.base + path
        if params:
            url += "?" + urlencode(params)
        if raw_query:
            url += ("&" if "?" in url else "?") + raw_query
        kwargs: dict[str, Any] = {"pool": _pool}
        if auth == "default":
            kwargs["auth"] = self.auth
        elif auth is not None:
            kwargs["auth"] = auth
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        if headers:
            kwargs["headers"] = headers
        response = await treq.request(method, url, **kwargs)
        body = await response.content()
        return Response(response.code, response.headers, body)

    def get(self, path: str, **params: Any) -> Deferred[Response]:
        return Deferred.fromCoroutine(self.call("GET", path, params))

    def post(self, path: str, json_body: Any = None, **params: Any) -> Deferred[Response]:
        return Deferred.fromCoroutine(self.call("POST", path, params, json_body))

    def delete(self, path: str, **params: Any) -> Deferred[Response]:
        return Deferred.fromCoroutine(self.call("DELETE", path, params))


class _EventsProtocol(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.factory.owner.protocol_name = response.protocol

    def onOpen(self) -> None:
        owner = self.factory.owner
        owner.protocol = self
        if not owner.opened.called:
            owner.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.owner._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        owner = self.factory.owner
        if not owner.opened.called:
            owner.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        if not owner.closed.called:
            owner.closed.callback((wasClean, code))


class Events:
    """One events WebSocket; ``expect`` hands out events one at a time, in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self._taken: set[int] = set()
        self._waiters: list[Deferred[None]] = []
        self.opened: Deferred[Any] = Deferred()
        self.closed: Deferred[Any] = Deferred()
        self.protocol: _EventsProtocol | None = None
        self.protocol_name: str | None = None

    @classmethod
    async def connect(cls, ari_url: str, app: str = "ai-agent", protocols: list[str] | None = None,
                      query: str | None = None, user: str = "ai-agent", password: str = "secret",
                      headers: dict[str, str] | None = None) -> Events:
        events = cls()
        port = int(ari_url.split(":")[2].split("/")[0])
        path = f"/ari/events?{query}" if query is not None else f"/ari/events?app={app}&api_key={user}:{password}"
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}",
                                         protocols=["ari"] if protocols is None else protocols, headers=headers)
        factory.protocol = _EventsProtocol
        factory.owner = events  # type: ignore[attr-defined]
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        await events.opened
        return events

    def _received(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.times.append(reactor.seconds())
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _find(self, event_type: str, match: dict[str, Any]) -> int | None:
        for index, event in enumerate(self.events):
            if index in self._taken or event["type"] != event_type:
                continue
            if all(self._field(event, key) == value for key, value in match.items()):
                return index
        return None

    @staticmethod
    def _field(event: dict[str, Any], key: str) -> Any:
        value: Any = event
        for part in key.split("__"):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    async def expect(self, event_type: str, timeout: float = 2.0, **match: Any) -> dict[str, Any]:
        """The earliest not yet returned event of ``event_type`` whose fields match (``channel__id=``)."""
        deadline = reactor.seconds() + timeout
        while True:
            index = self._find(event_type, match)
            if index is not None:
                self._taken.add(index)
                return self.events[index]
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                seen = [e["type"] for e in self.events]
                raise AssertionError(f"no {event_type} {match} within {timeout}s; got {seen}")
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            waiter.addTimeout(remaining, reactor)
            try:
                await waiter
            except Exception:
                pass

    def time_of(self, event: dict[str, Any]) -> float:
        """When ``event`` arrived (reactor time)."""
        return self.times[next(i for i, e in enumerate(self.events) if e is event)]

    def types(self, channel_id: str | None = None) -> list[str]:
        return [e["type"] for e in self.events
                if channel_id is None or self._field(e, "channel__id") == channel_id]

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.sendClose()


class RtpPeer(DatagramProtocol):
    """The agent's UDP socket: records (time, data, source) and can send."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes, tuple[str, int]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((reactor.seconds(), datagram, addr))

    @property
    def address(self) -> str:
        assert self.transport is not None
        return f"127.0.0.1:{self.transport.getHost().port}"

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.write(data, ("127.0.0.1", port))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.stopListening()


def open_rtp_peer() -> RtpPeer:
    peer = RtpPeer()
    _reactor.listenUDP(0, peer, interface="127.0.0.1")
    return peer


class AudioSocketPeer(Protocol):
    """One connection Asterisk made to our AudioSocket listener."""

    def __init__(self, server: AudioSocketServer) -> None:
        self.server = server
        self.decoder = AudioSocketDecoder()
        self.frames: list[tuple[float, int, bytes]] = []
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        for kind, payload in self.decoder.feed(data):
            self.frames.append((now, kind, payload))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def send(self, kind: int, payload: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(struct.pack(">BH", kind, len(payload)) + payload)


class AudioSocketServer:
    def __init__(self) -> None:
        self.connections: list[AudioSocketPeer] = []
        self.port: Any = None

    async def listen(self) -> AudioSocketServer:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(Factory.forProtocol(lambda: AudioSocketPeer(self)))
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    async def close(self) -> None:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.loseConnection()
        await self.port.stopListening()
