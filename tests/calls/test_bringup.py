"""Bringing a call up: the choice of provider and context, and the media leg on the engine rig (fake ARI,
real media plane on a fake UDP transport, task.Clock), brought up and torn down however far it got."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs

from tests.calls.fakes import channel_json, event
from tests.calls.rig import CALLER, Rig
from twisted_agent.ari.errors import ARIError
from twisted_agent.calls.bringup import Choice, MediaLeg, SetupFailed
from twisted_agent.config import load_config
from twisted_agent.media.rtp import parse

PROVIDERS = {"echo", "local"}
MEDIA = f"ai-media-{CALLER}"
BRIDGE = f"ai-bridge-{CALLER}"


def config(**env: str) -> Any:
    return load_config(None, {"ARI_URL": "http://10.0.0.5:8088/ari", "RTP_ADVERTISE_HOST": "10.0.0.9",
                              "AI_PROVIDER": "echo", "CONTEXT_SALES_GREETING": "Sales!",
                              "CONTEXT_SUPPORT_PROVIDER": "local", **env})


def made(variables: dict[str, str]) -> tuple[str, str, str, str]:
    choice = Choice.made(variables, config(), PROVIDERS, CALLER)
    return choice.provider, choice.provider_source, choice.context, choice.context_source


def warnings_while(action: Any) -> list[dict[str, Any]]:
    with capturedLogs() as logged:
        action()
    return [e for e in logged if e["log_level"] == LogLevel.warn]


def test_channel_variables_choose_the_provider_and_the_context() -> None:
    assert made({}) == ("echo", "default", "default", "default")
    assert made({"AI_PROVIDER": " local ", "AI_CONTEXT": "sales"}) == ("local", "channel variable",
                                                                      "sales", "channel variable")


def test_a_context_may_name_its_provider_but_the_channel_variable_wins() -> None:
    assert made({"AI_CONTEXT": "support"}) == ("local", "context", "support", "channel variable")
    assert made({"AI_CONTEXT": "support", "AI_PROVIDER": "echo"}) == ("echo", "channel variable",
                                                                     "support", "channel variable")


def test_names_that_are_not_configured_keep_the_defaults_and_say_so() -> None:
    warned = warnings_while(lambda: made({"AI_PROVIDER": "watson", "AI_CONTEXT": "nope"}))
    assert made({"AI_PROVIDER": "watson", "AI_CONTEXT": "nope"}) == ("echo", "default", "default", "default")
    assert [(e["value"], e["default"]) for e in warned] == [("watson", "echo"), ("nope", "default")]


def test_variables_missing_from_the_stasis_start_are_asked_of_asterisk(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.ari.add_caller(CALLER, {"AI_CONTEXT": "sales"})
    channel = event("StasisStart", channel=channel_json(CALLER, variables={"AI_PROVIDER": "local"}), args=[]).channel
    choices: list[Choice] = []
    Deferred.fromCoroutine(Choice.of_channel(rig.ari, channel, config(), PROVIDERS)).addCallback(choices.append)
    assert [r for r in rig.ari.requests if r[0] == "get_variable"] == [("get_variable", CALLER, "AI_CONTEXT")]
    assert (choices[0].provider, choices[0].context) == ("local", "sales")
    rig.ari.requests.clear()
    rig.ari.failures["get_variable"] = ARIError(500, "GET", "/channels/x/variable", "boom")
    plain = event("StasisStart", channel=channel_json(CALLER), args=[]).channel
    Deferred.fromCoroutine(Choice.of_channel(rig.ari, plain, config(), PROVIDERS)).addCallback(choices.append)
    assert (choices[1].provider, choices[1].context) == ("echo", "default"), "a failed question is no choice"


class Owner:
    """What the leg gives the media session and the engine: the call, here only told its media started."""

    def __init__(self, leg: MediaLeg) -> None:
        self.leg = leg

    def media_channel_started(self) -> None:
        self.leg.channel_started()


def opening(rig: Rig) -> tuple[MediaLeg, list[Any]]:
    rig.ari.add_caller(CALLER)
    leg = MediaLeg(rig.engine, CALLER, uuid.uuid4())
    result: list[Any] = []
    Deferred.fromCoroutine(leg.open(Owner(leg))).addBoth(result.append)
    return leg, result


def test_the_leg_bridges_the_caller_with_a_media_channel_once_asterisk_started_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    leg, result = opening(rig)
    assert rig.ari.names() == ["create_bridge", "external_media"] and leg.waiting and result == []
    assert rig.ari.requests[1][1]["external_host"] == "10.0.0.9:18080" and rig.ari.requests[1][1]["format"] == "ulaw"
    rig.media_up()  # the media channel's StasisStart
    assert result == [None] and not leg.waiting
    assert rig.ari.requests[-1] == ("add_channel", BRIDGE, [CALLER, MEDIA], True)
    assert rig.ari.bridges[BRIDGE] == [CALLER, MEDIA]
    rig.advance(0.1)  # the paced sender's next ticks
    assert len(rig.udp.written) == 1 and rig.udp.written[0][1] == rig.ari.peers[MEDIA], "a prime frame to Asterisk"
    assert parse(rig.udp.written[0][0]).payload == b"\xff" * 160, "silence"
    Deferred.fromCoroutine(leg.close())
    assert rig.ari.names()[-2:] == ["hangup", "destroy_bridge"]
    assert rig.ari.bridges == {} and MEDIA not in rig.ari.channels and leg.session.closed


def test_no_media_channel_within_the_setup_timeout_fails_and_close_removes_what_was_made(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SETUP_TIMEOUT="2")
    leg, result = opening(rig)
    rig.clock.advance(2)
    assert len(result) == 1 and result[0].check(SetupFailed) and "within 2s" in result[0].getErrorMessage()
    Deferred.fromCoroutine(leg.close())
    assert rig.ari.bridges == {} and rig.ari.names()[-2:] == ["hangup", "destroy_bridge"]


def test_close_before_anything_was_made_asks_nothing_of_asterisk(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    leg = MediaLeg(rig.engine, CALLER, uuid.uuid4())
    done: list[Any] = []
    Deferred.fromCoroutine(leg.close()).addBoth(done.append)
    assert done == [None] and rig.ari.requests == []


@pytest.mark.parametrize("frames, warned", [(0, 1), (1, 0)])
def test_no_audio_after_bridging_is_diagnosed_once(tmp_path: Path, frames: int, warned: int) -> None:
    rig = Rig(tmp_path, NO_AUDIO_SECONDS="3")
    leg, _ = opening(rig)
    rig.media_up()
    leg.frames += frames
    rig.clock.advance(2.9)
    assert rig.engine.counters["no_audio"] == 0
    rig.clock.advance(0.2)
    assert rig.engine.counters["no_audio"] == warned
    rig.clock.advance(60)
    assert rig.engine.counters["no_audio"] == warned


def test_a_call_that_ends_stops_watching_for_audio(tmp_path: Path) -> None:
    rig = Rig(tmp_path, NO_AUDIO_SECONDS="3")
    leg, _ = opening(rig)
    rig.media_up()
    leg.stop_watching()
    rig.clock.advance(10)
    assert rig.engine.counters["no_audio"] == 0
