"""Typed ARI events from the JSON Asterisk 22 sends (shapes from PROTOCOLS.md §1.3-1.4 and events.json)."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import ARI_API_DOCS
from twisted_agent.ari import events as ev
from twisted_agent.ari.events import (
    KNOWN_EVENT_TYPES,
    ARIEventError,
    Bridge,
    Caller,
    Channel,
    Dialplan,
    Playback,
    UnknownEvent,
    ari_timestamp,
    parse_ari_timestamp,
    parse_event,
)

API_DOCS = ARI_API_DOCS
APP = "asterisk-ai-voice-agent"
TS = "2026-06-25T17:17:12.345+0000"


def channel_json(channel_id: str = "1782407832.17", name: str = "PJSIP/100-0000001a", state: str = "Ring",
                 **extra: Any) -> dict[str, Any]:
    """A Channel exactly as Asterisk 22's ast_channel_snapshot_to_json writes it."""
    channel = {
        "id": channel_id,
        "name": name,
        "state": state,
        "protocol_id": "3c2a1b@192.0.2.10",
        "caller": {"name": "Alice", "number": "100"},
        "connected": {"name": "", "number": ""},
        "accountcode": "",
        "dialplan": {"context": "from-internal", "exten": "600", "priority": 2, "app_name": "Stasis",
                     "app_data": APP},
        "creationtime": "2026-06-25T17:17:12.301+0000",
        "language": "en",
    }
    channel.update(extra)
    return channel


def bridge_json(channels: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": "call-1782407832.17", "technology": "simple_bridge", "bridge_type": "mixing",
        "bridge_class": "stasis", "creator": "Stasis", "name": "",
        "channels": ["1782407832.17"] if channels is None else channels,
        "creationtime": TS, "video_mode": "none",
    }


def playback_json(state: str = "playing") -> dict[str, Any]:
    return {"id": "pb-1", "media_uri": "sound:/var/lib/ai-agent/media/reply-1", "target_uri": "channel:1782407832.17",
            "language": "en", "state": state}


def envelope(event_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "timestamp": TS, "application": APP, "asterisk_id": "52:54:00:12:34:56", **fields}


#: one realistic frame of every event type the engine parses
SAMPLES: dict[str, dict[str, Any]] = {
    "StasisStart": envelope("StasisStart", args=[], channel=channel_json()),
    "StasisEnd": envelope("StasisEnd", channel=channel_json(state="Up")),
    "ChannelStateChange": envelope("ChannelStateChange", channel=channel_json(state="Up")),
    "ChannelHangupRequest": envelope("ChannelHangupRequest", cause=16, soft=True, channel=channel_json(state="Up")),
    "ChannelDestroyed": envelope("ChannelDestroyed", cause=16, cause_txt="Normal Clearing",
                                 channel=channel_json(state="Up")),
    "ChannelDtmfReceived": envelope("ChannelDtmfReceived", digit="5", duration_ms=120,
                                    channel=channel_json(state="Up")),
    "ChannelTalkingStarted": envelope("ChannelTalkingStarted", channel=channel_json(state="Up")),
    "ChannelTalkingFinished": envelope("ChannelTalkingFinished", duration=2380, channel=channel_json(state="Up")),
    "PlaybackStarted": envelope("PlaybackStarted", playback=playback_json()),
    "PlaybackContinuing": envelope("PlaybackContinuing", playback=playback_json("continuing")),
    "PlaybackFinished": envelope("PlaybackFinished", playback=playback_json("done")),
    "ChannelEnteredBridge": envelope("ChannelEnteredBridge", bridge=bridge_json(), channel=channel_json(state="Up")),
    "ChannelLeftBridge": envelope("ChannelLeftBridge", bridge=bridge_json([]), channel=channel_json(state="Up")),
    "ChannelVarset": envelope("ChannelVarset", variable="TALK_DETECT", value="", channel=channel_json()),
    "BridgeDestroyed": envelope("BridgeDestroyed", bridge=bridge_json([])),
    "ApplicationReplaced": envelope("ApplicationReplaced"),
    "Dial": envelope("Dial", peer=channel_json("1782407832.18", "PJSIP/200-0000001b"), dialstatus="ANSWER",
                     dialstring="200", caller=channel_json()),
}

