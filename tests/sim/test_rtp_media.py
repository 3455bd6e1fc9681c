"""ExternalMedia over RTP: validation, the packets Asterisk sends, strict RTP, what the caller hears."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import pytest_twisted

from tests.sim.client import Ari, Events, RtpPeer, open_rtp_peer, sleep, wait_until
from twisted_agent.media import rtp
from twisted_agent.media.codecs import alaw_encode, ulaw_decode, ulaw_encode
from twisted_agent.sim import AsteriskSimulator, SimulatedCaller

GOOD = {"app": "ai-agent", "external_host": "127.0.0.1:40000", "format": "ulaw"}


def tone(seconds: float, amplitude: int = 6000, freq: float = 440.0) -> bytes:
    count = round(seconds * 8000)
    return b"".join(struct.pack("<h", int(amplitude * math.sin(2 * math.pi * freq * i / 8000)))
                    for i in range(count))


@pytest.mark.parametrize(("changes", "code", "message"), [
    ({"app": None}, 400, "app cannot be empty"),
    ({"external_host": None}, 400, "external_host is required for all but websocket server connections"),
    ({"format": None}, 400, "format cannot be empty"),
    ({"external_host": "127.0.0.1"}, 400, None),
    ({"external_host": "localhost:18080"}, 500, "Unable to resolve host"),
    ({"format": "slin8"}, 500, None),
    ({"direction": "sendonly"}, 400, "Invalid direction specified"),
    ({"transport": "tcp"}, 400, None),
    ({"encapsulation": "audiosocket", "transport": "udp"}, 400, None),
    ({"encapsulation": "audiosocket", "transport": "tcp"}, 400, "data can not be empty"),
    ({"encapsulation": "bogus"}, 501, "The encapsulation and/or transport is not supported"),
    ({"connection_type": "server"}, 400, None),
    ({"encapsulation": "none", "transport": "websocket"}, 501, None),
])
@pytest_twisted.ensureDeferred
async def test_external_media_validation(sim: AsteriskSimulator, ari: Ari, changes: dict[str, Any], code: int,
                                         message: str | None) -> None:
    params = {key: value for key, value in {**GOOD, **changes}.items() if value is not None}
    response = await ari.post("/channels/externalMedia", **params)
    assert response.code == code
    body = response.json()
    assert set(body) == {"message"}
    if message is not None:
        assert body["message"] == message
    assert sim.live_channels() == []


async def media_call(sim: AsteriskSimulator, ari: Ari, events: Events, peer: RtpPeer, *, idle: str = "silent",
                     fmt: str = "ulaw", bridge: bool = True) -> tuple[SimulatedCaller, dict[str, Any], int]:
    caller = sim.originate("ai-agent", idle=idle)
    await events.expect("StasisStart", channel__id=caller.channel_id)
    await ari.post(f"/channels/{caller.channel_id}/answer")
    await caller.answered
    response = await ari.post("/channels/externalMedia", app="ai-agent", external_host=peer.address, format=fmt)
    media = response.json()
    await events.expect("StasisStart", channel__id=media["id"])
    if bridge:
        bridge_id = (await ari.post("/bridges", type="mixing")).json()["id"]
        await ari.post(f"/bridges/{bridge_id}/addChannel", channel=f"{caller.channel_id},{media['id']}")
        await events.expect("ChannelEnteredBridge", channel__id=media["id"])
    return caller, media, int(media["channelvars"]["UNICASTRTP_LOCAL_PORT"])


@pytest.fixture
def peer() -> Any:
    peer = open_rtp_peer()
    yield peer
    peer.close()


@pytest_twisted.ensureDeferred
async def test_external_media_response_and_its_stasis_start_after_it(sim: AsteriskSimulator, ari: Ari,
                                                                      events: Events, peer: RtpPeer) -> None:
    posted_at = sim.reactor.seconds()
    response = await ari.post("/channels/externalMedia", json_body={"variables": {"CALL": "7"}}, channelId="em-1",
                              **{**GOOD, "external_host": peer.address})
    answered_at = sim.reactor.seconds()
    assert answered_at - posted_at >= 0.001  # Asterisk takes a moment to set the channel up; how long is bench's
    assert response.code == 200
    media = response.json()
    assert media["id"] == "em-1"
    assert media["state"] == "Up"
    assert media["name"].startswith(f"UnicastRTP/{peer.address}-0x")
    port = int(media["channelvars"]["UNICASTRTP_LOCAL_PORT"])
    assert media["channelvars"]["UNICASTRTP_LOCAL_ADDRESS"] == "127.0.0.1"
    assert port % 2 == 0 and 10000 <= port < 20000
    start = await events.expect("StasisStart", channel__id="em-1")
    assert events.time_of(start) >= answered_at
    assert start["args"] == []
    assert (await ari.get("/channels/em-1/variable", variable="CALL")).json() == {"value": "7"}
    assert (await ari.post("/channels/externalMedia", channelId="em-1", **GOOD)).code == 409


@pytest_twisted.ensureDeferred
async def test_caller_speech_goes_out_as_asterisk_shaped_rtp(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                             peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer)
    speech = tone((1600 + 147) / 8000)
    await caller.say(speech)
    await wait_until(lambda: len(peer.received) == 11)
    await sleep(0.1)
    assert len(peer.received) == 11, "no packets while the caller is silent"
    packets = [rtp.parse(data) for _, data, _ in peer.received]
    assert {source for _, _, source in peer.received} == {("127.0.0.1", port)}
    assert {p.payload_type for p in packets} == {0}
    assert not any(p.marker for p in packets)
    assert len({p.ssrc for p in packets}) == 1
    assert [len(p.payload) for p in packets] == [160] * 10 + [147]
    assert packets[0].timestamp == 160
    # res_rtp_asterisk predicts lastts + this frame's samples: 160, 320, ... and +147 for the short one
    assert [p.timestamp for p in packets] == [160 * (i + 1) for i in range(10)] + [1600 + 147]
    assert [rtp.seq_distance(packets[0].sequence, p.sequence) for p in packets] == list(range(11))
    assert b"".join(p.payload for p in packets) == ulaw_encode(speech)
    gaps = [b[0] - a[0] for a, b in zip(peer.received, peer.received[1:], strict=False)]
    assert 0.015 < sum(gaps) / len(gaps) < 0.025


@pytest_twisted.ensureDeferred
async def test_timestamp_follows_the_clock_across_a_pause(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                          peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer)
    await caller.say(tone(0.04))
    await sleep(0.3)
    await caller.say(tone(0.04))
    await wait_until(lambda: len(peer.received) == 4)
    stamps = [rtp.parse(data).timestamp for _, data, _ in peer.received]
    assert stamps[:2] == [160, 320]
    assert 320 + 0.25 * 8000 < stamps[2] < 320 + 0.4 * 8000
    assert stamps[3] == stamps[2] + 160


@pytest_twisted.ensureDeferred
async def test_silence_frames_idle_keeps_packets_flowing(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                         peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer, idle="silence_frames")
    await sleep(0.2)
    packets = [rtp.parse(data) for _, data, _ in peer.received]
    assert len(packets) >= 6
    assert all(p.payload == b"\xff" * 160 for p in packets)


@pytest_twisted.ensureDeferred
async def test_slin_is_pt_10_big_endian(sim: AsteriskSimulator, ari: Ari, events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer, fmt="slin")
    speech = tone(0.02)
    await caller.say(speech)
    await wait_until(lambda: len(peer.received) == 1)
    packet = rtp.parse(peer.received[0][1])
    assert (packet.payload_type, len(packet.payload), packet.timestamp) == (10, 320, 160)
    assert packet.payload == struct.pack(">160h", *struct.unpack("<160h", speech))


@pytest_twisted.ensureDeferred
async def test_alaw_and_slin16_formats(sim: AsteriskSimulator, ari: Ari, events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer, fmt="alaw")
    await caller.say(tone(0.04))
    await wait_until(lambda: len(peer.received) == 2)
    assert [(rtp.parse(d).payload_type, len(rtp.parse(d).payload)) for _, d, _ in peer.received] == [(8, 160)] * 2
    peer.received.clear()
    other, wide, _ = await media_call(sim, ari, events, peer, fmt="slin16")
    await other.say(tone(0.04))
    await wait_until(lambda: len(peer.received) == 2)
    packets = [rtp.parse(d) for _, d, _ in peer.received]
    assert [(p.payload_type, len(p.payload), p.timestamp) for p in packets] == [(118, 640, 320), (118, 640, 640)]


@pytest_twisted.ensureDeferred
async def test_nothing_flows_while_the_media_channel_is_not_bridged(sim: AsteriskSimulator, ari: Ari,
                                                                    events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer, bridge=False)
    await caller.say(tone(0.06))
    for sequence in range(5):
        peer.send(rtp.header(0, sequence, sequence * 160, 7) + ulaw_encode(tone(0.02)), port)
    await sleep(0.05)
    assert peer.received == []
    assert caller.heard_segments() == [] and caller.first_heard_at() is None


async def send_stream(sender: RtpPeer, port: int, frames: int, payload_type: int = 0, payload: bytes | None = None,
                      first_sequence: int = 100) -> None:
    for index in range(frames):
        body = payload if payload is not None else ulaw_encode(tone(0.02))
        sender.send(rtp.header(payload_type, first_sequence + index, 160 * index, 4242) + body, port)
        await sleep(0.02)


@pytest_twisted.ensureDeferred
async def test_rtp_from_external_host_is_heard_at_arrival_time(sim: AsteriskSimulator, ari: Ari,
                                                               events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer)
    await sleep(0.1)
    sent_at = sim.reactor.seconds()
    await send_stream(peer, port, 10)
    await sleep(0.03)
    assert caller.answered_at is not None
    [(start, end, source)] = caller.heard_segments()
    assert source == "rtp"
    assert abs(start - (sent_at - caller.answered_at)) < 0.015
    assert abs((end - start) - 0.2) < 0.03
    first = caller.first_heard_at()
    assert first is not None and abs(first - sent_at) < 0.015
    heard = caller.heard()
    begin = round(start * 8000) * 2
    assert heard[begin:begin + 320] == ulaw_decode(ulaw_encode(tone(0.02)))
    assert len(heard) >= begin + 0.2 * 16000


@pytest_twisted.ensureDeferred
async def test_strict_rtp_learns_another_source_after_four_sequential_packets(
        sim: AsteriskSimulator, ari: Ari, events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer)
    stranger = open_rtp_peer()
    try:
        await send_stream(stranger, port, 8)
        await sleep(0.03)
        [(start, end, _)] = caller.heard_segments()
        assert abs((end - start) - 4 * 0.02) < 0.005, "the first 4 packets are dropped, then accepted"
    finally:
        stranger.close()


@pytest_twisted.ensureDeferred
async def test_dynamic_payload_types_are_dropped_static_ones_play(sim: AsteriskSimulator, ari: Ari,
                                                                  events: Events, peer: RtpPeer) -> None:
    caller, media, port = await media_call(sim, ari, events, peer)
    await send_stream(peer, port, 4, payload_type=118, payload=b"\x01\x02" * 320)
    await sleep(0.03)
    assert caller.heard_segments() == []
    await send_stream(peer, port, 2, payload_type=8, payload=alaw_encode(tone(0.02)), first_sequence=200)
    await sleep(0.05)
    await send_stream(peer, port, 2, payload_type=11, payload=struct.pack(">160h", *([1000] * 160)),
                      first_sequence=300)
    await sleep(0.03)
    assert len(caller.heard_segments()) == 2
    heard = caller.heard()
    start = round(caller.heard_segments()[1][0] * 8000) * 2
    assert heard[start:start + 320] == struct.pack("<160h", *([1000] * 160))
