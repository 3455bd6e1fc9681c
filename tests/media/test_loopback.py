"""The media plane on real sockets: a fake Asterisk on 127.0.0.1 exchanges RTP and AudioSocket with it."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import uuid
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater

from tests.media.fakes import Recorder
from tests.media.speech import padded_speech, require_speech_tools
from twisted_agent.config import load_config
from twisted_agent.listening import address, stop_listening
from twisted_agent.media import audiosocket_framing as framing
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.media.rtp import RTPPacket, build, parse
from twisted_agent.media.service import MediaService

FRAME = 0.02


def transport_of(protocol: Protocol) -> ITransport:
    assert protocol.transport is not None
    return protocol.transport


def media_service(**overrides: Any) -> MediaService:
    config = load_config(None, {"ARI_URL": "http://127.0.0.1:1/ari"})
    media = dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=0, audiosocket_host="127.0.0.1",
                                audiosocket_port=0, **overrides)
    service = MediaService(reactor, media)
    service.privilegedStartService()
    service.startService()
    return service


class FakeAsteriskRTP(DatagramProtocol):
    """One UnicastRTP channel: sends 20 ms μ-law packets from its own port, records what comes back."""

    def __init__(self) -> None:
        self.received: list[tuple[float, RTPPacket]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((reactor.seconds(), parse(datagram)))


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_rtp_speech_in_order_and_paced_audio_out():
    require_speech_tools()
    clip = padded_speech(pad_ms=200).pcm
    clip = clip[: len(clip) - len(clip) % 320][: 3 * 16000]  # 3 s of 20 ms frames
    payloads = [ulaw_encode(clip[i:i + 320]) for i in range(0, len(clip), 320)]

    service = media_service()
    asterisk = FakeAsteriskRTP()
    peer: Any = cast(Any, reactor).listenUDP(0, asterisk, interface="127.0.0.1")
    try:
        session = service.create_session("call-1")
        recorder = Recorder()
        session.set_consumer(recorder)
        session.bind_peer("127.0.0.1", address(peer)[1])
        target = service.bound_address()
        assert target is not None

        sequence = iter(enumerate(payloads))

        def send_one() -> None:
            try:
                n, payload = next(sequence)
            except StopIteration:
                sender.stop()
                return
            packet = RTPPacket(payload_type=0, sequence=(7000 + n) & 0xFFFF, timestamp=160 + 160 * n, ssrc=0xCAFE,
                               payload=payload)
            peer.write(build(packet), target)

        sender = LoopingCall(send_one)
        sender.clock = reactor
        await sender.start(FRAME, now=True)
        await sleep(0.1)
        # what the caller said arrives complete, in order, decoded
        assert recorder.audio == b"".join(ulaw_decode(p) for p in payloads)
        assert [e for e in recorder.events if e[0].startswith("speech")][:1] == [("speech_started",)]

        reply = clip[:16000]  # 1 s back to the caller
        started = reactor.seconds()
        session.play(reply, 8000, "reply")
        await sleep(1.3)
        received = asterisk.received
        assert len(received) == 50
        assert b"".join(ulaw_decode(p.payload) for _, p in received) == ulaw_decode(ulaw_encode(reply))
        assert [p.sequence for _, p in received] == [(received[0][1].sequence + i) & 0xFFFF for i in range(50)]
        arrivals = [t for t, _ in received]
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert statistics.mean(gaps) == pytest.approx(0.02, abs=0.002)
        assert arrivals[-1] - arrivals[0] == pytest.approx(0.98, abs=0.06)
        assert arrivals[0] - started < 0.05
        assert ("utterance_sent", "reply", 1000) in recorder.events
        stats = session.stats()
        assert stats["lost"] == 0 and stats["packets_in"] == len(payloads) and stats["packets_out"] == 50
    finally:
        await stop_listening(peer)
        await service.stopService()


class FakeAsteriskAudioSocket(Protocol):
    def __init__(self, call_uuid: uuid.UUID) -> None:
        self.call_uuid = call_uuid
        self.decoder = framing.AudioSocketDecoder()
        self.frames: list[tuple[float, int, bytes]] = []
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        transport_of(self).write(framing.uuid_frame(self.call_uuid))

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        self.frames.extend((now, kind, payload) for kind, payload in self.decoder.feed(data))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_audiosocket_both_ways_on_tcp():
    require_speech_tools()
    clip = padded_speech(pad_ms=100).pcm
    clip = clip[: len(clip) - len(clip) % 320][: 2 * 16000]
    service = media_service(transport="audiosocket")
    call_uuid = uuid.uuid4()
    session = service.create_session("call-2", session_uuid=call_uuid)
    recorder = Recorder()
    session.set_consumer(recorder)
    target = service.bound_address()
    assert target is not None
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    asterisk = FakeAsteriskAudioSocket(call_uuid)
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", target[1]), asterisk)
        frames = [clip[i:i + 320] for i in range(0, len(clip), 320)]
        for frame in frames:
            transport_of(asterisk).write(framing.audio_frame(frame))
            await sleep(FRAME)
        await sleep(0.05)
        assert session.bound
        assert recorder.audio == b"".join(frames)
        session.play(clip[:8000], 8000, "reply")  # 0.5 s
        await sleep(0.7)
        audio = [(t, p) for t, kind, p in asterisk.frames if kind == framing.AUDIO_SLIN]
        assert b"".join(p for _, p in audio) == clip[:8000]
        assert audio[-1][0] - audio[0][0] == pytest.approx(0.48, abs=0.05)
        session.close()  # the engine ends the call: Asterisk gets 0x00 and the socket closes
        await asterisk.closed
        assert asterisk.frames[-1][1] == framing.HANGUP
    finally:
        await service.stopService()
