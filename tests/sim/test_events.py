"""The events WebSocket: upgrade checks, envelope, app ownership, and losing the connection."""

from __future__ import annotations

import base64
import re

import pytest
import pytest_twisted

from tests.sim.client import Ari, Events, sleep, wait_until
from twisted_agent.sim import AsteriskSimulator

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest_twisted.ensureDeferred
async def test_upgrade_is_refused_before_the_handshake(sim: AsteriskSimulator, ari: Ari) -> None:
    unauthenticated = await ari.call("GET", "/events", params={"app": "ai-agent"}, auth=None, headers=UPGRADE)
    assert unauthenticated.code == 401
    assert unauthenticated.header("WWW-Authenticate") == 'Basic realm="Asterisk REST Interface"'
    no_app = await ari.call("GET", "/events", headers=UPGRADE)
    assert (no_app.code, no_app.json()) == (400, {"message": "HTTP request is missing param: [app]"})
    sim.refuse_event_connections(True)
    refused = await ari.call("GET", "/events", params={"app": "ai-agent"}, headers=UPGRADE)
    assert refused.code == 503
    with pytest.raises(ConnectionError):
        await Events.connect(sim.ari_url)
    sim.refuse_event_connections(False)
    accepted = await Events.connect(sim.ari_url)
    assert accepted.protocol_name == "ari"
    accepted.close()


@pytest_twisted.ensureDeferred
async def test_basic_auth_api_key_and_no_subprotocol_are_accepted(sim: AsteriskSimulator) -> None:
    basic = "Basic " + base64.b64encode(b"ai-agent:secret").decode()
    events = await Events.connect(sim.ari_url, protocols=[], query="app=ai-agent", headers={"Authorization": basic})
    assert events.protocol_name is None
    with pytest.raises(ConnectionError):
        await Events.connect(sim.ari_url, query="app=ai-agent&api_key=ai-agent:bad")
    with pytest.raises(ConnectionError):
        await Events.connect(sim.ari_url, protocols=["media"])
    events.close()


@pytest_twisted.ensureDeferred
async def test_stasis_start_for_an_originated_call(sim: AsteriskSimulator, events: Events) -> None:
    caller = sim.originate("ai-agent", args=("inbound", "x"), variables={"A": "1"})
    start = await events.expect("StasisStart")
    assert start["application"] == "ai-agent"
    assert TIMESTAMP.match(start["timestamp"])
    assert start["asterisk_id"] == sim.hub.asterisk_id
    assert start["args"] == ["inbound", "x"]
    assert start["channel"]["id"] == caller.channel_id
    assert start["channel"]["state"] == "Ring"
    assert start["channel"]["dialplan"]["app_data"] == "ai-agent,inbound,x"
    assert sim.events_sent() == [start]
    assert not caller.dialplan_continued


@pytest_twisted.ensureDeferred
async def test_without_an_owner_the_call_continues_in_the_dialplan(sim: AsteriskSimulator) -> None:
    caller = sim.originate("nobody-home")
    assert caller.dialplan_continued
    assert caller.continued_to == ("from-external", "100", 3)
    assert await caller.ended == "continued in dialplan"
    assert sim.events_sent() == []
    assert sim.live_channels() == []


@pytest_twisted.ensureDeferred
async def test_a_newer_connection_replaces_the_older_one(sim: AsteriskSimulator) -> None:
    first = await Events.connect(sim.ari_url)
    second = await Events.connect(sim.ari_url)
    replaced = await first.expect("ApplicationReplaced")
    assert replaced["application"] == "ai-agent"
    sim.originate("ai-agent")
    await second.expect("StasisStart")
    await sleep(0.02)
    assert first.types() == ["ApplicationReplaced"]
    first.close()
    second.close()


@pytest_twisted.ensureDeferred
async def test_unparseable_text_frame_gets_a_400_rest_response(sim: AsteriskSimulator, events: Events) -> None:
    assert events.protocol is not None
    events.protocol.sendMessage(b"this is not json", isBinary=False)
    reply = await events.expect("RESTResponse")
    assert reply["status_code"] == 400


@pytest_twisted.ensureDeferred
async def test_dropped_connection_loses_events_until_the_app_reconnects(sim: AsteriskSimulator, ari: Ari,
                                                                          events: Events) -> None:
    caller = sim.originate("ai-agent")
    await events.expect("StasisStart")
    await sim.drop_event_connections()
    wasClean, _ = await events.closed
    assert not wasClean
    assert (await ari.get("/applications/ai-agent")).code == 404
    # the call is still there, in Stasis; what happens meanwhile is not delivered
    assert (await ari.post(f"/channels/{caller.channel_id}/answer")).code == 204
    again = await Events.connect(sim.ari_url)
    assert [c["id"] for c in (await ari.get("/channels")).json()] == [caller.channel_id]
    await caller.hangup()
    await again.expect("ChannelDestroyed", channel__id=caller.channel_id)
    assert "ChannelStateChange" not in again.types() + events.types()
    again.close()


@pytest_twisted.ensureDeferred
async def test_subscribe_all_receives_other_apps_events(sim: AsteriskSimulator) -> None:
    mine = await Events.connect(sim.ari_url, query="app=ai-agent&api_key=ai-agent:secret")
    everything = await Events.connect(sim.ari_url, query="app=monitor&subscribeAll=true&api_key=ai-agent:secret")
    sim.originate("ai-agent")
    await mine.expect("StasisStart")
    seen = await everything.expect("StasisStart")
    assert seen["application"] == "monitor"
    await wait_until(lambda: len(sim.events_sent()) == 2)
    mine.close()
    everything.close()
