"""The simulator against the ARI Swagger files of Asterisk 22.10.1 (tests/data/ari-api-docs, from its source).

1. Every route the simulator serves exists in the docs with the same method; every query parameter
   a handler can read (and every body parameter) is declared for that operation with that
   paramType; the success code follows the convention (void -> 204, play/record -> 201, else 200).
2. The operations an ARI voice agent needs are all implemented.
3. Over a scripted call, every REST response body matches its operation's ``responseClass`` model
   and every event sent matches its events.json model (required fields, types, allowable values,
   no undocumented fields).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import ARI_API_DOCS
from tests.sim.client import Ari, AudioSocketServer, Events, open_rtp_peer, sleep, wait_until
from tests.sim.test_playback import write_clip
from tests.sim.test_rtp_media import send_stream, tone
from twisted_agent.sim import ROUTES, AsteriskSimulator

DOCS = ARI_API_DOCS
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")
CREATED = {"play", "playWithId", "record"}

#: what the call engine needs from Asterisk (PROTOCOLS §1.6), by (method, path)
NEEDED = {
    ("POST", "/channels/{channelId}/answer"), ("DELETE", "/channels/{channelId}"),
    ("GET", "/channels/{channelId}"), ("GET", "/channels"), ("POST", "/channels/{channelId}/play"),
    ("POST", "/channels/{channelId}/play/{playbackId}"), ("POST", "/channels/externalMedia"),
    ("GET", "/channels/{channelId}/variable"), ("POST", "/channels/{channelId}/variable"),
    ("POST", "/channels/{channelId}/dtmf"), ("POST", "/channels/{channelId}/continue"),
    ("POST", "/channels/{channelId}/redirect"), ("POST", "/bridges"), ("POST", "/bridges/{bridgeId}"),
    ("GET", "/bridges"), ("POST", "/bridges/{bridgeId}/addChannel"), ("POST", "/bridges/{bridgeId}/removeChannel"),
    ("DELETE", "/bridges/{bridgeId}"), ("GET", "/playbacks/{playbackId}"), ("DELETE", "/playbacks/{playbackId}"),
    ("GET", "/asterisk/info"), ("GET", "/applications/{applicationName}"),
}


def load_docs() -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, dict[str, Any]]]:
    if not DOCS.is_dir():
        pytest.fail(f"ARI api-docs not found at {DOCS}: they belong to the repository (git checkout tests/data)")
    operations: dict[tuple[str, str], dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    for path in sorted(DOCS.glob("*.json")):
        doc = json.loads(path.read_text())
        for api in doc.get("apis", []):
            for operation in api.get("operations", []):
                operations[(operation["httpMethod"], api["path"])] = operation
        models.update(doc.get("models", {}))
    return operations, models


OPERATIONS, MODELS = load_docs()


def success_code(operation: dict[str, Any]) -> int:
    if operation["responseClass"] == "void":
        return 204
    return 201 if operation["nickname"] in CREATED else 200


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.template}")
def test_route_is_documented(route: Any) -> None:
    operation = OPERATIONS.get((route.method, route.template))
    assert operation is not None, f"{route.method} {route.template} is not in the 22.10.1 api-docs"
    declared = {p["name"]: p["paramType"] for p in operation.get("parameters", [])}
    for name in route.params:
        assert declared.get(name) == "query", f"{operation['nickname']}: query parameter {name!r} not declared"
    for name in route.body:
        assert declared.get(name) == "body", f"{operation['nickname']}: body parameter {name!r} not declared"
    path_params = set(re.findall(r"{(\w+)}", route.template))
    assert path_params == {name for name, kind in declared.items() if kind == "path"}
    assert route.success == success_code(operation), operation["nickname"]


def test_the_operations_an_agent_needs_are_implemented() -> None:
    assert NEEDED <= {(r.method, r.template) for r in ROUTES}
    assert len({(r.method, r.template) for r in ROUTES}) == len(ROUTES)


def test_the_docs_checker_can_fail() -> None:
    with pytest.raises(AssertionError):
        check_model({"id": "x"}, "Channel")
    with pytest.raises(AssertionError):
        check_model({"value": 1}, "Variable")
    with pytest.raises(AssertionError):
        check_event({"type": "StasisEnd", "application": "a", "timestamp": "2026-01-01T00:00:00.000+0000",
                     "channel": {}, "surprise": 1})


# -- model checking ---------------------------------------------------------------------------------

def _properties(model: str) -> dict[str, dict[str, Any]]:
    properties = dict(MODELS[model]["properties"])
    for parent, spec in MODELS.items():
        if model in spec.get("subTypes", []):
            properties = {**_properties(parent), **properties}
    return properties


def check_type(value: Any, kind: str, where: str) -> None:
    if kind.startswith("List["):
        assert isinstance(value, list), f"{where}: expected a list"
        for index, item in enumerate(value):
            check_type(item, kind[5:-1], f"{where}[{index}]")
    elif kind == "string":
        assert isinstance(value, str), f"{where}: expected a string, got {value!r}"
    elif kind in ("int", "long"):
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an int, got {value!r}"
    elif kind == "double":
        assert isinstance(value, int | float), f"{where}: expected a number"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: expected a boolean"
    elif kind == "Date":
        assert isinstance(value, str) and TIMESTAMP.match(value), f"{where}: bad Date {value!r}"
    elif kind == "object":
        assert isinstance(value, dict), f"{where}: expected an object"
    else:
        check_model(value, kind, where)


def check_model(value: Any, model: str, where: str = "") -> None:
    where = where or model
    assert isinstance(value, dict), f"{where}: expected a {model} object"
    properties = _properties(model)
    unknown = set(value) - set(properties)
    assert not unknown, f"{where}: fields not in the {model} model: {sorted(unknown)}"
    for name, spec in properties.items():
        if name not in value:
            assert not spec.get("required"), f"{where}: required field {name!r} missing"
            continue
        check_type(value[name], spec["type"], f"{where}.{name}")
        allowed = spec.get("allowableValues", {}).get("values")
        if allowed is not None and spec["type"] == "string":
            assert value[name] in allowed, f"{where}.{name}: {value[name]!r} not in {allowed}"


def check_event(event: dict[str, Any]) -> None:
    assert event["type"] in MODELS, f"undocumented event type {event['type']}"
    check_model(event, event["type"], event["type"])


def check_response(method: str, template: str, code: int, body: bytes) -> None:
    operation = OPERATIONS[(method, template)]
    assert code == success_code(operation), f"{operation['nickname']} answered {code}"
    if operation["responseClass"] == "void":
        assert body == b""
    else:
        check_type(json.loads(body), operation["responseClass"], operation["nickname"])


class CheckedAri:
    """Calls a route by its template and checks the answer against the docs."""

    def __init__(self, ari: Ari) -> None:
        self.ari = ari

    async def __call__(self, method: str, template: str, json_body: Any = None, **params: Any) -> Any:
        path = re.sub(r"{(\w+)}", lambda m: str(params.pop(m.group(1))), template)
        response = await self.ari.call(method, path, params, json_body)
        check_response(method, template, response.code, response.body)
        return response.json() if response.body else None


@pytest_twisted.ensureDeferred
async def test_responses_and_events_of_a_whole_call_match_the_models(sim: AsteriskSimulator, ari: Ari,
                                                                     events: Events, tmp_path: Path) -> None:
    call = CheckedAri(ari)
    clip = write_clip(tmp_path, "hello", 0.06)
    peer = open_rtp_peer()
    server = await AudioSocketServer().listen()
    try:
        caller = sim.originate("ai-agent", args=("x",), variables={"V": "1"})
        await events.expect("StasisStart")
        channel_id = caller.channel_id
        await call("GET", "/asterisk/info")
        await call("GET", "/applications/{applicationName}", applicationName="ai-agent")
        await call("POST", "/channels/{channelId}/answer", channelId=channel_id)
        await call("POST", "/channels/{channelId}/variable", channelId=channel_id, variable="TALK_DETECT(set)",
                   value="100")
        await call("POST", "/channels/{channelId}/variable", channelId=channel_id, variable="X", value="y",
                   report_events="true")
        await call("GET", "/channels/{channelId}/variable", channelId=channel_id, variable="X")
        media = await call("POST", "/channels/externalMedia", json_body={"variables": {"A": "b"}}, app="ai-agent",
                           external_host=peer.address, format="ulaw")
        socket_leg = await call("POST", "/channels/externalMedia", app="ai-agent", external_host=server.address,
                                encapsulation="audiosocket", transport="tcp", format="slin", data=str(uuid.uuid4()))
        await events.expect("StasisStart", channel__id=socket_leg["id"])
        await events.expect("StasisStart", channel__id=media["id"])
        bridge = await call("POST", "/bridges", type="mixing", name="call")
        await call("POST", "/bridges/{bridgeId}", bridgeId="second")
        await call("POST", "/bridges/{bridgeId}/addChannel", bridgeId=bridge["id"],
                   channel=f"{channel_id},{media['id']}")
        await call("GET", "/bridges")
        await call("GET", "/bridges/{bridgeId}", bridgeId=bridge["id"])
        await call("GET", "/channels")
        await call("GET", "/channels/{channelId}", channelId=media["id"])
        await caller.say(tone(0.06, amplitude=3000) + bytes(1600))  # talk, then the 100 ms of silence that ends it
        await send_stream(peer, int(media["channelvars"]["UNICASTRTP_LOCAL_PORT"]), 2)
        caller.send_dtmf("1", duration_ms=10)
        playback = await call("POST", "/channels/{channelId}/play", channelId=channel_id,
                              media=f"sound:{clip},sound:{tmp_path}/missing")
        await call("GET", "/playbacks/{playbackId}", playbackId=playback["id"])
        await call("POST", "/channels/{channelId}/play/{playbackId}", channelId=channel_id, playbackId="p2",
                   media=f"sound:{clip}")
        await call("DELETE", "/playbacks/{playbackId}", playbackId="p2")
        await events.expect("PlaybackFinished", playback__id="p2")
        await events.expect("ChannelTalkingFinished")
        await call("POST", "/bridges/{bridgeId}/removeChannel", bridgeId=bridge["id"], channel=media["id"])
        await call("DELETE", "/channels/{channelId}", channelId=media["id"])
        await call("DELETE", "/channels/{channelId}", channelId=socket_leg["id"])
        await call("POST", "/channels/{channelId}/dtmf", channelId=channel_id, dtmf="1")
        await call("DELETE", "/bridges/{bridgeId}", bridgeId=bridge["id"])
        await call("POST", "/channels/{channelId}/continue", channelId=channel_id)
        await caller.ended
        replacement = await Events.connect(sim.ari_url)
        await events.expect("ApplicationReplaced")
        events.protocol.sendMessage(b"{", isBinary=False)  # type: ignore[union-attr]
        await wait_until(lambda: "RESTResponse" in replacement.types() + events.types())
        await sleep(0.02)
        replacement.close()
    finally:
        peer.close()
        await server.close()

    sent = sim.events_sent()
    kinds = {event["type"] for event in sent}
    assert kinds >= {"StasisStart", "StasisEnd", "ChannelStateChange", "ChannelVarset", "ChannelEnteredBridge",
                     "ChannelLeftBridge", "ChannelHangupRequest", "ChannelDestroyed", "ChannelDtmfReceived",
                     "ChannelTalkingStarted", "ChannelTalkingFinished", "PlaybackStarted", "PlaybackContinuing",
                     "PlaybackFinished", "BridgeDestroyed", "ApplicationReplaced"}
    for event in sent + [e for e in events.events if e["type"] == "RESTResponse"]:
        check_event(event)
