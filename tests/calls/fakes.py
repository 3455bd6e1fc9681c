"""Fakes for engine tests: an ARI REST client that models channels and bridges, and an events source."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from twisted_agent.ari.errors import ARINotFound, ARIUnprocessable
from twisted_agent.ari.events import parse_event

TIMESTAMP = "2026-06-25T17:17:12.345+0000"


def channel_json(channel_id: str, *, number: str = "+15551230000", state: str = "Ring",
                 variables: dict[str, str] | None = None, name: str | None = None) -> dict[str, Any]:
    return {
        "id": channel_id, "name": name or f"PJSIP/100-{channel_id[-4:]}", "state": state,
        "protocol_id": "", "caller": {"name": "Test", "number": number}, "connected": {"name": "", "number": ""},
        "accountcode": "", "dialplan": {"context": "from-ai-agent", "exten": "s", "priority": 2,
                                        "app_name": "Stasis", "app_data": "asterisk-ai-voice-agent"},
        "creationtime": TIMESTAMP, "language": "en", "channelvars": variables or {},
    }


def event(kind: str, **fields: Any) -> Any:
    return parse_event({"type": kind, "application": "asterisk-ai-voice-agent", "timestamp": TIMESTAMP,
                        "asterisk_id": "00:11:22:33:44:55", **fields})


class FakeEvents:
    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.connection_listeners: list[Any] = []
        self.connected = True

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def add_connection_listener(self, listener: Any) -> None:
        self.connection_listeners.append(listener)

    def emit(self, item: Any) -> None:
        for listener in list(self.listeners):
            listener(item)

    def connection(self, up: bool) -> None:
        self.connected = up
        for listener in list(self.connection_listeners):
            listener(up)


class FakeARIService:
    def __init__(self, rest: FakeARI) -> None:
        self.rest = rest
        self.events = FakeEvents()

    @property
    def connected(self) -> bool:
        return self.events.connected


class FakeARI:
    """Records every request and keeps a small model of Asterisk's channels and bridges."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, ...]] = []
        self.channels: dict[str, dict[str, str]] = {}  # id -> channel variables
        self.in_stasis: set[str] = set()
        self.bridges: dict[str, list[str]] = {}
        self.playbacks: dict[str, str] = {}
        self.offsets: dict[str, int] = {}  # playback id -> offsetms it was started with
        self.hold: dict[str, Deferred[Any]] = {}  # request name -> Deferred the test fires later
        self.failures: dict[str, Exception] = {}
        self.peers: dict[str, tuple[str, int]] = {}  # media channel -> its UNICASTRTP_LOCAL address

    def add_caller(self, channel_id: str, variables: dict[str, str] | None = None) -> None:
        self.channels[channel_id] = dict(variables or {})
        self.in_stasis.add(channel_id)

    def names(self) -> list[str]:
        return [request[0] for request in self.requests]

    def _record(self, name: str, *args: Any, result: Any = None) -> Deferred[Any]:
        self.requests.append((name, *args))
        if name in self.failures:
            return fail(self.failures[name])
        if name in self.hold:
            held = self.hold.pop(name)
            return held.addCallback(lambda _: result)
        return succeed(result)

    def _exists(self, channel_id: str) -> None:
        if channel_id not in self.channels:
            raise ARINotFound(404, "DELETE", f"/channels/{channel_id}", "Channel not found")

    def get_variable(self, channel_id: str, variable: str) -> Deferred[str | None]:
        value = self.channels.get(channel_id, {}).get(variable)
        return self._record("get_variable", channel_id, variable, result=value)

    def set_variable(self, channel_id: str, variable: str, value: str, report: bool = False) -> Deferred[None]:
        if channel_id not in self.channels:
            self.requests.append(("set_variable", channel_id, variable, value))
            return fail(ARINotFound(404, "POST", f"/channels/{channel_id}/variable", "Channel not found"))
        self.channels[channel_id][variable] = value
        return self._record("set_variable", channel_id, variable, value)

    def get_channel(self, channel_id: str) -> Deferred[dict[str, Any]]:
        if channel_id not in self.channels:
            self.requests.append(("get_channel", channel_id))
            return fail(ARINotFound(404, "GET", f"/channels/{channel_id}", "Channel not found"))
        return self._record("get_channel", channel_id, result=channel_json(channel_id))

    def answer(self, channel_id: str) -> Deferred[None]:
        if channel_id not in self.channels:
            self.requests.append(("answer", channel_id))
            return fail(ARINotFound(404, "POST", f"/channels/{channel_id}/answer", "Channel not found"))
        return self._record("answer", channel_id)

    def create_bridge(self, bridge_id: str, bridge_type: str = "mixing", name: str | None = None) -> Deferred[Any]:
        self.bridges[bridge_id] = []
        return self._record("create_bridge", bridge_id, bridge_type, result={"id": bridge_id})

    def external_media(self, **kwargs: Any) -> Deferred[dict[str, Any]]:
        channel_id = kwargs["channel_id"]
        self.channels[channel_id] = {}
        peer = self.peers[channel_id] = ("10.0.0.5", 14000 + 2 * len(self.peers))  # even ports, one per channel
        variables = {"UNICASTRTP_LOCAL_ADDRESS": peer[0], "UNICASTRTP_LOCAL_PORT": str(peer[1])}
        return self._record("external_media", kwargs, result={"id": channel_id, "channelvars": variables})

    def add_channel(self, bridge_id: str, channel_ids: list[str], absorb_dtmf: bool = False) -> Deferred[None]:
        for channel_id in channel_ids:
            if channel_id not in self.in_stasis:
                self.requests.append(("add_channel", bridge_id, list(channel_ids), absorb_dtmf))
                return fail(ARIUnprocessable(422, "POST", f"/bridges/{bridge_id}/addChannel",
                                             "Channel not in Stasis application"))
        self.bridges[bridge_id].extend(channel_ids)
        return self._record("add_channel", bridge_id, list(channel_ids), absorb_dtmf)

    def play(self, channel_id: str, media: str, playback_id: str | None = None, lang: str | None = None,
             offset_ms: int | None = None) -> Any:
        self.playbacks[playback_id or "x"] = media
        if offset_ms:
            self.offsets[playback_id or "x"] = offset_ms
        return self._record("play", channel_id, media, playback_id, result={"id": playback_id})

    def get_playback(self, playback_id: str) -> Deferred[dict[str, Any]]:
        if playback_id not in self.playbacks:
            self.requests.append(("get_playback", playback_id))
            return fail(ARINotFound(404, "GET", f"/playbacks/{playback_id}", "Playback not found"))
        return self._record("get_playback", playback_id, result={"id": playback_id, "state": "playing"})

    def stop_playback(self, playback_id: str) -> Deferred[None]:
        self.playbacks.pop(playback_id, None)
        return self._record("stop_playback", playback_id)

    def hangup(self, channel_id: str, reason: str = "normal") -> Deferred[None]:
        self.requests.append(("hangup", channel_id))
        if channel_id not in self.channels:
            return fail(ARINotFound(404, "DELETE", f"/channels/{channel_id}", "Channel not found"))
        del self.channels[channel_id]
        self.in_stasis.discard(channel_id)
        for members in self.bridges.values():
            if channel_id in members:
                members.remove(channel_id)
        return succeed(None)

    def destroy_bridge(self, bridge_id: str) -> Deferred[None]:
        self.requests.append(("destroy_bridge", bridge_id))
        if self.bridges.pop(bridge_id, None) is None:
            return fail(ARINotFound(404, "DELETE", f"/bridges/{bridge_id}", "Bridge not found"))
        return succeed(None)

    def continue_in_dialplan(self, channel_id: str, context: str | None = None, extension: str | None = None,
                             priority: int | None = None, label: str | None = None) -> Deferred[None]:
        self.in_stasis.discard(channel_id)
        self.channels.pop(channel_id, None)  # it left our app: for us it is gone
        return self._record("continue_in_dialplan", channel_id, context, extension, priority)
