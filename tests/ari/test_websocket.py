"""The ARI events WebSocket against a real Autobahn server on loopback, plus Clock-driven back-off."""

from __future__ import annotations

import base64
import gc
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.ari.test_events import SAMPLES, channel_json, envelope
from tests.helpers import free_port
from tests.test_tls import listen_tls, pki  # noqa: F401 - the private-CA fixture
from twisted_agent.ari import events as ev
from twisted_agent.ari.interfaces import IARIClient, IARIEvents
from twisted_agent.ari.rest import ARIClient
from twisted_agent.ari.service import ARIPlaceholderService, ARIService
from twisted_agent.ari.websocket import (
    AUTO_PING_INTERVAL,
    AUTO_PING_TIMEOUT,
    ARIEventsService,
    EventDispatcher,
    events_endpoint,
    events_url,
    upgrade_hint,
)
from twisted_agent.config import ARIConfig
from twisted_agent.listening import address, stop_listening
from twisted_agent.status import IStatusSource

USER, PASSWORD, APP = "ai-agent", "s3cret", "agent"


# --- a fake Asterisk events endpoint --------------------------------------------------------------


class FakeEventsProtocol(WebSocketServerProtocol):
    factory: FakeEventsFactory

    def onConnect(self, request: ConnectionRequest) -> str:
        server = self.factory
        server.upgrades.append(request)
        expected = "Basic " + base64.b64encode(f"{USER}:{server.password}".encode()).decode()
        if request.headers.get("authorization") != expected:
            raise ConnectionDeny(401, "Unauthorized")
        if request.params.get("app") != [APP]:
            raise ConnectionDeny(400, "Bad Request")
        assert "ari" in request.protocols
        return "ari"

    def onOpen(self) -> None:
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append(payload)

    def onPing(self, payload: bytes) -> None:
        if self.factory.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closes.append((wasClean, code))


class FakeEventsFactory(WebSocketServerFactory):
    protocol = FakeEventsProtocol  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(reactor=reactor)
        self.password = PASSWORD
        self.answer_pings = True
        self.upgrades: list[ConnectionRequest] = []
        self.connections: list[FakeEventsProtocol] = []
        self.received: list[bytes] = []
        self.closes: list[tuple[bool, int | None]] = []
        self.port_number = 0

    def send(self, frame: dict[str, Any] | str | bytes, binary: bool = False) -> None:
        data = json.dumps(frame).encode() if isinstance(frame, dict) else frame
        self.connections[-1].sendMessage(data if isinstance(data, bytes) else data.encode(), isBinary=binary)


@pytest.fixture(autouse=True)
def no_unexpected_errors():
    """Nothing logs an unhandled error (a ClientService state-machine slip, a lost Deferred failure)."""
    with capturedLogs() as logged:
        yield
        gc.collect()
    bad = [e for e in logged
           if e["log_level"] == LogLevel.critical
           or ("log_failure" in e and not e["log_failure"].check(RuntimeError, ValueError))]
    assert not bad, [formatEvent(e) or repr(e) for e in bad]


@pytest.fixture
def server():
    factory = FakeEventsFactory()
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port_number = address(port)[1]
    yield factory
    for connection in factory.connections:
        transport: Any = connection.transport
        if transport is not None:
            transport.abortConnection()
    port.stopListening()


def config_for(port: int, **changes: Any) -> ARIConfig:
    values: dict[str, Any] = {"url": f"http://127.0.0.1:{port}/ari", "username": USER, "password": PASSWORD,
                              "app": APP, "request_timeout": 2.0, "reconnect_max_delay": 1.0}
    values.update(changes)
    return ARIConfig(**values)


def make_service(server: FakeEventsFactory, **changes: Any) -> ARIEventsService:
    return ARIEventsService(reactor, config_for(server.port_number, **changes), retry_policy=lambda attempt: 0.05)


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


async def stopped(service: ARIEventsService) -> None:
    if service.running:
        await service.stopService()