EXPECTED_CHANNEL = Channel(
    id="1782407832.17", name="PJSIP/100-0000001a", state="Ring",
    caller=Caller("Alice", "100"), connected=Caller("", ""),
    dialplan=Dialplan("from-internal", "600", 2, "Stasis", APP),
    language="en", creationtime="2026-06-25T17:17:12.301+0000", channelvars={}, accountcode="",
    protocol_id="3c2a1b@192.0.2.10",
)


def events_json() -> dict[str, Any]:
    return json.loads((API_DOCS / "events.json").read_text())


def test_samples_cover_every_known_type_and_only_real_asterisk_events():
    assert set(SAMPLES) == KNOWN_EVENT_TYPES
    assert KNOWN_EVENT_TYPES <= set(events_json()["models"]["Event"]["subTypes"])


def test_caller_stasis_start():
    event = parse_event(json.dumps(SAMPLES["StasisStart"]))
    assert isinstance(event, ev.StasisStart)
    assert event.type == "StasisStart" and event.application == APP and event.timestamp == TS
    assert event.asterisk_id == "52:54:00:12:34:56"
    assert event.channel == EXPECTED_CHANNEL
    assert event.args == () and event.replace_channel is None


def test_external_media_stasis_start_has_its_args_and_channelvars():
    frame = envelope("StasisStart", args=["7d1c0c4e-2f4a-4c39-9a0e-2f0d2b2f8d11"], channel=channel_json(
        "em-1782407832.17", "UnicastRTP/127.0.0.1:18080-0x7f3c2c01a2b0", "Up",
        channelvars={"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": "14622"}))
    event = parse_event(json.dumps(frame).encode())
    assert isinstance(event, ev.StasisStart)
    assert event.args == ("7d1c0c4e-2f4a-4c39-9a0e-2f0d2b2f8d11",)
    assert event.channel.name.startswith("UnicastRTP/")
    assert event.channel.channelvars == {"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": "14622"}


def test_stasis_start_with_replace_channel():
    frame = envelope("StasisStart", args=["a", "b"], channel=channel_json(),
                     replace_channel=channel_json("old.1", "Local/600@ctx-00000001;2", "Up"))
    event = parse_event(frame)
    assert isinstance(event, ev.StasisStart)
    assert event.args == ("a", "b")
    assert event.replace_channel is not None and event.replace_channel.id == "old.1"


def test_every_type_parses_into_its_class_with_its_fields():
    parsed = {name: parse_event(json.dumps(frame)) for name, frame in SAMPLES.items()}
    for name, event in parsed.items():
        assert type(event).__name__ == name
        assert event.type == name and event.application == APP and event.timestamp == TS

    e = parsed["ChannelHangupRequest"]
    assert isinstance(e, ev.ChannelHangupRequest) and (e.cause, e.soft, e.channel.state) == (16, True, "Up")
    e2 = parsed["ChannelDestroyed"]
    assert isinstance(e2, ev.ChannelDestroyed) and (e2.cause, e2.cause_txt) == (16, "Normal Clearing")
    e3 = parsed["ChannelDtmfReceived"]
    assert isinstance(e3, ev.ChannelDtmfReceived) and (e3.digit, e3.duration_ms) == ("5", 120)
    e4 = parsed["ChannelTalkingFinished"]
    assert isinstance(e4, ev.ChannelTalkingFinished) and e4.duration == 2380
    for name, state in (("PlaybackStarted", "playing"), ("PlaybackContinuing", "continuing"),
                        ("PlaybackFinished", "done")):
        p = parsed[name]
        assert isinstance(p, ev.PlaybackStarted | ev.PlaybackContinuing | ev.PlaybackFinished)
        assert p.playback == Playback(id="pb-1", media_uri="sound:/var/lib/ai-agent/media/reply-1",
                                      target_uri="channel:1782407832.17", state=state, language="en")
    entered = parsed["ChannelEnteredBridge"]
    assert isinstance(entered, ev.ChannelEnteredBridge)
    assert entered.bridge == Bridge(id="call-1782407832.17", technology="simple_bridge", bridge_type="mixing",
                                    bridge_class="stasis", channels=("1782407832.17",), name="")
    assert entered.channel is not None and entered.channel.id == "1782407832.17"
    left = parsed["ChannelLeftBridge"]
    assert isinstance(left, ev.ChannelLeftBridge) and left.bridge.channels == () and left.channel.state == "Up"
    varset = parsed["ChannelVarset"]
    assert isinstance(varset, ev.ChannelVarset) and (varset.variable, varset.value) == ("TALK_DETECT", "")
    assert varset.channel == EXPECTED_CHANNEL
    destroyed = parsed["BridgeDestroyed"]
    assert isinstance(destroyed, ev.BridgeDestroyed) and destroyed.bridge.id == "call-1782407832.17"
    dial = parsed["Dial"]
    assert isinstance(dial, ev.Dial) and (dial.peer.id, dial.dialstatus, dial.dialstring) == (
        "1782407832.18", "ANSWER", "200")
    assert dial.caller == EXPECTED_CHANNEL


