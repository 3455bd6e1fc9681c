"""ARI REST of the simulator, driven with treq: auth, routing, errors, parameters, resources."""

from __future__ import annotations

import re

import pytest_twisted

from tests.sim.client import Ari, Events
from twisted_agent.sim import AsteriskSimulator

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_credentials_get_401_with_basic_challenge(sim: AsteriskSimulator, ari: Ari) -> None:
    for auth in (None, ("ai-agent", "wrong"), ("someone", "secret")):
        response = await ari.call("GET", "/channels", auth=auth)
        assert response.code == 401
        assert response.json() == {"message": "Authentication required"}
        assert response.header("WWW-Authenticate") == 'Basic realm="Asterisk REST Interface"'


@pytest_twisted.ensureDeferred
async def test_api_key_query_parameter_authenticates(sim: AsteriskSimulator, ari: Ari) -> None:
    ok = await ari.call("GET", "/channels", auth=None, raw_query="api_key=ai-agent:secret")
    assert (ok.code, ok.json()) == (200, [])
    bad = await ari.call("GET", "/channels", auth=None, raw_query="api_key=ai-agent:nope")
    assert bad.code == 401


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(sim: AsteriskSimulator, ari: Ari) -> None:
    missing = await ari.call("GET", "/nothing/here")
    assert (missing.code, missing.json()) == (404, {"message": "Resource not found"})
    wrong = await ari.call("PUT", "/channels")
    assert (wrong.code, wrong.json()) == (405, {"message": "Invalid method"})
    assert wrong.header("Allow") == "GET"
    # a literal segment wins over {channelId}: GET on externalMedia is a wrong method, not "channel not found"
    literal = await ari.call("GET", "/channels/externalMedia")
    assert literal.code == 405


@pytest_twisted.ensureDeferred
async def test_asterisk_info_and_ping(sim: AsteriskSimulator, ari: Ari) -> None:
    info = (await ari.get("/asterisk/info")).json()
    assert info["system"]["version"] == "22.10.1"
    assert re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", info["system"]["entity_id"])
    assert set(info) == {"build", "system", "config", "status"}
    only = (await ari.get("/asterisk/info", only="system")).json()
    assert set(only) == {"system"}
    ping = (await ari.get("/asterisk/ping")).json()
    assert ping["ping"] == "pong" and TIMESTAMP.match(ping["timestamp"])


@pytest_twisted.ensureDeferred
async def test_application_exists_only_while_a_websocket_owns_it(sim: AsteriskSimulator, ari: Ari) -> None:
    assert (await ari.get("/applications/ai-agent")).code == 404
    events = await Events.connect(sim.ari_url)
    response = await ari.get("/applications/ai-agent")
    assert response.code == 200
    assert response.json()["name"] == "ai-agent"
    assert [app["name"] for app in (await ari.get("/applications")).json()] == ["ai-agent"]
    events.close()
    await events.closed
    assert (await ari.get("/applications/ai-agent")).code == 404