# --- against a real server -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connects_and_delivers_typed_events_in_order(server):
    service = make_service(server)
    events: list[ev.Event] = []
    changes: list[bool] = []
    service.add_listener(events.append)
    service.add_connection_listener(changes.append)
    assert service.status().state == "disconnected" and not service.connected
    service.startService()
    try:
        assert service.status().state == "connecting"
        await until(lambda: service.connected)
        (request,) = server.upgrades
        assert request.path == "/ari/events"
        assert request.params == {"app": [APP], "subscribeAll": ["false"]}
        assert request.protocols == ["ari"]
        status = service.status()
        assert (status.state, status.ready) == ("connected", True)
        assert f"as app {APP!r}" in status.detail
        assert changes == [True] and service.connected_since is not None

        frames = [SAMPLES["StasisStart"], SAMPLES["ChannelStateChange"], SAMPLES["ChannelDtmfReceived"],
                  envelope("RecordingStarted", recording={"name": "r"}), SAMPLES["StasisEnd"]]
        for frame in frames:
            server.send(frame)
        await until(lambda: len(events) == len(frames))
        assert [type(e) for e in events] == [ev.StasisStart, ev.ChannelStateChange, ev.ChannelDtmfReceived,
                                             ev.UnknownEvent, ev.StasisEnd]
        first = events[0]
        assert isinstance(first, ev.StasisStart) and first.channel.id == "1782407832.17"
    finally:
        await stopped(service)
    await until(lambda: len(server.closes) == 1)
    assert server.closes == [(True, 1000)], "a clean WebSocket close"
    assert changes == [True, False]
    assert not service.connected and service.status().state == "disconnected"
    assert "stopped" in service.status().detail


@pytest_twisted.ensureDeferred
async def test_a_bad_frame_or_a_failing_listener_does_not_drop_the_connection(server):
    service = make_service(server)
    delivered: list[ev.Event] = []

    def explodes(event: ev.Event) -> None:
        raise RuntimeError("listener bug")

    service.add_listener(explodes)
    service.add_listener(delivered.append)
    service.startService()
    try:
        await until(lambda: service.connected)
        with capturedLogs() as logged:
            server.send("this is not JSON")
            server.send(b"\x00\x01", binary=True)
            server.send({"type": "StasisStart", "application": APP})  # no timestamp, no channel
            server.send(SAMPLES["StasisStart"])
            server.send(SAMPLES["StasisEnd"])
            await until(lambda: len(delivered) == 2)
        assert [e.type for e in delivered] == ["StasisStart", "StasisEnd"]
        assert service.dispatcher.malformed == 2
        warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
        assert len(warnings) == 3, "two malformed frames and one binary frame, each logged"
        failures = [e for e in logged if "log_failure" in e]
        assert len(failures) == 2 and all(f["log_failure"].check(RuntimeError) for f in failures)
        assert len(server.connections) == 1 and service.connected and service.reconnects == 0
    finally:
        await stopped(service)


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_server_drops_the_connection(server):
    service = make_service(server)
    changes: list[bool] = []
    events: list[ev.Event] = []
    service.add_connection_listener(changes.append)
    service.add_listener(events.append)
    service.startService()
    try:
        await until(lambda: service.connected)
        server.connections[0].dropConnection(abort=True)  # Asterisk restarts
        await until(lambda: len(server.connections) == 2 and service.connected)
        assert changes == [True, False, True]
        assert service.reconnects == 1
        assert "connection lost" in service.last_error
        server.send(SAMPLES["ChannelDestroyed"])
        await until(lambda: len(events) == 1)
        assert isinstance(events[0], ev.ChannelDestroyed)
        assert "1 reconnect(s)" in service.status().detail
    finally:
        await stopped(service)


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_show_the_fix_and_keep_retrying(server):
    server.password = "something else"
    service = make_service(server)
    with capturedLogs() as logged:
        service.startService()
        try:
            await until(lambda: len(server.upgrades) >= 4)
            status = service.status()
            assert (status.state, status.ready) == ("disconnected", False)
            assert "401 Authentication required: check ARI_USERNAME/ARI_PASSWORD" in status.detail
            assert not service.connected
            # Asterisk comes back with the right user: the next attempt connects.
            server.password = PASSWORD
            await until(lambda: service.connected)
        finally:
            await stopped(service)
    warnings = [e for e in logged if e["log_level"] >= LogLevel.warn and e.get("problem")]
    assert len(warnings) == 1, "the outage is logged once, not once per retry"
    connected = [e for e in logged if e["log_level"] == LogLevel.info and "attempts" in e]
    assert len(connected) == 1 and connected[0]["attempts"] >= 5
    assert service.reconnects == 0, "the first successful connection is not a reconnection"