def test_optional_parts_may_be_absent_or_null():
    assert parse_event(envelope("ChannelVarset", variable="GLOBAL_X", value="1")) == ev.ChannelVarset(
        application=APP, timestamp=TS, asterisk_id="52:54:00:12:34:56", variable="GLOBAL_X", value="1")
    hangup = parse_event(envelope("ChannelHangupRequest", channel=channel_json(), cause=None))
    assert isinstance(hangup, ev.ChannelHangupRequest) and hangup.cause is None and hangup.soft is None
    entered = parse_event(envelope("ChannelEnteredBridge", bridge=bridge_json()))
    assert isinstance(entered, ev.ChannelEnteredBridge) and entered.channel is None
    no_id = {k: v for k, v in SAMPLES["ApplicationReplaced"].items() if k != "asterisk_id"}
    assert parse_event(no_id) == ev.ApplicationReplaced(application=APP, timestamp=TS)
    # An older Asterisk (no protocol_id), a channel without caller/dialplan details: still a call.
    sparse = parse_event(envelope("StasisStart", args=[], channel={"id": "1.1", "name": "SIP/a-1", "state": "Ring"}))
    assert isinstance(sparse, ev.StasisStart)
    assert sparse.channel == Channel(id="1.1", name="SIP/a-1", state="Ring")


def test_unknown_types_are_kept_not_rejected():
    frame = envelope("RecordingStarted", recording={"name": "r1", "format": "wav", "state": "recording"})
    event = parse_event(json.dumps(frame))
    assert isinstance(event, UnknownEvent)
    assert event.type == "RecordingStarted" and event.application == APP and event.raw == frame
    # Messages that are not Events (no application, no timestamp) too.
    missing = parse_event({"type": "MissingParams", "params": ["app"]})
    assert isinstance(missing, UnknownEvent) and missing.application == "" and missing.raw["params"] == ["app"]


