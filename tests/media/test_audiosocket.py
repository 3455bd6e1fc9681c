"""AudioSocket protocol and sessions over a StringTransport, with task.Clock."""

from __future__ import annotations

import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.media.fakes import Recorder, detector_factory, tone
from twisted_agent.media import audiosocket_framing as framing
from twisted_agent.media.audiosocket import (
    UUID_TIMEOUT,
    AudioSocketFactory,
    AudioSocketProtocol,
    AudioSocketSession,
)
from twisted_agent.media.pacer import Pacer

CALL_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.factory = AudioSocketFactory(self.clock)
        self.pacer.start()
        self.clock.advance(0)

    def session(self, session_uuid: uuid.UUID = CALL_UUID, rate: int = 8000) -> tuple[AudioSocketSession, Recorder]:
        session = AudioSocketSession("call-1", session_uuid, self.pacer, detector_factory(), self.factory, rate=rate)
        self.factory.register(session)
        recorder = Recorder()
        session.set_consumer(recorder)
        return session, recorder

    def connect(self) -> tuple[AudioSocketProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 40000))
        assert isinstance(protocol, AudioSocketProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 40000))
        protocol.makeConnection(transport)
        return protocol, transport


def connected(rig: Rig) -> tuple[AudioSocketProtocol, StringTransport]:
    """A connection from Asterisk that has named CALL_UUID."""
    protocol, transport = rig.connect()
    protocol.dataReceived(framing.encode_frame(framing.UUID, CALL_UUID.bytes))
    return protocol, transport


def frames_written(transport: StringTransport) -> list[tuple[int, bytes]]:
    return framing.AudioSocketDecoder().feed(transport.value())


def test_uuid_binds_and_audio_split_across_reads_is_delivered():
    rig = Rig()
    session, recorder = rig.session()
    protocol, transport = rig.connect()
    audio = [tone(20, amplitude=1000 + i) for i in range(5)]
    stream = framing.encode_frame(framing.UUID, CALL_UUID.bytes) + b"".join(
        framing.encode_frame(framing.AUDIO_SLIN, a) for a in audio)
    for i in range(0, len(stream), 7):  # TCP may cut anywhere
        protocol.dataReceived(stream[i:i + 7])
    assert session.bound and session.connection is protocol
    assert recorder.frames == audio


def test_dtmf_and_hangup_frame():
    rig = Rig()
    session, recorder = rig.session()
    protocol, transport = rig.connect()
    protocol.dataReceived(framing.encode_frame(framing.UUID, CALL_UUID.bytes) + framing.encode_frame(framing.DTMF, b"5")
                          + framing.encode_frame(framing.HANGUP, b""))
    assert recorder.events == [("dtmf", "5"), ("media_closed", "hangup frame")]
    assert transport.disconnecting and not session.bound


def test_connection_loss_tells_the_consumer():
    rig = Rig()
    session, recorder = rig.session()
    protocol, transport = connected(rig)
    protocol.connectionLost()
    assert recorder.events == [("media_closed", "connection closed")]


def test_unknown_uuid_is_hung_up():
    rig = Rig()
    rig.session()
    protocol, transport = rig.connect()
    protocol.dataReceived(framing.encode_frame(framing.UUID, uuid.uuid4().bytes))
    assert frames_written(transport) == [(framing.HANGUP, b"")]
    assert transport.disconnecting and rig.factory.unknown == 1


def test_audio_before_uuid_and_garbage_close_the_connection():
    rig = Rig()
    protocol, transport = rig.connect()
    protocol.dataReceived(framing.encode_frame(framing.AUDIO_SLIN, bytes(320)))
    assert transport.disconnecting
    protocol2, transport2 = rig.connect()
    protocol2.dataReceived(b"\x42\x00\x01x")  # unknown kind
    assert transport2.disconnecting and rig.factory.errors == 2


def test_silent_connection_is_closed_after_the_uuid_timeout():
    rig = Rig()
    protocol, transport = rig.connect()
    rig.clock.advance(UUID_TIMEOUT + 0.1)
    assert transport.disconnecting


def test_outbound_audio_is_paced_in_frames_of_the_session_kind():
    rig = Rig()
    session, recorder = rig.session()
    protocol, transport = connected(rig)
    session.play(tone(100), 8000, "hi")
    rig.clock.advance(0.02)
    rig.clock.advance(0.02)
    assert [kind for kind, _ in frames_written(transport)] == [framing.AUDIO_SLIN] * 2
    for _ in range(5):
        rig.clock.advance(0.02)
    written = frames_written(transport)
    assert b"".join(p for _, p in written) == tone(100)
    assert ("utterance_sent", "hi", 100) in recorder.events


def test_slin16_session_sends_and_receives_16khz():
    rig = Rig()
    session, recorder = rig.session(rate=16000)
    protocol, transport = rig.connect()
    protocol.dataReceived(framing.encode_frame(framing.UUID, CALL_UUID.bytes)
                          + b"".join(framing.encode_frame(0x12, tone(20, rate=16000)) for _ in range(10)))
    assert len(recorder.frames) >= 9  # delivered as 8 kHz frames
    session.play(tone(40), 8000, "x")
    for _ in range(3):
        rig.clock.advance(0.02)
    written = frames_written(transport)
    assert [(kind, len(p)) for kind, p in written] == [(0x12, 640), (0x12, 640)]


def test_close_sends_hangup_and_forgets_the_uuid():
    rig = Rig()
    session, _ = rig.session()
    protocol, transport = connected(rig)
    session.close()
    assert frames_written(transport)[-1] == (framing.HANGUP, b"")
    assert transport.disconnecting
    assert CALL_UUID not in rig.factory.sessions


def audio_written(transport: StringTransport) -> bytes:
    return b"".join(payload for kind, payload in frames_written(transport) if kind == framing.AUDIO_SLIN)


def test_asterisk_not_reading_holds_the_audio_back_and_a_long_stall_fails_the_stream():
    rig = Rig()
    session, recorder = rig.session()
    protocol, transport = connected(rig)
    assert transport.producer is protocol and transport.streaming, "the transport tells us when to stop writing"
    session.stall_seconds = 0.5
    audio = b"".join(tone(20, amplitude=1000 + 100 * i) for i in range(60))
    session.play(audio, 8000, "reply")
    rig.clock.advance(0.1)
    protocol.pauseProducing()  # the transport's buffer is full: Asterisk stopped reading
    written = len(transport.value())
    for _ in range(20):
        rig.clock.advance(0.02)
    assert len(transport.value()) == written and not session.stalled, "held back, not yet a failure"
    protocol.resumeProducing()
    for _ in range(60):
        rig.clock.advance(0.02)
    assert audio_written(transport) == audio, "none lost, none twice, in order"
    session.play(audio, 8000, "next")
    protocol.pauseProducing()
    for _ in range(27):
        rig.clock.advance(0.02)
    failed = [e for e in recorder.events if e[0] == "stream_failed"]
    assert session.stalled and len(failed) == 1 and protocol.pauses == 2
    assert session.outbound.take() == [("next", audio)]


def test_closing_a_paused_connection_closes_it():
    rig = Rig()
    session, _ = rig.session()
    protocol, transport = connected(rig)
    protocol.pauseProducing()
    session.close()
    assert transport.producer is None and transport.disconnecting
