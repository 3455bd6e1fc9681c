"""RTP routing, ordering, pacing and flushing, with a fake UDP transport and task.Clock."""

from __future__ import annotations

import random
import struct

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.media.fakes import FakeUDPTransport, Recorder, detector_factory, tone
from twisted_agent.media.codecs import alaw_decode, ulaw_decode, ulaw_encode
from twisted_agent.media.interfaces import IMediaConsumer, IMediaSession
from twisted_agent.media.pacer import Pacer
from twisted_agent.media.rtp import RTPPacket, build, header, parse
from twisted_agent.media.rtp_endpoint import PeerNotAllowed, RTPEndpoint, RTPRouter, RTPSession

ASTERISK = "10.0.0.5"


class Rig:
    def __init__(self, allowed: tuple[str, ...] = (), depth: int = 2) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.pacer = Pacer(self.clock)
        self.endpoint = RTPEndpoint(lambda send: RTPRouter(self.clock, send, allowed=allowed))
        self.udp = FakeUDPTransport()
        self.endpoint.makeConnection(self.udp)  # type: ignore[arg-type]
        self.router = self.endpoint.router
        self.depth = depth
        self.pacer.start()
        self.clock.advance(0)

    def session(self, call_id: str, port: int | None, codec: str = "ulaw") -> tuple[RTPSession, Recorder]:
        session = RTPSession(call_id, self.router, self.pacer, detector_factory(), codec=codec,
                             reorder_depth=self.depth, rng=random.Random(call_id))
        self.router.register(session)
        recorder = Recorder()
        session.set_consumer(recorder)
        if port is not None:
            session.bind_peer(ASTERISK, port)
        return session, recorder

    def receive(self, port: int, packet: RTPPacket | bytes, host: str = ASTERISK) -> None:
        data = packet if isinstance(packet, bytes) else build(packet)
        self.endpoint.datagramReceived(data, (host, port))

    def sent_to(self, port: int) -> list[RTPPacket]:
        return [parse(data) for data, addr in self.udp.written if addr == (ASTERISK, port)]


def rtp(seq: int, payload: bytes, ssrc: int = 0x1234, pt: int = 0, ts: int | None = None) -> RTPPacket:
    return RTPPacket(payload_type=pt, sequence=seq & 0xFFFF, timestamp=(160 * seq if ts is None else ts) & 0xFFFFFFFF,
                     ssrc=ssrc, payload=payload)


def test_sessions_provide_the_interfaces():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    assert verifyObject(IMediaSession, session)
    assert verifyObject(IMediaConsumer, recorder)


