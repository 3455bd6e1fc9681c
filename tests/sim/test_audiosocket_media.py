"""ExternalMedia over AudioSocket: Asterisk connects to us during the POST, audio both ways, hang-ups."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest_twisted

from tests.sim.client import Ari, AudioSocketServer, Events, sleep, wait_until
from tests.sim.test_rtp_media import tone
from twisted_agent.media import audiosocket_framing as framing
from twisted_agent.media.codecs import ulaw_encode
from twisted_agent.sim import AsteriskSimulator, SimulatedCaller


async def audiosocket_call(sim: AsteriskSimulator, ari: Ari, events: Events, server: AudioSocketServer,
                           fmt: str = "slin") -> tuple[SimulatedCaller, dict[str, Any], str]:
    caller = sim.originate("ai-agent")
    await events.expect("StasisStart", channel__id=caller.channel_id)
    await ari.post(f"/channels/{caller.channel_id}/answer")
    call_uuid = str(uuid.UUID(int=0x1234))
    response = await ari.post("/channels/externalMedia", app="ai-agent", external_host=server.address,
                              encapsulation="audiosocket", transport="tcp", format=fmt, data=call_uuid)
    assert response.code == 200, response.body
    media = response.json()
    start = await events.expect("StasisStart", channel__id=media["id"])
    assert start["args"] == [call_uuid]
    bridge = (await ari.post("/bridges")).json()
    await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=f"{caller.channel_id},{media['id']}")
    await events.expect("ChannelEnteredBridge", channel__id=media["id"])
    return caller, media, call_uuid


@pytest_twisted.ensureDeferred
async def test_asterisk_connects_during_the_post_and_sends_the_uuid_first(sim: AsteriskSimulator, ari: Ari,
                                                                          events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        call_uuid = str(uuid.uuid4())
        response = await ari.post("/channels/externalMedia", app="ai-agent", external_host=server.address,
                                  encapsulation="audiosocket", transport="tcp", format="slin", data=call_uuid)
        assert response.code == 200
        assert response.json()["name"] == f"AudioSocket/{server.address}-{call_uuid}"
        assert len(server.connections) == 1, "connected before the response"
        connection = server.connections[0]
        await wait_until(lambda: connection.frames)
        assert connection.frames[0][1:] == (framing.UUID, uuid.UUID(call_uuid).bytes)
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_no_listener_is_500(sim: AsteriskSimulator, ari: Ari) -> None:
    server = await AudioSocketServer().listen()
    address = server.address
    await server.close()
    response = await ari.post("/channels/externalMedia", app="ai-agent", external_host=address,
                              encapsulation="audiosocket", transport="tcp", format="slin", data=str(uuid.uuid4()))
    assert response.code == 500
    assert sim.live_channels() == []


@pytest_twisted.ensureDeferred
async def test_audio_both_ways_slin(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server)
        connection = server.connections[0]
        speech = tone(0.1)
        await caller.say(speech)
        await wait_until(lambda: len(connection.frames) == 6)
        audio = connection.frames[1:]
        assert [(kind, len(payload)) for _, kind, payload in audio] == [(framing.AUDIO_SLIN, 320)] * 5
        assert b"".join(payload for _, _, payload in audio) == speech
        reply = struct.pack("<160h", *range(0, 1600, 10))
        for _ in range(3):
            connection.send(framing.AUDIO_SLIN, reply)
            await sleep(0.02)
        await sleep(0.02)
        [(start, end, source)] = caller.heard_segments()
        assert source == "audiosocket" and abs((end - start) - 0.06) < 0.005
        begin = round(start * 8000) * 2
        assert caller.heard()[begin:begin + 320] == reply
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_slin16_uses_kind_0x12_with_640_byte_frames(sim: AsteriskSimulator, ari: Ari,
                                                           events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server, fmt="slin16")
        connection = server.connections[0]
        await caller.say(tone(0.04))
        await wait_until(lambda: len(connection.frames) == 3)
        assert [(kind, len(payload)) for _, kind, payload in connection.frames[1:]] == [(framing.AUDIO_SLIN16, 640)] * 2
        connection.send(framing.AUDIO_SLIN16, struct.pack("<320h", *([2000] * 320)))
        await wait_until(lambda: caller.heard_segments() != [])
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_ulaw_over_audiosocket_is_mislabelled_as_slin_like_asterisk(sim: AsteriskSimulator, ari: Ari,
                                                                          events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server, fmt="ulaw")
        connection = server.connections[0]
        await caller.say(tone(0.04))
        await wait_until(lambda: len(connection.frames) == 3)
        assert [(kind, len(payload)) for _, kind, payload in connection.frames[1:]] == [(framing.AUDIO_SLIN, 160)] * 2
        # what comes back as 0x10 is read as slin: μ-law bytes become noise, not the tone
        connection.send(framing.AUDIO_SLIN, ulaw_encode(tone(0.04)))
        await wait_until(lambda: caller.heard_segments() != [])
        await sleep(0.03)
        start = round(caller.heard_segments()[0][0] * 8000) * 2
        assert caller.heard()[start:start + 320] == ulaw_encode(tone(0.04))
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_hangup_frame_from_the_agent_ends_the_media_channel(sim: AsteriskSimulator, ari: Ari,
                                                                  events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server)
        connection = server.connections[0]
        connection.send(framing.HANGUP)
        await events.expect("ChannelDestroyed", channel__id=media["id"])
        await connection.closed
        assert (await ari.get(f"/channels/{caller.channel_id}")).code == 200
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_channel_hangup_closes_tcp_without_a_hangup_frame(sim: AsteriskSimulator, ari: Ari,
                                                                events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server)
        connection = server.connections[0]
        assert (await ari.delete(f"/channels/{media['id']}")).code == 204
        await connection.closed
        assert framing.HANGUP not in [kind for _, kind, _ in connection.frames]
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_caller_dtmf_reaches_the_audiosocket_leg(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    server = await AudioSocketServer().listen()
    try:
        caller, media, _ = await audiosocket_call(sim, ari, events, server)
        connection = server.connections[0]
        caller.send_dtmf("7", duration_ms=20)
        await events.expect("ChannelDtmfReceived")
        await wait_until(lambda: (framing.DTMF, b"7") in [(k, p) for _, k, p in connection.frames])
    finally:
        await server.close()