@pytest_twisted.ensureDeferred
async def test_stop_service_stops_retrying(server):
    server.password = "wrong"
    service = make_service(server)
    service.startService()
    await until(lambda: len(server.upgrades) >= 2)
    await service.stopService()
    attempts = len(server.upgrades)
    await deferLater(reactor, 0.3, lambda: None)
    assert len(server.upgrades) == attempts
    assert service.status().state == "disconnected"


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_reported_and_stoppable():
    port = free_port()
    service = ARIEventsService(reactor, config_for(port), retry_policy=lambda attempt: 0.05)
    service.startService()
    try:
        await until(lambda: service.last_error != "")
        assert f"connection refused by 127.0.0.1:{port}" in service.status().detail
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_application_replaced_is_reported(server):
    service = make_service(server)
    events: list[ev.Event] = []
    service.add_listener(events.append)
    service.startService()
    try:
        await until(lambda: service.connected)
        with capturedLogs() as logged:
            server.send(SAMPLES["ApplicationReplaced"])
            await until(lambda: len(events) == 1)
        assert isinstance(events[0], ev.ApplicationReplaced)
        status = service.status()
        assert not status.ready and "ApplicationReplaced" in status.detail
        errors = [e for e in logged if e["log_level"] == LogLevel.error]
        assert len(errors) == 1 and "another ARI client took over" in errors[0]["log_format"]
    finally:
        await stopped(service)


@pytest_twisted.ensureDeferred
async def test_a_silent_peer_is_noticed_by_the_keepalive(server):
    service = make_service(server)
    service.factory.setProtocolOptions(autoPingInterval=0.2, autoPingTimeout=0.3)
    changes: list[bool] = []
    service.add_connection_listener(changes.append)
    server.answer_pings = False  # the TCP connection stays up but nothing answers
    service.startService()
    try:
        await until(lambda: service.connected)
        await until(lambda: changes[:2] == [True, False], timeout=2.5)
        assert "keepalive ping" in service.last_error
    finally:
        await stopped(service)


@pytest_twisted.ensureDeferred
async def test_ari_service_wraps_rest_and_events(server):
    service = ARIService(config_for(server.port_number), reactor)
    assert ARIPlaceholderService is ARIService
    assert verifyObject(IStatusSource, service)
    assert [child.name for child in service] == ["events"]
    assert service.rest is not None and service.events.parent is service
    service.startService()
    try:
        await until(lambda: service.connected)
        assert service.status().state == "connected"
        assert isinstance(service.rest, ARIClient) and verifyObject(IARIClient, service.rest)
    finally:
        await service.stopService()
    assert not service.connected


@pytest_twisted.ensureDeferred
async def test_wss_for_https_ari_url_with_a_private_ca(pki):  # noqa: F811 - the fixture
    factory = FakeEventsFactory()
    port = listen_tls(factory, pki)
    number = address(port)[1]
    trusted = ARIEventsService(reactor, config_for(number, url=f"https://127.0.0.1:{number}/ari",
                                                   tls_ca_file=pki["ca_file"]), retry_policy=lambda attempt: 0.05)
    untrusted = ARIEventsService(reactor, config_for(number, url=f"https://127.0.0.1:{number}/ari"),
                                 retry_policy=lambda attempt: 0.05)
    events: list[ev.Event] = []
    trusted.add_listener(events.append)
    trusted.startService()
    untrusted.startService()
    try:
        await until(lambda: trusted.connected and untrusted.last_error != "")
        factory.send(SAMPLES["StasisStart"])
        await until(lambda: len(events) == 1)
        assert not untrusted.connected
        assert "TLS" in untrusted.last_error and "ARI_TLS_CA_FILE" in untrusted.last_error, untrusted.last_error
    finally:
        await trusted.stopService()
        await untrusted.stopService()
        await stop_listening(port)


class Silent(Protocol):
    """Accepts TCP and never answers: a wrong port, or a proxy that swallows the upgrade."""


class SilentFactory(ServerFactory):
    protocol = Silent


@pytest_twisted.ensureDeferred
async def test_an_upgrade_that_never_completes_times_out_and_is_retried():
    port = reactor.listenTCP(0, SilentFactory(), interface="127.0.0.1")
    service = ARIEventsService(reactor, config_for(address(port)[1], request_timeout=0.3),
                               retry_policy=lambda attempt: 0.05)
    service.startService()
    try:
        await until(lambda: service.last_error != "")
        assert "WebSocket upgrade" in service.last_error and "http:// versus https://" in service.last_error
        assert service.status().state == "disconnected"
    finally:
        await service.stopService()
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_stopping_during_the_upgrade_is_prompt():
    port = reactor.listenTCP(0, SilentFactory(), interface="127.0.0.1")
    service = ARIEventsService(reactor, config_for(address(port)[1]), retry_policy=lambda attempt: 0.05)
    service.startService()
    try:
        await deferLater(reactor, 0.1, lambda: None)  # connected over TCP, waiting for the upgrade
        assert not service.connected
    finally:
        await service.stopService()
        await maybeDeferred(port.stopListening)
    assert service.last_error == "", "being stopped is not a connection failure"