@pytest_twisted.ensureDeferred
async def test_channel_json_and_variables(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = sim.originate("ai-agent", caller_number="+4930123", caller_name="Ada",
                           variables={"CALL_LANG": "de"})
    await events.expect("StasisStart")
    channel = (await ari.get(f"/channels/{caller.channel_id}")).json()
    assert re.match(r"^\d+\.\d+$", channel["id"])
    assert re.match(r"^PJSIP/100-[0-9a-f]{8}$", channel["name"])
    assert channel["state"] == "Ring"
    assert channel["caller"] == {"name": "Ada", "number": "+4930123"}
    assert set(channel["dialplan"]) == {"context", "exten", "priority", "app_name", "app_data"}
    assert channel["dialplan"]["app_name"] == "Stasis"
    assert TIMESTAMP.match(channel["creationtime"])
    assert (await ari.get("/channels")).json() == [channel] == sim.live_channels()

    found = await ari.get(f"/channels/{caller.channel_id}/variable", variable="CALL_LANG")
    assert (found.code, found.json()) == (200, {"value": "de"})
    function = await ari.get(f"/channels/{caller.channel_id}/variable", variable="CALLERID(num)")
    assert function.json() == {"value": "+4930123"}
    missing = await ari.get(f"/channels/{caller.channel_id}/variable", variable="NOPE")
    assert (missing.code, missing.json()) == (404, {"message": "Provided variable was not found"})
    no_name = await ari.get(f"/channels/{caller.channel_id}/variable")
    assert no_name.code == 400
    unknown = await ari.get("/channels/1.1/variable", variable="X")
    assert unknown.code == 404

    set_it = await ari.post(f"/channels/{caller.channel_id}/variable", variable="GREETED", value="yes",
                            report_events="true")
    assert set_it.code == 204
    varset = await events.expect("ChannelVarset")
    assert (varset["variable"], varset["value"]) == ("GREETED", "yes")
    assert (await ari.get(f"/channels/{caller.channel_id}/variable", variable="GREETED")).json() == {"value": "yes"}


@pytest_twisted.ensureDeferred
async def test_parameters_from_json_body_and_requests_are_recorded(sim: AsteriskSimulator, ari: Ari) -> None:
    created = await ari.post("/bridges", json_body={"type": "mixing", "bridgeId": "from-body", "name": "b1"})
    assert created.code == 200
    assert (created.json()["id"], created.json()["name"]) == ("from-body", "b1")
    method, path, params = sim.requests[-1]
    assert (method, path, params) == ("POST", "/ari/bridges", {"type": "mixing", "bridgeId": "from-body",
                                                                "name": "b1"})
    # where both give a parameter, the JSON body wins (the generated ..._parse_body functions)
    both = await ari.call("POST", "/bridges", params={"bridgeId": "from-query"}, json_body={"bridgeId": "body"})
    assert both.json()["id"] == "body"
    broken = await ari.call("POST", "/bridges", data=b"{not json", headers={"Content-Type": "application/json"})
    assert (broken.code, broken.json()) == (400, {"message": "Error parsing request body"})
    duplicate = await ari.post("/bridges", bridgeId="body")
    assert (duplicate.code, duplicate.json()) == (409, {"message": "Bridge with id 'body' already exists"})


@pytest_twisted.ensureDeferred
async def test_channel_operation_errors(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    assert (await ari.post("/channels/1.1/answer")).json() == {"message": "Channel not found"}
    caller = sim.originate("ai-agent")
    await events.expect("StasisStart")
    bad_reason = await ari.delete(f"/channels/{caller.channel_id}", reason="because")
    assert (bad_reason.code, bad_reason.json()) == (400, {"message": "Invalid reason for hangup provided"})
    answer = await ari.post(f"/channels/{caller.channel_id}/answer")
    assert answer.code == 204 and answer.body == b""
    state = await events.expect("ChannelStateChange")
    assert state["channel"]["state"] == "Up"
    again = await ari.post(f"/channels/{caller.channel_id}/answer")
    assert again.code == 204
    no_dtmf = await ari.post(f"/channels/{caller.channel_id}/dtmf")
    assert (no_dtmf.code, no_dtmf.json()) == (400, {"message": "DTMF is required"})
    assert (await ari.post(f"/channels/{caller.channel_id}/dtmf", dtmf="12#")).code == 204
    assert caller.dtmf_heard == ["1", "2", "#"]
    assert (await ari.post(f"/channels/{caller.channel_id}/redirect")).code == 400
    assert (await ari.post(f"/channels/{caller.channel_id}/redirect", endpoint="IAX2/x")).code == 422


@pytest_twisted.ensureDeferred
async def test_operations_on_a_channel_outside_stasis_are_409(sim: AsteriskSimulator, ari: Ari,
                                                               events: Events) -> None:
    sim.pbx.media_stasis_delay_range = (0.3, 0.3)
    media = (await ari.post("/channels/externalMedia", app="ai-agent", external_host="127.0.0.1:40000",
                            format="ulaw")).json()
    for response in (await ari.post(f"/channels/{media['id']}/answer"),
                     await ari.post(f"/channels/{media['id']}/play", media="sound:/nothing")):
        assert (response.code, response.json()) == (409, {"message": "Channel not in Stasis application"})
    # reading a variable needs no Stasis control
    port = await ari.get(f"/channels/{media['id']}/variable", variable="UNICASTRTP_LOCAL_PORT")
    assert port.json() == {"value": media["channelvars"]["UNICASTRTP_LOCAL_PORT"]}