def test_simultaneous_calls_get_only_their_own_audio():
    rig = Rig()
    calls = {port: rig.session(f"call-{port}", port) for port in (4000, 4002, 4004)}
    payloads = {port: bytes([(port // 2) % 256]) * 160 for port in calls}
    for seq in range(10):
        for port in calls:  # interleaved, as from one Asterisk
            rig.receive(port, rtp(seq, payloads[port], ssrc=port))
    for port, (_session, recorder) in calls.items():
        assert recorder.audio == ulaw_decode(payloads[port]) * 10
    assert rig.router.foreign == 0


def test_foreign_sources_are_counted_and_dropped():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    rig.receive(4001, rtp(1, bytes(160)))  # same host, other port
    rig.receive(4000, rtp(1, bytes(160)), host="10.0.0.6")
    assert recorder.frames == [] and rig.router.foreign == 2
    assert session.stats()["packets_in"] == 0


def test_unbound_session_receives_nothing_until_bound():
    rig = Rig()
    session, recorder = rig.session("c1", None)
    assert not session.bound
    rig.receive(4000, rtp(1, bytes(160)))
    assert recorder.frames == [] and rig.router.foreign == 1
    session.bind_peer(ASTERISK, 4000)
    rig.receive(4000, rtp(2, bytes(160)))
    assert len(recorder.frames) == 1


def test_allow_list():
    rig = Rig(allowed=("10.0.0.0/24",))
    with pytest.raises(PeerNotAllowed):
        rig.session("c1", None)[0].bind_peer("192.0.2.1", 4000)
    rig.session("c2", 4000)
    rig.receive(4000, rtp(1, bytes(160)), host="192.0.2.1")
    assert rig.router.disallowed == 1 and rig.router.foreign == 0


def test_a_stray_ssrc_is_dropped_and_a_persistent_new_one_followed():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    for seq in range(3):
        rig.receive(4000, rtp(seq, b"\x10" * 160, ssrc=1))
    rig.receive(4000, rtp(500, b"\x20" * 160, ssrc=2))  # one stray packet: dropped
    assert len(recorder.frames) == 3 and session.foreign_ssrc == 1
    for seq in range(900, 906):  # Asterisk re-SSRCed: after 4 in-order packets we follow it
        rig.receive(4000, rtp(seq, b"\x30" * 160, ssrc=3))
    assert session.ssrc_changes == 1
    assert recorder.frames[3:] == [ulaw_decode(b"\x30" * 160)] * 3
    assert session.stats()["ssrc_in"] == 3


def test_reordered_packets_are_delivered_in_order_and_loss_counted():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    order = [0, 1, 3, 2, 4, 7, 8, 9, 10]  # 2/3 swapped; 5 and 6 lost
    for seq in order:
        rig.receive(4000, rtp(seq, bytes([seq * 16 + 1]) * 160))
    delivered = [frame for frame in recorder.frames]
    expected = [ulaw_decode(bytes([s * 16 + 1]) * 160) for s in (0, 1, 2, 3, 4, 7, 8, 9, 10)]
    assert delivered == expected
    stats = session.stats()
    assert (stats["lost"], stats["reordered"]) == (2, 4)


def test_a_gap_at_the_end_of_speech_is_released_on_the_clock():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    rig.receive(4000, rtp(0, b"\x01" * 160))
    rig.receive(4000, rtp(2, b"\x02" * 160))  # 1 lost, and then the caller goes quiet
    assert len(recorder.frames) == 1
    rig.clock.advance(0.04)
    rig.clock.advance(0.02)
    assert len(recorder.frames) == 2 and session.stats()["lost"] == 1


def test_malformed_unknown_payload_and_comfort_noise_are_counted():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    rig.receive(4000, b"\x80\x00")  # truncated
    rig.receive(4000, b"\x40" + bytes(20))  # version 1
    rig.receive(4000, rtp(1, bytes(160), pt=99))
    rig.receive(4000, rtp(2, bytes(1), pt=13))
    stats = session.stats()
    assert (stats["malformed"], stats["unknown_payload"], stats["comfort_noise"]) == (2, 1, 1)
    assert recorder.frames == []


def test_slin16_and_alaw_are_decoded_to_8khz_frames():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    wide = tone(20, rate=16000)
    big_endian = struct.pack(">320h", *struct.unpack("<320h", wide))
    for seq in range(10):
        rig.receive(4000, rtp(seq, big_endian, pt=118, ts=320 * seq))
    assert len(recorder.frames) >= 9  # the low-latency resampler's delay is a fraction of a frame
    session2, recorder2 = rig.session("c2", 4002)
    rig.receive(4002, rtp(0, b"\xd5" * 160, pt=8))
    assert recorder2.frames == [alaw_decode(b"\xd5" * 160)]


def test_paced_sending_headers_and_continuity_across_utterances():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    session.play(tone(100), 8000, "hello")
    for _ in range(8):
        rig.clock.advance(0.02)
    first = rig.sent_to(4000)
    assert len(first) == 5
    assert [p.payload_type for p in first] == [0] * 5
    assert [p.marker for p in first] == [True, False, False, False, False]
    assert [(p.sequence - first[0].sequence) & 0xFFFF for p in first] == [0, 1, 2, 3, 4]
    assert [(p.timestamp - first[0].timestamp) & 0xFFFFFFFF for p in first] == [0, 160, 320, 480, 640]
    assert b"".join(p.payload for p in first) == ulaw_encode(tone(100))
    assert len({p.ssrc for p in first}) == 1
    assert ("utterance_sent", "hello", 100) in recorder.events

    session.play(tone(40), 8000, "again")  # after 3 silent ticks: a new talkspurt
    for _ in range(3):
        rig.clock.advance(0.02)
    second = rig.sent_to(4000)[5:]
    assert [p.marker for p in second] == [True, False]
    assert second[0].sequence == (first[-1].sequence + 1) & 0xFFFF, "sequence continues"
    gap = (second[0].timestamp - first[-1].timestamp) & 0xFFFFFFFF
    assert gap == 160 * 4, "timestamp follows the clock through the silence"
    assert second[0].ssrc == first[0].ssrc


def test_flush_stops_at_once_and_reports_ms_on_the_wire():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    session.play(tone(1000), 8000, "long")
    session.play(tone(500), 8000, "queued")
    for _ in range(7):
        rig.clock.advance(0.02)
    assert session.flush() == {"long": 140, "queued": 0}
    sent = len(rig.sent_to(4000))
    for _ in range(10):
        rig.clock.advance(0.02)
    assert len(rig.sent_to(4000)) == sent == 7
    assert not any(e[0] == "utterance_sent" for e in recorder.events)


def test_play_resamples_other_rates():
    rig = Rig()
    session, _ = rig.session("c1", 4000, codec="alaw")
    session.play(tone(1000, rate=22050), 22050, "tts")
    for _ in range(55):
        rig.clock.advance(0.02)
    sent = rig.sent_to(4000)
    assert len(sent) == 50 and {p.payload_type for p in sent} == {8}


def test_nothing_is_sent_before_the_peer_is_bound():
    rig = Rig()
    session, _ = rig.session("c1", None)
    session.play(tone(60), 8000, "early")
    rig.clock.advance(0.1)
    assert rig.udp.written == []
    session.bind_peer(ASTERISK, 4000)
    for _ in range(4):
        rig.clock.advance(0.02)
    assert len(rig.sent_to(4000)) == 3


def test_speech_end_on_the_clock_when_packets_stop():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    loud = ulaw_encode(tone(20))
    for seq in range(10):
        rig.receive(4000, rtp(seq, loud))
        rig.clock.advance(0.02)
    assert recorder.events == [("speech_started",)]
    rig.clock.advance(0.2)
    rig.clock.advance(0.02)  # no packets at all: Asterisk is silent while the caller is
    assert ("speech_ended",) not in recorder.events
    rig.clock.advance(0.1)
    assert recorder.events == [("speech_started",), ("speech_ended",)]


def test_speech_end_with_continuous_silence_frames():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    loud, quiet = ulaw_encode(tone(20)), b"\xff" * 160
    for seq in range(30):
        rig.receive(4000, rtp(seq, loud if seq < 10 else quiet))
        rig.clock.advance(0.02)
    assert recorder.events == [("speech_started",), ("speech_ended",)]


def test_close_releases_routing_and_pacing():
    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    session.play(tone(200), 8000, "x")
    rig.clock.advance(0.02)
    session.close()
    session.close()
    written = len(rig.udp.written)
    rig.clock.advance(0.2)
    assert len(rig.udp.written) == written
    rig.receive(4000, rtp(1, bytes(160)))
    assert recorder.frames == [] and rig.router.foreign == 1
    assert len(rig.router) == 0 and len(rig.pacer) == 0


def test_a_failing_consumer_does_not_stop_other_calls():
    rig = Rig()
    broken, _ = rig.session("broken", 4000)

    class Exploding(Recorder):
        def utterance_sent(self, utterance_id: str, ms: int) -> None:
            raise RuntimeError("engine bug")

    broken.set_consumer(Exploding())
    healthy, recorder = rig.session("healthy", 4002)
    broken.play(tone(20), 8000, "a")
    healthy.play(tone(60), 8000, "b")
    for _ in range(5):
        rig.clock.advance(0.02)
    assert ("utterance_sent", "b", 60) in recorder.events
    assert broken.consumer_errors == 1


def test_jitter_and_lateness_in_stats():
    rig = Rig()
    session, _ = rig.session("c1", 4000)
    for seq in range(50):
        rig.receive(4000, rtp(seq, bytes(160)))
        rig.clock.advance(0.02 + (0.004 if seq % 2 else 0.0))
    session.play(tone(100), 8000, "x")
    for _ in range(6):
        rig.clock.advance(0.02)
    stats = session.stats()
    assert stats["jitter_ms"] > 1.0
    assert stats["send_lateness"]["frames"] == 5
    assert stats["packets_out"] == 5 and stats["bytes_out"] == 5 * 172


def test_header_helper_matches_build():
    assert header(0, 7, 160, 0xABCDEF01, True) + b"x" == build(
        RTPPacket(payload_type=0, sequence=7, timestamp=160, ssrc=0xABCDEF01, payload=b"x", marker=True))


def test_send_errors_hold_the_audio_back_and_a_long_run_of_them_fails_the_stream():
    import errno

    rig = Rig()
    session, recorder = rig.session("c1", 4000)
    session.stall_seconds = 0.3
    audio = b"".join(tone(20, amplitude=1000 + 100 * i) for i in range(40))  # 800 ms, every frame different
    session.play(audio, 8000, "reply")
    rig.clock.advance(0.1)
    sent_before = len(rig.sent_to(4000))
    rig.udp.error = OSError(errno.EPERM, "Operation not permitted")  # a firewall rule appeared
    for _ in range(10):
        rig.clock.advance(0.02)
    assert len(rig.sent_to(4000)) == sent_before and session.send_failures == 10
    rig.udp.error = None  # a hiccup: the frames held back go now, none lost, none twice
    for _ in range(40):
        rig.clock.advance(0.02)
    payloads = [p.payload for p in rig.sent_to(4000)]
    assert b"".join(ulaw_decode(p) for p in payloads) == ulaw_decode(ulaw_encode(audio))
    assert not session.stalled and "stream_failed" not in [e[0] for e in recorder.events]
    session.play(audio, 8000, "next")
    rig.udp.error = OSError(errno.ENETUNREACH, "Network is unreachable")
    for _ in range(14):
        rig.clock.advance(0.02)
    assert not session.stalled
    for _ in range(2):
        rig.clock.advance(0.02)
    assert session.stalled
    failed = [e for e in recorder.events if e[0] == "stream_failed"]
    assert len(failed) == 1 and "no frame could be sent for 0.3s" in failed[0][1]
    for _ in range(20):
        rig.clock.advance(0.02)
    assert len([e for e in recorder.events if e[0] == "stream_failed"]) == 1, "said once"
    assert session.outbound.take() == [("next", audio)], "nothing lost: all still here"