@pytest.mark.parametrize(("frame", "problem"), [
    (b"\xff\xfe{", "not JSON"),
    ("{\"type\": \"StasisStart\"", "not JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ("42", "expected a JSON object, got a number"),
    ("{}", "missing type"),
    ('{"type": ""}', "missing type"),
    ('{"type": 7}', "type: expected a string, got a number"),
    ("[" * 100000, "not JSON"),
])
def test_frames_that_are_not_events(frame, problem):
    with pytest.raises(ARIEventError, match=re.escape(problem)):
        parse_event(frame)


def mutated(name: str, path: tuple[str | int, ...], value: Any = None, delete: bool = False) -> dict[str, Any]:
    frame = copy.deepcopy(SAMPLES[name])
    target: Any = frame
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return frame


@pytest.mark.parametrize(("frame", "problem"), [
    (mutated("StasisStart", ("channel",), delete=True), "StasisStart.channel: missing"),
    (mutated("StasisStart", ("args",), delete=True), "StasisStart.args: missing"),
    (mutated("StasisStart", ("args",), ["ok", 3]), "StasisStart.args[1]: expected a string, got a number"),
    (mutated("StasisStart", ("channel", "id"), delete=True), "StasisStart.channel.id: missing"),
    (mutated("StasisStart", ("channel", "caller"), "Alice"), "StasisStart.channel.caller: expected an object"),
    (mutated("StasisStart", ("channel", "dialplan", "priority"), True),
     "StasisStart.channel.dialplan.priority: expected an integer, got a boolean"),
    (mutated("StasisStart", ("channel", "channelvars"), {"X": {"nested": 1}}),
     "StasisStart.channel.channelvars.X: expected a string, got an object"),
    (mutated("StasisEnd", ("application",), delete=True), "StasisEnd.application: missing"),
    (mutated("StasisEnd", ("timestamp",), 1782407832), "StasisEnd.timestamp: expected a string, got a number"),
    (mutated("StasisEnd", ("asterisk_id",), ["x"]), "StasisEnd.asterisk_id: expected a string, got a list"),
    (mutated("ChannelHangupRequest", ("cause",), "16"), "ChannelHangupRequest.cause: expected an integer"),
    (mutated("ChannelHangupRequest", ("soft",), "yes"), "ChannelHangupRequest.soft: expected a boolean"),
    (mutated("ChannelDestroyed", ("cause",), 16.5), "ChannelDestroyed.cause: expected an integer, got a number"),
    (mutated("ChannelDtmfReceived", ("digit",), delete=True), "ChannelDtmfReceived.digit: missing"),
    (mutated("PlaybackFinished", ("playback",), []), "PlaybackFinished.playback: expected an object, got a list"),
    (mutated("ChannelLeftBridge", ("bridge", "channels"), "a,b"),
     "ChannelLeftBridge.bridge.channels: expected a list of strings, got a string"),
    (mutated("Dial", ("peer",), None), "Dial.peer: missing"),
])
def test_malformed_known_events_name_the_field(frame, problem):
    with pytest.raises(ARIEventError, match=re.escape(problem)):
        parse_event(json.dumps(frame))


def test_every_field_events_json_requires_is_required():
    """Checked against the Swagger: dropping any required property of a known event is an error."""
    models = events_json()["models"]
    for name in sorted(KNOWN_EVENT_TYPES):
        required = [prop for model in ("Message", "Event", name)
                    for prop, spec in models[model]["properties"].items() if spec.get("required")]
        for prop in required:
            frame = {k: v for k, v in SAMPLES[name].items() if k != prop}
            with pytest.raises(ARIEventError):
                parse_event(frame)


def test_channelvars_scalars_are_text():
    frame = mutated("StasisStart", ("channel", "channelvars"), {"A": 1, "B": None, "C": True, "D": "d"})
    event = parse_event(frame)
    assert isinstance(event, ev.StasisStart)
    assert event.channel.channelvars == {"A": "1", "B": "", "C": "1", "D": "d"}


def test_events_are_immutable_and_hashable_despite_dicts():
    event = parse_event(SAMPLES["StasisStart"])
    with pytest.raises(AttributeError):
        event.type = "other"  # type: ignore[misc]
    assert hash(event) == hash(parse_event(SAMPLES["StasisStart"]))


# --- timestamps ---------------------------------------------------------------------------------


def test_timestamp_format_matches_asterisk():
    assert ari_timestamp(1782407832.345) == "2026-06-25T17:17:12.345+0000"
    assert ari_timestamp(0) == "1970-01-01T00:00:00.000+0000"
    assert parse_ari_timestamp("2026-06-25T17:17:12.345+0000") == pytest.approx(1782407832.345)
    assert parse_ari_timestamp("2026-06-25T19:17:12.345+0200") == pytest.approx(1782407832.345)


@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
def test_timestamps_round_trip_to_the_millisecond(seconds):
    text = ari_timestamp(seconds)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", text)
    assert math.isclose(parse_ari_timestamp(text), seconds, abs_tol=0.0011)


# --- robustness ---------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)

FIELD_NAMES = sorted({key for frame in SAMPLES.values() for key in frame}
                     | set(channel_json()) | set(bridge_json()) | set(playback_json()))


def near_misses() -> st.SearchStrategy[dict[str, Any]]:
    """Known event types with fields of any JSON type, and valid frames with one field spoiled."""
    random_fields = st.builds(
        lambda t, fields: {**fields, "type": t},
        st.sampled_from(sorted(KNOWN_EVENT_TYPES)),
        st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=8),
    )
    nested = st.sampled_from(["channel", "bridge", "playback", "peer", "caller", "replace_channel"])

    def spoil(name: str, key: str, inner_key: str, value: Any) -> dict[str, Any]:
        frame = copy.deepcopy(SAMPLES[name])
        if key in frame and isinstance(frame[key], dict):
            frame[key][inner_key] = value
        else:
            frame[key] = value
        return frame

    spoiled = st.builds(spoil, st.sampled_from(sorted(SAMPLES)), nested | st.sampled_from(FIELD_NAMES),
                        st.sampled_from(FIELD_NAMES), json_values)
    return random_fields | spoiled


