"""The ARI operations the simulator implements, one handler each, with their Swagger names.

:data:`ROUTES` is what ``tests/sim/test_conformance.py`` checks against the 22.10.1 api-docs:
method and path, every parameter a handler reads, and the success code. Paths that are not
here answer 404 (``Resource not found``), or 405 when the path exists with another method.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred

from twisted_agent.sim.control import ChannelGone
from twisted_agent.sim.core import Pbx, parse_bool
from twisted_agent.sim.events import EventHub
from twisted_agent.sim.external_media import create_external_media
from twisted_agent.sim.model import HANGUP_REASONS, AriError, Channel, ari_timestamp
from twisted_agent.sim.rest import Params, Reply, Route, route

__all__ = ["ASTERISK_VERSION", "ROUTES", "AriRoutes"]

ASTERISK_VERSION = "22.10.1"
_PLAY_PARAMS = ("media", "lang", "offsetms", "skipms", "playbackId")


class AriRoutes:
    """Handlers: each validates like the matching resource_*.c function, then calls the PBX."""

    def __init__(self, pbx: Pbx, hub: EventHub, started: float) -> None:
        self.pbx = pbx
        self.hub = hub
        self.started = started

    # -- asterisk, applications --------------------------------------------------------------------------

    @route("GET", "/asterisk/info", params=("only",))
    def getInfo(self, p: Params) -> dict[str, Any]:
        info = {
            "build": {"os": "Linux", "kernel": "6.1.0", "machine": "x86_64", "options": "", "date": "2026-06-25",
                      "user": "sim"},
            "system": {"version": ASTERISK_VERSION, "entity_id": self.hub.asterisk_id},
            "config": {"name": "twisted-agent simulator", "default_language": "en",
                       "setid": {"user": "asterisk", "group": "asterisk"}},
            "status": {"startup_time": ari_timestamp(self.started), "last_reload_time": ari_timestamp(self.started)},
        }
        only = p.list("only")
        return {key: value for key, value in info.items() if not only or key in only}

    @route("GET", "/asterisk/ping")
    def ping(self, p: Params) -> dict[str, Any]:
        return {"asterisk_id": self.hub.asterisk_id, "ping": "pong",
                "timestamp": ari_timestamp(self.pbx.timers.seconds())}

    def _application(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "channel_ids": [c.id for c in self.pbx.channels.values() if c.app == name and c.in_stasis],
            "bridge_ids": [b.id for b in self.pbx.bridges.values() if name in b.apps],
            "endpoint_ids": [], "device_names": [], "events_allowed": [], "events_disallowed": [],
        }

    @route("GET", "/applications")
    def listApplications(self, p: Params) -> list[dict[str, Any]]:
        return [self._application(name) for name in sorted(self.hub.owners)]

    @route("GET", "/applications/{applicationName}")
    def getApplication(self, p: Params) -> dict[str, Any]:
        name = p.path["applicationName"]
        if not self.hub.owns(name):
            raise AriError(404, "Application not found")
        return self._application(name)

    # -- channels ----------------------------------------------------------------------------------------

    @route("GET", "/channels")
    def listChannels(self, p: Params) -> list[dict[str, Any]]:
        return [channel.to_json() for channel in self.pbx.channels.values()]

    @route("GET", "/channels/{channelId}")
    def getChannel(self, p: Params) -> dict[str, Any]:
        return self.pbx.channel(p.path["channelId"]).to_json()

    @route("DELETE", "/channels/{channelId}", params=("reason_code", "reason"), success=204)
    def hangup(self, p: Params) -> None:
        channel = self.pbx.channel(p.path["channelId"])
        reason_code, reason = p.get("reason_code"), p.get("reason")
        if reason_code:
            cause = p.int("reason_code")
        elif not reason:
            cause = 16
        elif reason in HANGUP_REASONS:
            cause = HANGUP_REASONS[reason]
        else:
            raise AriError(400, "Invalid reason for hangup provided", "Invalid Reason")
        self.pbx.hangup(channel, cause, soft=True, reason="agent hung up")

    @route("POST", "/channels/externalMedia", success=200, body=("variables",), params=(
        "channelId", "app", "external_host", "encapsulation", "transport", "connection_type", "format", "direction",
        "data", "transport_data"))
    def externalMedia(self, p: Params) -> Deferred[dict[str, Any]]:
        names = ("channelId", "app", "external_host", "encapsulation", "transport", "connection_type", "format",
                 "direction", "data")
        values = {name: p.get(name) for name in names}
        return Deferred.fromCoroutine(create_external_media(self.pbx, values, p.variables()))

    async def _sync(self, channel: Channel, command: Any) -> None:
        """A synchronous control command: the response waits until the channel's queue ran it."""
        assert channel.control is not None
        try:
            await channel.control.submit(command)
        except ChannelGone:
            raise AriError(404, "Channel not found") from None

    @route("POST", "/channels/{channelId}/answer", success=204)
    def answer(self, p: Params) -> Deferred[None]:
        channel = self.pbx.control(p.path["channelId"])
        return Deferred.fromCoroutine(self._sync(channel, lambda: self.pbx.answer(channel)))

    @route("POST", "/channels/{channelId}/ring", success=204)
    def ring(self, p: Params) -> None:
        self.pbx.control(p.path["channelId"])

    @route("DELETE", "/channels/{channelId}/ring", success=204)
    def ringStop(self, p: Params) -> None:
        self.pbx.control(p.path["channelId"])

    @route("POST", "/channels/{channelId}/continue", params=("context", "extension", "priority", "label"),
           success=204)
    def continueInDialplan(self, p: Params) -> None:
        channel = self.pbx.control(p.path["channelId"])
        self.pbx.continue_in_dialplan(channel, p.get("context"), p.get("extension"), p.int("priority"),
                                      p.get("label"))

    @route("POST", "/channels/{channelId}/redirect", params=("endpoint",), success=204)
    def redirect(self, p: Params) -> None:
        channel = self.pbx.control(p.path["channelId"])
        endpoint = p.get("endpoint")
        if not endpoint:
            raise AriError(400, "Required parameter 'endpoint' not provided.", "Not Found")
        self.pbx.redirect(channel, endpoint)

    @route("POST", "/channels/{channelId}/dtmf", params=("dtmf", "before", "between", "duration", "after"),
           success=204)
    def sendDTMF(self, p: Params) -> None:
        channel = self.pbx.control(p.path["channelId"])
        digits = p.get("dtmf")
        if not digits:
            raise AriError(400, "DTMF is required")
        if channel.caller is not None:
            heard = channel.caller.dtmf_heard
            assert channel.control is not None
            channel.control.post(lambda: heard.extend(d for d in digits.upper() if d in "0123456789ABCD*#"))

    @route("GET", "/channels/{channelId}/variable", params=("variable",))
    def getChannelVar(self, p: Params) -> dict[str, str]:
        name = p.get("variable")
        if not name:
            raise AriError(400, "Variable name is required")
        channel = self.pbx.channel(p.path["channelId"], "Provided channel was not found", "Channel Not Found")
        return {"value": self.pbx.get_variable(channel, name)}

    @route("POST", "/channels/{channelId}/variable", params=("variable", "value", "report_events"), success=204)
    def setChannelVar(self, p: Params) -> None:
        name = p.get("variable")
        if not name:
            raise AriError(400, "Variable name is required")
        channel = self.pbx.control(p.path["channelId"], check_state=False)
        self.pbx.set_variable(channel, name, p.get("value") or "", parse_bool(p.get("report_events")))

    def _play(self, p: Params, playback_id: str | None) -> Reply:
        channel = self.pbx.control(p.path["channelId"])
        if p.int("skipms", 3000) < 0:
            raise AriError(400, "skipms cannot be negative")
        if p.int("offsetms") < 0:
            raise AriError(400, "offsetms cannot be negative")
        media = [item for item in (p.get("media") or "").split(",")]
        if not media or any(not item for item in media):
            raise AriError(500, "Failed to queue media for playback", "Internal Server Error")
        if playback_id and self.pbx.playback.get(playback_id) is not None:
            raise AriError(500, "Failed to queue media for playback", "Internal Server Error")
        playback = self.pbx.play(channel, media, playback_id, p.get("lang"), offset_ms=p.int("offsetms"))
        return Reply(playback.to_json(), 201, {"Location": f"/ari/playbacks/{playback.id}"})

    @route("POST", "/channels/{channelId}/play", params=_PLAY_PARAMS, success=201)
    def play(self, p: Params) -> Reply:
        return self._play(p, p.get("playbackId"))

    @route("POST", "/channels/{channelId}/play/{playbackId}", params=_PLAY_PARAMS[:-1], success=201)
    def playWithId(self, p: Params) -> Reply:
        return self._play(p, p.path["playbackId"])

    # -- bridges -----------------------------------------------------------------------------------------

    @route("GET", "/bridges")
    def listBridges(self, p: Params) -> list[dict[str, Any]]:
        return [bridge.to_json() for bridge in self.pbx.bridges.values()]

    @route("POST", "/bridges", params=("type", "bridgeId", "name"), body=("variables",))
    def createBridge(self, p: Params) -> dict[str, Any]:
        p.variables()
        return self.pbx.create_bridge(p.get("bridgeId"), p.get("type"), p.get("name")).to_json()

    @route("POST", "/bridges/{bridgeId}", params=("type", "name"), body=("variables",))
    def createBridgeWithId(self, p: Params) -> dict[str, Any]:
        p.variables()
        return self.pbx.create_bridge(p.path["bridgeId"], p.get("type"), p.get("name")).to_json()

    @route("GET", "/bridges/{bridgeId}")
    def getBridge(self, p: Params) -> dict[str, Any]:
        return self.pbx.bridge(p.path["bridgeId"]).to_json()

    @route("DELETE", "/bridges/{bridgeId}", success=204)
    def destroyBridge(self, p: Params) -> None:
        self.pbx.destroy_bridge(self.pbx.bridge(p.path["bridgeId"]))

    @route("POST", "/bridges/{bridgeId}/addChannel", success=204, params=(
        "channel", "role", "absorbDTMF", "mute", "inhibitConnectedLineUpdates"))
    def addChannel(self, p: Params) -> None:
        bridge = self.pbx.bridge(p.path["bridgeId"])
        members = self.pbx.bridge_members(p.list("channel"))
        mute, absorb = parse_bool(p.get("mute")), parse_bool(p.get("absorbDTMF"))
        for channel in members:
            assert channel.control is not None
            channel.control.post(partial(self.pbx.join, channel, bridge, mute=mute, absorb_dtmf=absorb))

    @route("POST", "/bridges/{bridgeId}/removeChannel", params=("channel",), success=204)
    def removeChannel(self, p: Params) -> None:
        bridge = self.pbx.bridge(p.path["bridgeId"])
        members = self.pbx.bridge_members(p.list("channel"))
        for channel in members:
            if channel.bridge is not bridge:
                raise AriError(422, "Channel not in this bridge")
        for channel in members:
            assert channel.control is not None
            channel.control.post(partial(self.pbx.leave, channel, bridge))

    # -- playbacks ---------------------------------------------------------------------------------------

    @route("GET", "/playbacks/{playbackId}")
    def getPlayback(self, p: Params) -> dict[str, Any]:
        playback = self.pbx.playback.get(p.path["playbackId"])
        if playback is None:
            raise AriError(404, "Playback not found")
        return playback.to_json()

    @route("DELETE", "/playbacks/{playbackId}", success=204)
    def stopPlayback(self, p: Params) -> None:
        playback = self.pbx.playback.get(p.path["playbackId"])
        if playback is None:
            raise AriError(404, "Playback not found")
        self.pbx.playback.stop(playback)


ROUTES: list[Route] = [
    member._ari_route for member in vars(AriRoutes).values() if hasattr(member, "_ari_route")
]