# --- without sockets ----------------------------------------------------------------------------


def test_the_service_provides_the_events_interface():
    service = ARIEventsService(Clock(), config_for(8088), endpoint=RefusingEndpoint())
    assert verifyObject(IARIEvents, service)


def test_keepalive_options():
    service = ARIEventsService(Clock(), config_for(8088), endpoint=RefusingEndpoint())
    assert (service.factory.autoPingInterval, service.factory.autoPingTimeout) == (AUTO_PING_INTERVAL,
                                                                                   AUTO_PING_TIMEOUT)
    assert (AUTO_PING_INTERVAL, AUTO_PING_TIMEOUT) == (10, 5)


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8088/ari", "ws://127.0.0.1:8088/ari/events?app=agent&subscribeAll=false"),
    ("https://pbx.example.com/ari", "wss://pbx.example.com:443/ari/events?app=agent&subscribeAll=false"),
    ("http://[::1]:8088/asterisk/ari", "ws://[::1]:8088/asterisk/ari/events?app=agent&subscribeAll=false"),
])
def test_events_url_follows_ari_url(url, expected):
    assert events_url(ARIConfig(url=url, app=APP)) == expected


def test_https_uses_tls():
    plain = events_endpoint(reactor, ARIConfig(url="http://127.0.0.1:8088/ari"))
    secure = events_endpoint(reactor, ARIConfig(url="https://127.0.0.1:8089/ari"))
    assert type(plain).__name__ == "HostnameEndpoint"
    assert type(secure).__name__ == "_WrapperEndpoint"


def test_upgrade_hints_name_the_setting_to_fix():
    config = ARIConfig(username="bob", app=APP)
    assert upgrade_hint(401, "Unauthorized", config).startswith("401 Authentication required: check ARI_USERNAME")
    assert "'bob'" in upgrade_hint(403, "Forbidden", config)
    assert "ARI_APP" in upgrade_hint(400, "Bad Request", config)
    assert "ARI_URL" in upgrade_hint(404, "Not Found", config)
    assert "booted" in upgrade_hint(503, "Service Unavailable", config)
    assert upgrade_hint(500, "Internal Server Error", config).startswith("500 Internal Server Error")


def test_dispatcher_parses_and_isolates_listeners():
    dispatcher = EventDispatcher()
    seen: list[str] = []

    def broken(event: ev.Event) -> None:
        raise ValueError("bug")

    dispatcher.add_listener(broken)
    dispatcher.add_listener(lambda e: seen.append(e.type))
    with capturedLogs() as logged:
        assert dispatcher.dispatch(json.dumps(SAMPLES["StasisStart"])) is not None
        assert dispatcher.dispatch(b"{oops") is None
        assert dispatcher.dispatch(json.dumps(envelope("StasisEnd", channel=channel_json()))) is not None
    assert seen == ["StasisStart", "StasisEnd"]
    assert (dispatcher.received, dispatcher.malformed) == (2, 1)
    assert sum("log_failure" in e for e in logged) == 2
    dispatcher.remove_listener(broken)
    dispatcher.remove_listener(broken)  # unknown listeners are ignored
    dispatcher.dispatch(json.dumps(SAMPLES["StasisEnd"]))
    assert seen[-1] == "StasisEnd"


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    def __init__(self) -> None:
        self.attempts = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        return fail(ConnectionRefusedError("Connection refused"))


def test_back_off_grows_to_the_configured_maximum_and_logs_the_outage_once(monkeypatch):
    monkeypatch.setattr(random, "random", lambda: 0.0)  # no jitter
    clock = Clock()
    endpoint = RefusingEndpoint()
    service = ARIEventsService(clock, config_for(8088, reconnect_max_delay=5.0), endpoint=endpoint)
    delays = []
    with capturedLogs() as logged:
        service.startService()
        for _ in range(6):
            (call,) = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        assert endpoint.attempts == 7
        service.stopService()
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert clock.getDelayedCalls() == []
    status = service.status()
    assert status.state == "disconnected" and "stopped" in status.detail
    assert "connection refused by 127.0.0.1:8088" in service.last_error
    by_level = [e["log_level"] for e in logged if "problem" in e]
    assert by_level == [LogLevel.warn] + [LogLevel.debug] * 6
    assert all(e["log_level"] == LogLevel.debug for e in logged if "Scheduling retry" in e.get("log_format", ""))
