"""ARI REST: each operation sends the documented request, answers and errors map as Asterisk's do."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from tests.helpers import ARI_API_DOCS, free_port
from twisted_agent.ari.errors import (
    ARIAuthError,
    ARIBadRequest,
    ARIConflict,
    ARIError,
    ARINotFound,
    ARIPreconditionFailed,
    ARIServerError,
    ARIUnavailable,
    ARIUnprocessable,
)
from twisted_agent.ari.interfaces import IARIClient
from twisted_agent.ari.rest import ARIClient, gone_ok, ignore_gone
from twisted_agent.config import ARIConfig

API_DOCS = ARI_API_DOCS
CONFIG = ARIConfig(url="http://asterisk.test:8088/ari", username="ai-agent", password="s3cret", app="agent",
                   request_timeout=2.0)
case = SynchronousTestCase()


# --- a fake ARI that records what it is sent ------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str  # below /ari, percent-decoded
    query: dict[str, str]
    body: Any
    authorization: str | None
    raw_path: str = ""


@dataclass
class Answer:
    status: int = 204
    body: Any = None
    reason: bytes | None = None
    #: write the headers and this much of the body, then never finish
    partial: bytes | None = None
    #: never answer at all
    hang: bool = False


@dataclass
class FakeARI(Resource):
    isLeaf = True
    requests: list[Recorded] = field(default_factory=list)
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    pending: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        method = request.method.decode()
        raw_path = request.path.decode()
        assert raw_path.startswith("/ari/")
        path = unquote(raw_path[len("/ari"):])
        query = {}
        for name, values in (request.args or {}).items():
            assert len(values) == 1, "multi-valued parameters are comma-separated, never repeated"
            query[name.decode()] = values[0].decode()
        assert request.content is not None
        content = request.content.read()
        authorization = request.getHeader("authorization")
        self.requests.append(Recorded(method, path, query, json.loads(content) if content else None, authorization,
                                      raw_path))
        answer = self.answers.get((method, path), Answer())
        if answer.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(answer.status, answer.reason)
        if answer.body is not None or answer.partial is not None:
            request.setHeader("content-type", "application/json")
        if answer.partial is not None:
            request.setHeader("content-length", "1000")
            request.write(answer.partial)
            self.pending.append(request)
            return NOT_DONE_YET
        if answer.body is None:
            return b""
        return answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()


def make(**answers: Answer) -> tuple[ARIClient, FakeARI, Clock, StubTreq]:
    fake = FakeARI()
    for key, answer in answers.items():
        method, _, path = key.partition(" ")
        fake.answers[(method, path)] = answer
    clock = Clock()
    stub = StubTreq(fake)
    return ARIClient(clock, CONFIG, http=stub), fake, clock, stub


def answer_of(key: str, answer: Answer, call: Callable[[ARIClient], Deferred[Any]]) -> tuple[Any, Recorded]:
    client, fake, _, _ = make(**{key: answer})
    result = case.successResultOf(call(client))
    (request,) = fake.requests
    return result, request


def error_of(key: str, answer: Answer, call: Callable[[ARIClient], Deferred[Any]]) -> ARIError:
    client, _, _, _ = make(**{key: answer})
    failure = case.failureResultOf(call(client), ARIError)
    assert isinstance(failure.value, ARIError)
    return failure.value


# --- checking requests against the Swagger ---------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    pattern: re.Pattern[str]
    query: frozenset[str]
    required: frozenset[str]
    body: frozenset[str]


def documented_operations() -> list[Operation]:
    operations = []
    for name in ("asterisk", "channels", "bridges", "playbacks"):
        for api in json.loads((API_DOCS / f"{name}.json").read_text())["apis"]:
            template = re.escape(api["path"]).replace(r"\{", "{").replace(r"\}", "}")
            pattern = re.compile("^" + re.sub(r"{[^}]+}", "[^/]+", template) + "$")
            for op in api["operations"]:
                params = op.get("parameters", [])
                operations.append(Operation(
                    op["httpMethod"], pattern,
                    frozenset(p["name"] for p in params if p["paramType"] == "query"),
                    frozenset(p["name"] for p in params if p["paramType"] == "query" and p.get("required")),
                    frozenset(p["name"] for p in params if p["paramType"] == "body"),
                ))
    return operations


OPERATIONS = documented_operations()


def assert_documented(request: Recorded) -> None:
    matches = [op for op in OPERATIONS if op.method == request.method and op.pattern.match(request.path)]
    # /channels/externalMedia also matches /channels/{channelId} for POST: the literal path wins
    assert matches, f"{request.method} {request.path} is not an ARI operation"
    op = next((m for m in matches if "{" not in m.pattern.pattern and "[^/]+" not in m.pattern.pattern), matches[0])
    assert set(request.query) <= op.query, f"undocumented parameters {set(request.query) - op.query}"
    assert op.required <= set(request.query), f"missing required parameters {op.required - set(request.query)}"
    if request.body is not None:
        assert set(request.body) <= op.body


# --- every operation ---------------------------------------------------------------------------------

CHANNEL = {"id": "1782407832.17", "name": "PJSIP/100-0000001a", "state": "Up"}
EM_CHANNEL = {"id": "em-1", "name": "UnicastRTP/192.0.2.5:18080-0x1", "state": "Down",
              "channelvars": {"UNICASTRTP_LOCAL_ADDRESS": "192.0.2.1", "UNICASTRTP_LOCAL_PORT": "14622"}}
BRIDGE = {"id": "call-1", "technology": "simple_bridge", "bridge_type": "mixing", "channels": []}
PLAYBACK = {"id": "pb-1", "media_uri": "sound:/var/lib/ai-agent/media/r1", "target_uri": "channel:c1",
            "state": "queued"}

CASES: list[tuple[str, Callable[[ARIClient], Deferred[Any]], str, dict[str, str], Any, Answer, Any]] = [
    # (name, call, "METHOD path", query, body, answer, result)
    ("get_info", lambda c: c.get_info(), "GET /asterisk/info", {}, None,
     Answer(200, {"system": {"version": "22.10.1"}}), {"system": {"version": "22.10.1"}}),
    ("answer", lambda c: c.answer("1782407832.17"), "POST /channels/1782407832.17/answer", {}, None, Answer(), None),
    ("hangup", lambda c: c.hangup("1782407832.17"), "DELETE /channels/1782407832.17", {"reason": "normal"}, None,
     Answer(), None),
    ("hangup busy", lambda c: c.hangup("c1", reason="busy"), "DELETE /channels/c1", {"reason": "busy"}, None,
     Answer(), None),
    ("get_channel", lambda c: c.get_channel("c1"), "GET /channels/c1", {}, None, Answer(200, CHANNEL), CHANNEL),
    ("list_channels", lambda c: c.list_channels(), "GET /channels", {}, None, Answer(200, [CHANNEL]), [CHANNEL]),
    ("get_variable", lambda c: c.get_variable("c1", "AI_CONTEXT"), "GET /channels/c1/variable",
     {"variable": "AI_CONTEXT"}, None, Answer(200, {"value": "sales"}), "sales"),
    ("set_variable", lambda c: c.set_variable("c1", "TALK_DETECT(set)", "1200,128"), "POST /channels/c1/variable",
     {"variable": "TALK_DETECT(set)", "value": "1200,128"}, None, Answer(), None),
    ("set_variable text", lambda c: c.set_variable("c1", "X", "a+b c&d=e"), "POST /channels/c1/variable",
     {"variable": "X", "value": "a+b c&d=e"}, None, Answer(), None),
    ("set_variable reported", lambda c: c.set_variable("c1", "Y", "1", report=True), "POST /channels/c1/variable",
     {"variable": "Y", "value": "1", "report_events": "true"}, None, Answer(), None),
    ("external_media", lambda c: c.external_media(app="agent", channel_id="em-1", external_host="192.0.2.5:18080",
                                                  format="ulaw"),
     "POST /channels/externalMedia",
     {"app": "agent", "channelId": "em-1", "external_host": "192.0.2.5:18080", "format": "ulaw",
      "encapsulation": "rtp", "transport": "udp", "connection_type": "client", "direction": "both"},
     None, Answer(200, EM_CHANNEL), EM_CHANNEL),
    ("external_media audiosocket", lambda c: c.external_media(
        app="agent", channel_id="em-2", external_host="192.0.2.5:8090", format="slin16", encapsulation="audiosocket",
        transport="tcp", data="7d1c0c4e-2f4a-4c39-9a0e-2f0d2b2f8d11", variables={"CALLER": "c1"}),
     "POST /channels/externalMedia",
     {"app": "agent", "channelId": "em-2", "external_host": "192.0.2.5:8090", "format": "slin16",
      "encapsulation": "audiosocket", "transport": "tcp", "connection_type": "client", "direction": "both",
      "data": "7d1c0c4e-2f4a-4c39-9a0e-2f0d2b2f8d11"},
     {"variables": {"CALLER": "c1"}}, Answer(200, EM_CHANNEL), EM_CHANNEL),
    ("continue", lambda c: c.continue_in_dialplan("c1"), "POST /channels/c1/continue", {}, None, Answer(), None),
    ("continue to", lambda c: c.continue_in_dialplan("c1", "fallback", "s", 3), "POST /channels/c1/continue",
     {"context": "fallback", "extension": "s", "priority": "3"}, None, Answer(), None),
    ("continue label", lambda c: c.continue_in_dialplan("c1", label="after-ai"), "POST /channels/c1/continue",
     {"label": "after-ai"}, None, Answer(), None),
    ("redirect", lambda c: c.redirect("c1", "PJSIP/200"), "POST /channels/c1/redirect", {"endpoint": "PJSIP/200"},
     None, Answer(), None),
    ("create_bridge", lambda c: c.create_bridge("call-1"), "POST /bridges", {"type": "mixing", "bridgeId": "call-1"},
     None, Answer(200, BRIDGE), BRIDGE),
    ("create_bridge named", lambda c: c.create_bridge("call-1", "mixing,dtmf_events", name="ai"), "POST /bridges",
     {"type": "mixing,dtmf_events", "bridgeId": "call-1", "name": "ai"}, None, Answer(200, BRIDGE), BRIDGE),
    ("add_channel", lambda c: c.add_channel("call-1", ["c1", "em-1"]), "POST /bridges/call-1/addChannel",
     {"channel": "c1,em-1"}, None, Answer(), None),
    ("add_channel absorbing keys", lambda c: c.add_channel("call-1", ["c1", "em-1"], absorb_dtmf=True),
     "POST /bridges/call-1/addChannel", {"channel": "c1,em-1", "absorbDTMF": "true"}, None, Answer(), None),
    ("remove_channel", lambda c: c.remove_channel("call-1", "em-1"), "POST /bridges/call-1/removeChannel",
     {"channel": "em-1"}, None, Answer(), None),
    ("destroy_bridge", lambda c: c.destroy_bridge("call-1"), "DELETE /bridges/call-1", {}, None, Answer(), None),
    ("list_bridges", lambda c: c.list_bridges(), "GET /bridges", {}, None, Answer(200, [BRIDGE]), [BRIDGE]),
    ("play", lambda c: c.play("c1", "sound:/var/lib/ai-agent/media/r1"), "POST /channels/c1/play",
     {"media": "sound:/var/lib/ai-agent/media/r1"}, None, Answer(201, PLAYBACK), PLAYBACK),
    ("play from an offset", lambda c: c.play("c1", "sound:/m/r1", playback_id="pb-2", offset_ms=1240),
     "POST /channels/c1/play/pb-2", {"media": "sound:/m/r1", "offsetms": "1240"}, None, Answer(201, PLAYBACK),
     PLAYBACK),
    ("play list with id", lambda c: c.play("c1", ["sound:beep", "sound:/m/r1"], playback_id="pb-1", lang="en"),
     "POST /channels/c1/play/pb-1", {"media": "sound:beep,sound:/m/r1", "lang": "en"}, None, Answer(201, PLAYBACK),
     PLAYBACK),
    ("stop_playback", lambda c: c.stop_playback("pb-1"), "DELETE /playbacks/pb-1", {}, None, Answer(), None),
    ("send_dtmf", lambda c: c.send_dtmf("c1", "12#"), "POST /channels/c1/dtmf", {"dtmf": "12#"}, None, Answer(),
     None),
    ("odd ids", lambda c: c.answer("Local/600@ctx-00000001;2"), "POST /channels/Local/600@ctx-00000001;2/answer", {},
     None, Answer(), None),
]


@pytest.mark.parametrize(("call", "target", "query", "body", "answer", "result"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_operation_sends_the_documented_request(call, target, query, body, answer, result):
    method, _, path = target.partition(" ")
    got, request = answer_of(target, answer, call)
    assert got == result
    assert (request.method, request.path, request.query, request.body) == (method, path, query, body)
    assert request.authorization == "Basic " + base64.b64encode(b"ai-agent:s3cret").decode()
    if "Local/" not in path:
        assert_documented(request)


def test_ids_are_one_path_segment():
    client, fake, _, _ = make()
    case.successResultOf(client.answer("Local/600@ctx-00000001;2"))
    assert fake.requests[0].raw_path == "/ari/channels/Local%2F600%40ctx-00000001%3B2/answer"
    case.successResultOf(client.hangup("a/b?c"))
    assert fake.requests[1].raw_path == "/ari/channels/a%2Fb%3Fc"
    assert fake.requests[1].query == {"reason": "normal"}


def test_client_provides_the_interface():
    client, *_ = make()
    assert verifyObject(IARIClient, client)


def test_each_request_is_logged_at_debug_with_status_and_time():
    client, *_ = make(**{"GET /channels/c1": Answer(200, CHANNEL)})
    with capturedLogs() as events:
        case.successResultOf(client.get_channel("c1"))
    logged = [e for e in events if e.get("path") == "/channels/c1"]
    assert len(logged) == 1
    assert logged[0]["log_level"].name == "debug"
    assert (logged[0]["method"], logged[0]["status"]) == ("GET", 200)
    assert "elapsed_ms" in logged[0]


# --- variables ---------------------------------------------------------------------------------------


def test_missing_variable_is_none_but_missing_channel_is_an_error():
    got, _ = answer_of("GET /channels/c1/variable", Answer(404, {"message": "Provided variable was not found"},
                                                           b"Variable Not Found"),
                       lambda c: c.get_variable("c1", "AI_PROVIDER"))
    assert got is None
    error = error_of("GET /channels/c1/variable", Answer(404, {"message": "Channel not found"}, b"Not Found"),
                     lambda c: c.get_variable("c1", "AI_PROVIDER"))
    assert isinstance(error, ARINotFound) and error.message == "Channel not found"


def test_empty_variable_is_empty_text():
    got, _ = answer_of("GET /channels/c1/variable", Answer(200, {"value": ""}), lambda c: c.get_variable("c1", "X"))
    assert got == ""


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "message", "kind"), [
    (400, "DTMF is required", ARIBadRequest),
    (401, "Authentication required", ARIAuthError),
    (403, "Write access denied", ARIAuthError),
    (404, "Channel not found", ARINotFound),
    (405, "Method Not Allowed", ARIServerError),
    (409, "Channel not in Stasis application", ARIConflict),
    (412, "Channel in invalid state", ARIPreconditionFailed),
    (422, "Channel not in Stasis application", ARIUnprocessable),
    (500, "Unable to resolve host", ARIServerError),
    (501, "The encapsulation and/or transport is not supported", ARIServerError),
    (503, "Asterisk not booted", ARIServerError),
])
def test_error_statuses_map_to_classes_with_asterisks_message(status, message, kind):
    error = error_of("POST /channels/c1/answer", Answer(status, {"message": message}), lambda c: c.answer("c1"))
    assert type(error) is kind
    assert (error.status, error.method, error.path, error.message) == (status, "POST", "/channels/c1/answer", message)
    assert str(error) == f"ARI POST /channels/c1/answer failed: {status} {message}"
    assert "\n" not in str(error)


def test_error_without_a_json_body_uses_the_reason_phrase():
    error = error_of("DELETE /bridges/b1", Answer(404, b"<html>nope</html>", b"Not Found"),
                     lambda c: c.destroy_bridge("b1"))
    assert isinstance(error, ARINotFound) and error.message == "Not Found"


def test_a_success_that_is_not_json_is_a_server_error():
    error = error_of("GET /channels/c1", Answer(200, b"<html>"), lambda c: c.get_channel("c1"))
    assert isinstance(error, ARIServerError) and "not JSON" in error.message
    error = error_of("GET /channels", Answer(200, {"not": "a list"}), lambda c: c.list_channels())
    assert isinstance(error, ARIServerError)


def test_no_answer_within_the_timeout_is_unavailable():
    client, fake, clock, _ = make(**{"POST /channels/c1/answer": Answer(hang=True)})
    d = client.answer("c1")
    clock.advance(1.9)
    case.assertNoResult(d)
    clock.advance(0.2)
    error = case.failureResultOf(d, ARIUnavailable).value
    assert error.status is None
    assert str(error) == "ARI POST /channels/c1/answer: no complete answer from asterisk.test:8088 within 2s"


def test_a_body_that_never_ends_is_bounded_too():
    client, fake, clock, stub = make(**{"GET /channels/c1": Answer(200, partial=b'{"id": "c1", ')})
    d = client.get_channel("c1")
    stub.flush()
    clock.advance(1.0)
    case.assertNoResult(d)  # headers arrived; the body is still coming
    finished = fake.pending[0].notifyFinish()
    clock.advance(1.1)
    error = case.failureResultOf(d, ARIUnavailable).value
    assert "within 2s" in error.message
    stub.flush()
    case.failureResultOf(finished)  # the connection was dropped, not left hanging


def test_cancelling_a_request_is_a_cancellation_not_an_ari_error():
    client, fake, clock, _ = make(**{"POST /channels/c1/play": Answer(hang=True)})
    d = client.play("c1", "sound:x")
    d.cancel()
    case.failureResultOf(d, CancelledError)
    clock.advance(10)  # and the timeout does not fire later


@pytest_twisted.ensureDeferred
async def test_connection_refused_on_a_real_closed_port_is_unavailable():
    port = free_port()
    config = ARIConfig(url=f"http://127.0.0.1:{port}/ari", username="u", password="p", request_timeout=2)
    client = ARIClient(reactor, config)
    with pytest.raises(ARIUnavailable) as info:
        await client.get_info()
    assert info.value.status is None
    assert str(info.value) == f"ARI GET /asterisk/info: connection refused by 127.0.0.1:{port}"


# --- teardown helpers --------------------------------------------------------------------------------


def test_gone_ok_turns_not_found_into_none():
    not_found = error_of("DELETE /channels/c1", Answer(404, {"message": "Channel not found"}),
                         lambda c: c.hangup("c1"))
    client, *_ = make(**{"DELETE /channels/c1": Answer(404, {"message": "Channel not found"}),
                         "DELETE /bridges/b1": Answer(500, {"message": "boom"}),
                         "POST /bridges/b1/removeChannel": Answer(422, {"message": "Channel not in this bridge"})})
    assert isinstance(not_found, ARINotFound)
    assert case.successResultOf(gone_ok(client.hangup("c1"))) is None
    case.failureResultOf(gone_ok(client.destroy_bridge("b1")), ARIServerError)
    case.failureResultOf(gone_ok(client.remove_channel("b1", "c1")), ARIUnprocessable)
    assert case.successResultOf(gone_ok(client.remove_channel("b1", "c1"), ARIUnprocessable)) is None
    assert case.successResultOf(gone_ok(succeed("kept"))) == "kept"


def test_ignore_gone_awaits_and_turns_not_found_into_none():
    client, *_ = make(**{"DELETE /channels/c1": Answer(404, {"message": "Channel not found"}),
                         "DELETE /bridges/b1": Answer(409, {"message": "Bridge not in Stasis application"})})
    assert case.successResultOf(Deferred.fromCoroutine(ignore_gone(client.hangup("c1")))) is None
    case.failureResultOf(Deferred.fromCoroutine(ignore_gone(client.destroy_bridge("b1"))), ARIConflict)
    assert case.successResultOf(Deferred.fromCoroutine(ignore_gone(succeed(3)))) == 3