@given(json_values | st.dictionaries(st.text(max_size=8), json_values) | near_misses())
def test_any_json_is_an_event_or_an_ari_event_error(value):
    for frame in (value, json.dumps(value)):
        try:
            event = parse_event(frame)
        except ARIEventError:
            continue
        assert isinstance(event, ev.ARIEvent)


@given(st.binary(max_size=64))
def test_any_bytes_are_an_event_or_an_ari_event_error(frame):
    try:
        parse_event(frame)
    except ARIEventError:
        pass


texts = st.text(max_size=12)


@st.composite
def channels(draw: st.DrawFn) -> tuple[dict[str, Any], Channel]:
    expected = Channel(
        id=draw(texts), name=draw(texts), state=draw(st.sampled_from(["Down", "Ring", "Ringing", "Up", "Busy"])),
        caller=Caller(draw(texts), draw(texts)), connected=Caller(draw(texts), draw(texts)),
        dialplan=Dialplan(draw(texts), draw(texts), draw(st.integers(1, 10**9)), draw(texts), draw(texts)),
        language=draw(texts), creationtime=ari_timestamp(draw(st.integers(0, 4 * 10**9))),
        channelvars=draw(st.dictionaries(texts, texts, max_size=3)), accountcode=draw(texts),
        protocol_id=draw(texts),
    )
    raw = {
        "id": expected.id, "name": expected.name, "state": expected.state, "protocol_id": expected.protocol_id,
        "caller": {"name": expected.caller.name, "number": expected.caller.number},
        "connected": {"name": expected.connected.name, "number": expected.connected.number},
        "accountcode": expected.accountcode,
        "dialplan": {"context": expected.dialplan.context, "exten": expected.dialplan.exten,
                     "priority": expected.dialplan.priority, "app_name": expected.dialplan.app_name,
                     "app_data": expected.dialplan.app_data},
        "creationtime": expected.creationtime, "language": expected.language, "channelvars": expected.channelvars,
    }
    return raw, expected


@given(channels(), texts, st.lists(texts, max_size=4), st.integers(0, 127), texts, st.sampled_from("0123456789*#ABCD"),
       st.integers(0, 10**6))
def test_valid_events_round_trip_their_values(channel, application, args, cause, cause_txt, digit, duration):
    raw, expected = channel
    base = {"application": application, "timestamp": TS, "asterisk_id": None}
    start = parse_event(json.dumps({"type": "StasisStart", **base, "args": args, "channel": raw}))
    assert start == ev.StasisStart(**base, channel=expected, args=tuple(args))
    destroyed = parse_event(json.dumps({"type": "ChannelDestroyed", **base, "cause": cause, "cause_txt": cause_txt,
                                        "channel": raw}))
    assert destroyed == ev.ChannelDestroyed(**base, channel=expected, cause=cause, cause_txt=cause_txt)
    dtmf = parse_event(json.dumps({"type": "ChannelDtmfReceived", **base, "digit": digit, "duration_ms": duration,
                                   "channel": raw}))
    assert dtmf == ev.ChannelDtmfReceived(**base, channel=expected, digit=digit, duration_ms=duration)
