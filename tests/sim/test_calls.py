"""Call life cycle: hang-ups in Asterisk's order, continue/redirect, bridges, DTMF."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.sim.client import Ari, Events, wait_until
from twisted_agent.sim import AsteriskSimulator, SimulatedCaller


async def answered_call(sim: AsteriskSimulator, ari: Ari, events: Events) -> SimulatedCaller:
    caller = sim.originate("ai-agent")
    await events.expect("StasisStart", channel__id=caller.channel_id)
    assert (await ari.post(f"/channels/{caller.channel_id}/answer")).code == 204
    await caller.answered
    return caller


async def bridged_media(sim: AsteriskSimulator, ari: Ari, events: Events,
                        caller: SimulatedCaller) -> tuple[dict[str, Any], dict[str, Any]]:
    media = (await ari.post("/channels/externalMedia", app="ai-agent", external_host="127.0.0.1:40000",
                            format="ulaw", data="media-leg")).json()
    start = await events.expect("StasisStart", channel__id=media["id"])
    assert start["args"] == ["media-leg"]
    bridge = (await ari.post("/bridges", type="mixing")).json()
    added = await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=f"{caller.channel_id},{media['id']}")
    assert added.code == 204
    await events.expect("ChannelEnteredBridge", channel__id=media["id"])
    return media, bridge


def after(events: Events, channel_id: str, first: str) -> list[str]:
    types = events.types(channel_id)
    return types[types.index(first):]


@pytest_twisted.ensureDeferred
async def test_caller_hangup_sends_events_in_asterisk_order(sim: AsteriskSimulator, ari: Ari,
                                                             events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    media, bridge = await bridged_media(sim, ari, events, caller)
    await caller.hangup()
    request = await events.expect("ChannelHangupRequest", channel__id=caller.channel_id)
    destroyed = await events.expect("ChannelDestroyed", channel__id=caller.channel_id)
    assert after(events, caller.channel_id, "ChannelHangupRequest") == [
        "ChannelHangupRequest", "ChannelLeftBridge", "StasisEnd", "ChannelDestroyed"]
    assert request["cause"] == 16 and "soft" not in request
    assert (destroyed["cause"], destroyed["cause_txt"]) == (16, "Normal Clearing")
    spread = events.time_of(destroyed) - events.time_of(request)
    assert 0.002 <= spread <= 0.1
    assert await caller.ended == "caller hung up"


@pytest_twisted.ensureDeferred
async def test_media_channel_survives_the_caller_until_deleted(sim: AsteriskSimulator, ari: Ari,
                                                                events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    media, bridge = await bridged_media(sim, ari, events, caller)
    await caller.hangup()
    await events.expect("ChannelDestroyed", channel__id=caller.channel_id)
    assert [c["id"] for c in sim.live_channels()] == [media["id"]]
    assert (await ari.get(f"/bridges/{bridge['id']}")).json()["channels"] == [media["id"]]
    assert after(events, media["id"], "ChannelEnteredBridge") == ["ChannelEnteredBridge"]

    assert (await ari.delete(f"/channels/{media['id']}")).code == 204
    request = await events.expect("ChannelHangupRequest", channel__id=media["id"])
    assert request["soft"] is True
    await events.expect("ChannelDestroyed", channel__id=media["id"])
    assert after(events, media["id"], "ChannelHangupRequest") == [
        "ChannelHangupRequest", "ChannelLeftBridge", "StasisEnd", "ChannelDestroyed"]
    assert (await ari.get(f"/channels/{media['id']}")).code == 404
    assert (await ari.delete(f"/bridges/{bridge['id']}")).code == 204
    destroyed = await events.expect("BridgeDestroyed")
    assert destroyed["bridge"]["id"] == bridge["id"]
    assert sim.live_channels() == [] and sim.live_bridges() == []
    assert (await ari.delete(f"/channels/{media['id']}")).json() == {"message": "Channel not found"}


@pytest_twisted.ensureDeferred
async def test_agent_hangup_with_a_reason(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    assert (await ari.delete(f"/channels/{caller.channel_id}", reason="busy")).code == 204
    destroyed = await events.expect("ChannelDestroyed")
    assert (destroyed["cause"], destroyed["cause_txt"]) == (17, "User busy")
    assert after(events, caller.channel_id, "ChannelHangupRequest") == [
        "ChannelHangupRequest", "StasisEnd", "ChannelDestroyed"]
    assert await caller.ended == "agent hung up"


@pytest_twisted.ensureDeferred
async def test_continue_leaves_stasis_for_the_dialplan(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    media, bridge = await bridged_media(sim, ari, events, caller)
    response = await ari.post(f"/channels/{caller.channel_id}/continue", context="voicemail", extension="200")
    assert response.code == 204
    assert await caller.ended == "continued in dialplan"
    assert caller.dialplan_continued and caller.continued_to == ("voicemail", "200", 1)
    await events.expect("StasisEnd", channel__id=caller.channel_id)
    assert after(events, caller.channel_id, "ChannelLeftBridge") == ["ChannelLeftBridge", "StasisEnd"]
    assert (await ari.post(f"/channels/{caller.channel_id}/answer")).code == 404


@pytest_twisted.ensureDeferred
async def test_continue_without_a_target_goes_to_the_next_priority(sim: AsteriskSimulator, ari: Ari,
                                                                    events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    await ari.post(f"/channels/{caller.channel_id}/continue")
    await caller.ended
    assert caller.continued_to == ("from-external", "100", 3)


@pytest_twisted.ensureDeferred
async def test_redirect(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    assert (await ari.post(f"/channels/{caller.channel_id}/redirect", endpoint="PJSIP/operator")).code == 204
    assert await caller.ended == "redirected"
    assert caller.redirected_to == "PJSIP/operator"
    await events.expect("ChannelDestroyed", channel__id=caller.channel_id)


@pytest_twisted.ensureDeferred
async def test_bridge_errors(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    sim.pbx.media_stasis_delay_range = (0.3, 0.3)
    caller = await answered_call(sim, ari, events)
    media = (await ari.post("/channels/externalMedia", app="ai-agent", external_host="127.0.0.1:40000",
                            format="ulaw")).json()
    bridge = (await ari.post("/bridges", type="mixing", bridgeId="b1")).json()
    assert bridge["technology"] == "simple_bridge" and bridge["bridge_type"] == "mixing"
    assert (await ari.post("/bridges", bridgeId="b1")).code == 409
    assert (await ari.post("/bridges/b1")).code == 409
    too_early = await ari.post("/bridges/b1/addChannel", channel=media["id"])
    assert (too_early.code, too_early.json()) == (422, {"message": "Channel not in Stasis application"})
    unknown = await ari.post("/bridges/b1/addChannel", channel="1.1")
    assert (unknown.code, unknown.json()) == (400, {"message": "Channel not found"})
    no_bridge = await ari.post("/bridges/nope/addChannel", channel=caller.channel_id)
    assert (no_bridge.code, no_bridge.json()) == (404, {"message": "Bridge not found"})
    assert (await ari.post("/bridges/b1/addChannel")).json() == {"message": "Missing parameter channel"}
    not_member = await ari.post("/bridges/b1/removeChannel", channel=caller.channel_id)
    assert (not_member.code, not_member.json()) == (422, {"message": "Channel not in this bridge"})

    assert (await ari.post("/bridges/b1/addChannel", channel=caller.channel_id)).code == 204
    entered = await events.expect("ChannelEnteredBridge")
    assert entered["bridge"]["channels"] == [caller.channel_id]
    assert (await ari.post("/bridges/b1/removeChannel", channel=caller.channel_id)).code == 204
    left = await events.expect("ChannelLeftBridge")
    assert left["bridge"]["channels"] == []
    assert (await ari.delete("/bridges/b1")).code == 204
    assert (await ari.delete("/bridges/b1")).code == 404


@pytest_twisted.ensureDeferred
async def test_destroying_a_bridge_removes_its_channels_but_keeps_them_in_stasis(
        sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    media, bridge = await bridged_media(sim, ari, events, caller)
    await ari.delete(f"/bridges/{bridge['id']}")
    await events.expect("BridgeDestroyed")
    assert {e["channel"]["id"] for e in events.events if e["type"] == "ChannelLeftBridge"} == {
        caller.channel_id, media["id"]}
    assert {c["id"] for c in sim.live_channels()} == {caller.channel_id, media["id"]}
    assert (await ari.post(f"/channels/{caller.channel_id}/answer")).code == 204


@pytest_twisted.ensureDeferred
async def test_caller_dtmf_arrives_when_the_key_is_released(sim: AsteriskSimulator, ari: Ari,
                                                             events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    caller.send_dtmf("5")
    caller.send_dtmf("#", duration_ms=40)
    first = await events.expect("ChannelDtmfReceived")
    second = await events.expect("ChannelDtmfReceived")
    assert (first["digit"], first["duration_ms"]) == ("#", 40)
    assert (second["digit"], second["duration_ms"]) == ("5", 100)
    assert first["channel"]["id"] == caller.channel_id


@pytest_twisted.ensureDeferred
async def test_talk_detect_reports_the_callers_speech(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    response = await ari.post(f"/channels/{caller.channel_id}/variable", variable="TALK_DETECT(set)", value="200")
    assert response.code == 204
    loud = (3000).to_bytes(2, "little", signed=True) * 1600
    await caller.say(loud + bytes(3200))  # Asterisk counts silence in the frames it reads: the phone sends them
    await events.expect("ChannelTalkingStarted")
    finished = await events.expect("ChannelTalkingFinished")
    assert 150 <= finished["duration"] <= 300
    await wait_until(lambda: caller.frames_sent == 20)


@pytest_twisted.ensureDeferred
async def test_a_talk_detect_value_asterisk_cannot_read_keeps_the_settings(sim: AsteriskSimulator, ari: Ari,
                                                                          events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    channel = sim.pbx.channels[caller.channel_id]
    for value, expected in (("100,300", (100, 300)), ("abc", (100, 300)), ("100,0", (100, 300)), (",500", (2500, 500))):
        response = await ari.post(f"/channels/{caller.channel_id}/variable", variable="TALK_DETECT(set)", value=value)
        assert response.code == 204 and channel.talk_detect == expected, value
