"""The cloud providers' WebSocket: frames both ways, and every way of not getting a connection."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.protocol import ServerFactory as PlainServerFactory

from tests.calls.simstack import until
from tests.helpers import free_port
from twisted_agent.providers.base import ProviderError
from twisted_agent.providers.cloud import connect


class Listener:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.frames: list[bytes] = []
        self.losses: list[str] = []

    def message(self, body: dict[str, Any]) -> None:
        self.messages.append(body)

    def audio(self, data: bytes) -> None:
        self.frames.append(data)

    def lost(self, reason: str) -> None:
        self.losses.append(reason)


class Server(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        self.factory.seen.append(request.headers)
        if request.headers.get("authorization") != "Token good":
            raise ConnectionDeny(401, "bad key")
        self.factory.peers.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.sendMessage(payload[::-1], isBinary=True)
        else:
            body = json.loads(payload)
            if body.get("type") == "Bye":
                self.sendClose(1000, "bye")
                return
            self.sendMessage(json.dumps({"type": "Echo", "got": body}).encode(), isBinary=False)
            self.sendMessage(b"not json", isBinary=False)


class ServerFactory(WebSocketServerFactory):
    seen: list[Any]
    peers: list[Server]
    url: str


@pytest.fixture
def server() -> Any:
    factory = ServerFactory()
    factory.protocol = Server
    factory.seen = []
    factory.peers = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"ws://127.0.0.1:{port.getHost().port}/v1/agent"  # type: ignore[attr-defined]
    yield factory
    for peer in factory.peers:
        peer.dropConnection(abort=True)
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_frames_both_ways_and_a_close_by_the_server(server: Any) -> None:
    listener = Listener()
    socket = await connect(reactor, "Fake", server.url, {"Authorization": "Token good"}, listener, 5)
    socket.send_json({"type": "Hello", "n": 1})
    socket.send_audio(b"\x01\x02\x03")
    await until(lambda: bool(listener.messages and listener.frames), what="the replies")
    assert listener.messages == [{"type": "Echo", "got": {"type": "Hello", "n": 1}}], "the non-JSON frame is dropped"
    assert listener.frames == [b"\x03\x02\x01"]
    socket.send_json({"type": "Bye"})
    await until(lambda: bool(listener.losses), what="the loss")
    assert listener.losses == ["Fake closed the connection: bye"]


@pytest_twisted.ensureDeferred
async def test_our_own_close_is_not_a_loss(server: Any) -> None:
    listener = Listener()
    socket = await connect(reactor, "Fake", server.url, {"Authorization": "Token good"}, listener, 5)
    socket.close()
    await until(lambda: not server.peers[0].transport.connected, what="the server to see the close")
    assert listener.losses == []


@pytest_twisted.ensureDeferred
async def test_a_refused_key_says_so(server: Any) -> None:
    with pytest.raises(ProviderError, match=r"Fake refused the connection: .*401"):
        await connect(reactor, "Fake", server.url, {"Authorization": "Token bad"}, Listener(), 5)


@pytest_twisted.ensureDeferred
async def test_nothing_listening() -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/agent"
    with pytest.raises(ProviderError, match=r"cannot reach Fake at ws://127\.0\.0\.1:"):
        await connect(reactor, "Fake", url, {}, Listener(), 5)


class Silent(PlainServerFactory):
    protocol = Protocol  # accepts the TCP connection, never answers the upgrade


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_upgrades_times_out() -> None:
    silent = reactor.listenTCP(0, Silent(), interface="127.0.0.1")
    url = f"ws://127.0.0.1:{silent.getHost().port}/"  # type: ignore[attr-defined]
    try:
        started = reactor.seconds()
        with pytest.raises(ProviderError, match=r"Fake did not answer within 0\.3s"):
            await connect(reactor, "Fake", url, {}, Listener(), 0.3)
        assert reactor.seconds() - started < 2
    finally:
        await maybeDeferred(silent.stopListening)


def test_continuous_audio_fills_gaps_with_silence_and_passes_frames_through() -> None:
    from twisted.internet.task import Clock

    from twisted_agent.providers.cloud import ContinuousAudio

    clock = Clock()
    clock.advance(100)
    sent: list[bytes] = []
    audio = ContinuousAudio(clock, sent.append)
    audio.start()
    voice = b"\x01\x00" * 160
    for _ in range(10):  # 200 ms of speech, a frame every 20 ms: nothing added
        audio.push(voice)
        clock.advance(0.02)
    assert sent == [voice] * 10
    clock.advance(0.5)  # the caller is quiet and Asterisk sends nothing (a Local channel)
    silence = sent[10:]
    assert silence and set(silence) == {b"\x00" * 320}
    assert 20 <= len(silence) <= 25, "about 500 ms of silence, in 20 ms frames"
    count = len(sent)
    audio.push(voice)  # speech again: sent at once, after whatever silence was still owed
    assert sent[-1] == voice and len(sent) - count <= 6
    assert audio.filled_frames == len(sent) - 11
    audio.stop()
    stopped = len(sent)
    clock.advance(1)
    assert len(sent) == stopped, "stopped: no more silence"
    assert not clock.getDelayedCalls()
