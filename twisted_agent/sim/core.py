"""The simulated PBX: channels entering and leaving Stasis, bridges, and audio between them.

Everything an ARI application can observe is driven from here: the events (in Asterisk's order,
with Asterisk's small delays between hang-up steps), the channel states, and the audio each
channel hears. The REST layer (:mod:`twisted_agent.sim.routes`) only validates and calls in.

Audio moves in 20 ms frames of 8 kHz s16le. A mixing bridge relays what one member sends to
every other member that is not suspended (a file is playing to it) and not muted; a holding
bridge relays nothing. A caller hears through its :class:`~twisted_agent.sim.heard.HeardTrack`;
an ExternalMedia channel sends to the agent over its RTP or AudioSocket leg.
"""

from __future__ import annotations

import math
import random
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_agent.sim.caller import SimulatedCaller
from twisted_agent.sim.control import CommandQueue, Timers
from twisted_agent.sim.events import EventHub
from twisted_agent.sim.model import CAUSE_TEXT, INVALID_STATES, AriError, Bridge, Channel, Ids, Playback
from twisted_agent.sim.playback import PlaybackEngine
from twisted_agent.sim.talkdetect import parse_setting

__all__ = ["BRIDGE_TYPES", "Pbx"]

BRIDGE_TYPES = frozenset({"mixing", "holding", "dtmf_events", "proxy_media", "video_sfu", "video_single",
                          "sdp_label"})
_TRUE = frozenset({"yes", "true", "y", "t", "1", "on"})


class Pbx:
    """Channels, bridges and playbacks of one simulated Asterisk."""

    log = Logger()

    def __init__(self, reactor: IReactorThreads, timers: Timers, rng: random.Random, ids: Ids, hub: EventHub,
                 *, host: str, media_root: str | None) -> None:
        self.reactor = reactor
        self.timers = timers
        self.rng = rng
        self.ids = ids
        self.hub = hub
        self.host = host
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.callers: list[SimulatedCaller] = []
        self.playback = PlaybackEngine(reactor, timers, media_root, self.emit_for, self._play_frame,
                                       self._set_suspended)
        self._stasis_starts: dict[str, IDelayedCall] = {}
        #: seconds between the externalMedia response and the media channel's StasisStart (tests widen it)
        self.media_stasis_delay_range = (0.002, 0.02)
        self._hangups: dict[str, list[Deferred[None]]] = {}
        self._closing: list[Deferred[None]] = []

    # -- delays measured on a real Asterisk (PROTOCOLS §6) ----------------------------------------------

    def hangup_step(self) -> float:
        """Between two hang-up events: the whole sequence spans a few to ~28 ms."""
        return self.rng.uniform(0.001, 0.009)

    def playback_start_delay(self) -> float:
        """POST play -> PlaybackStarted: 1.3-5.8 ms, median 2.7 ms."""
        return min(0.0058, max(0.0013, math.exp(self.rng.gauss(math.log(0.0027), 0.3))))

    def media_stasis_delay(self) -> float:
        """externalMedia 200 -> the media channel's own StasisStart (it usually comes after the response)."""
        return self.rng.uniform(*self.media_stasis_delay_range)

    # -- events -------------------------------------------------------------------------------------------

    def emit_for(self, channel: Channel, event_type: str, **fields: Any) -> None:
        self.hub.send(channel.app, event_type, **fields)

    def emit_channel(self, channel: Channel, event_type: str, **fields: Any) -> None:
        self.hub.send(channel.app, event_type, **fields, channel=channel.to_json())

    def _emit_bridge(self, bridge: Bridge, event_type: str, channel: Channel | None = None) -> None:
        fields: dict[str, Any] = {"bridge": bridge.to_json()}
        if channel is not None:
            fields["channel"] = channel.to_json()
        self.hub.send(bridge.apps, event_type, **fields)

    # -- looking channels up the way resource_channels.c does -----------------------------------------------

    def channel(self, channel_id: str, message: str = "Channel not found", reason: str = "Not Found") -> Channel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise AriError(404, message, reason)
        return channel

    def control(self, channel_id: str, check_state: bool = True) -> Channel:
        """find_control (+ channel_state_invalid): 404 unknown, 409 not in Stasis, 412 invalid state."""
        channel = self.channel(channel_id)
        if not channel.in_stasis or channel.control is None:
            raise AriError(409, "Channel not in Stasis application")
        if check_state and channel.state in INVALID_STATES:
            raise AriError(412, "Channel in invalid state")
        return channel

    # -- channels -----------------------------------------------------------------------------------------

    def add_channel(self, channel: Channel) -> Channel:
        channel.control = CommandQueue(self.timers)
        self.channels[channel.id] = channel
        return channel

    def new_caller(self, app: str, *, number: str, name: str, variables: dict[str, str], args: tuple[str, ...],
                   idle: str) -> SimulatedCaller:
        now = self.timers.seconds()
        channel = Channel(
            id=self.ids.unique_id(now), name=self.ids.pjsip_name("100"), tech="PJSIP", state="Ring", app=app,
            created=now, caller_name=name, caller_number=number, context="from-external", exten="100",
            priority=2, app_data=",".join((app, *args)), protocol_id=self.ids.call_id(), variables=dict(variables))
        caller = SimulatedCaller(self, channel, idle)
        channel.caller = caller
        self.callers.append(caller)
        self.add_channel(channel)
        if self.hub.owns(app):
            self.enter_stasis(channel, list(args))
        else:
            # app_stasis: "Stasis app '<app>' not registered", STASISSTATUS=FAILED, the dialplan goes on
            self.log.warn("Stasis app '{app}' not registered", app=app)
            channel.variables["STASISSTATUS"] = "FAILED"
            self._to_dialplan(channel, (channel.context, channel.exten, channel.priority + 1), "continued in dialplan")
        return caller

    def enter_stasis(self, channel: Channel, args: list[str]) -> None:
        self._stasis_starts.pop(channel.id, None)
        if channel.destroyed or channel.hanging_up:
            return
        channel.in_stasis = True
        self.emit_channel(channel, "StasisStart", args=args)

    def schedule_stasis_start(self, channel: Channel, args: list[str]) -> None:
        self._stasis_starts[channel.id] = self.timers.later(self.media_stasis_delay(), self.enter_stasis,
                                                            channel, args)

    def answer(self, channel: Channel) -> None:
        if channel.state == "Up":
            return
        channel.state = "Up"
        self.emit_channel(channel, "ChannelStateChange")
        if channel.caller is not None:
            channel.caller.on_answered()

    def hangup(self, channel: Channel, cause: int = 16, *, soft: bool, reason: str) -> Deferred[None]:
        """The hang-up sequence: HangupRequest -> (LeftBridge) -> StasisEnd -> Destroyed, ms apart.

        The Deferred fires once the channel is destroyed; a second request joins the first.
        """
        waiter: Deferred[None] = Deferred()
        if channel.destroyed:
            waiter.callback(None)
            return waiter
        waiters = self._hangups.get(channel.id)
        if waiters is None:
            waiters = self._hangups[channel.id] = []
            if not channel.hanging_up:
                running = Deferred.fromCoroutine(self._hangup(channel, cause, soft, reason))
                running.addErrback(self._hangup_failed, channel)
        waiters.append(waiter)
        return waiter

    def _hangup_failed(self, failure: Failure, channel: Channel) -> None:
        if not failure.check(CancelledError):
            self.log.failure("hang-up of {channel} failed", failure, channel=channel.id)
            self._forget(channel, "simulator error")

    async def _hangup(self, channel: Channel, cause: int, soft: bool, reason: str) -> None:
        channel.hanging_up = True
        pending_start = self._stasis_starts.pop(channel.id, None)
        self.timers.cancel(pending_start)
        was_in_stasis = channel.in_stasis
        fields: dict[str, Any] = {"cause": cause}
        if soft:
            fields["soft"] = True
        if channel.in_stasis:
            self.emit_channel(channel, "ChannelHangupRequest", **fields)
        self.playback.hung_up(channel)
        if channel.control is not None:
            channel.control.close()
        await self.timers.sleep(self.hangup_step())
        if channel.bridge is not None:
            self._leave_bridge(channel)
            await self.timers.sleep(self.hangup_step())
        if channel.in_stasis:
            channel.in_stasis = False
            self.emit_channel(channel, "StasisEnd")
            await self.timers.sleep(self.hangup_step())
        if was_in_stasis:
            self.emit_channel(channel, "ChannelDestroyed", cause=cause, cause_txt=CAUSE_TEXT.get(cause, "Unknown"))
        self._forget(channel, reason)

    def _forget(self, channel: Channel, reason: str) -> None:
        channel.destroyed = True
        self.channels.pop(channel.id, None)
        if channel.control is not None:
            channel.control.close()
        if channel.leg is not None:
            closing = channel.leg.close()
            if closing is not None:
                self._closing = [d for d in self._closing if not d.called] + [closing]
        if channel.caller is not None:
            channel.caller.on_ended(reason)
        for waiter in self._hangups.pop(channel.id, []):
            waiter.callback(None)

    def _exit_stasis(self, channel: Channel) -> None:
        if channel.bridge is not None:
            self._leave_bridge(channel)
        if channel.in_stasis:
            channel.in_stasis = False
            self.emit_channel(channel, "StasisEnd")

    def _to_dialplan(self, channel: Channel, target: tuple[str, str, int], reason: str) -> None:
        """The channel goes back to the dialplan: the simulator stops tracking it (its call is over)."""
        if channel.caller is not None:
            channel.caller.dialplan_continued = True
            channel.caller.continued_to = target
        self._forget(channel, reason)

    def continue_in_dialplan(self, channel: Channel, context: str | None, exten: str | None, priority: int,
                             label: str | None) -> None:
        # ast_ari_channels_continue_in_dialplan: with no context, exten or priority, the next priority
        next_priority = not context and not exten
        if context:
            exten = exten or "s"
        else:
            context, exten = channel.context, exten or channel.exten
        if label:
            if not label.lstrip("-").isdigit():
                raise AriError(404, "Requested label can not be found")
            priority = int(label)
            if priority == 0:
                raise AriError(400, "Requested priority is illegal")
        elif not priority:
            priority = channel.priority + 1 if next_priority else 1
        target = (context, exten, priority)

        def leave() -> None:
            self._exit_stasis(channel)
            self._to_dialplan(channel, target, "continued in dialplan")

        assert channel.control is not None
        channel.control.post(leave)

    def redirect(self, channel: Channel, endpoint: str) -> None:
        tech, separator, resource = endpoint.partition("/")
        if not tech or not separator:
            raise AriError(422, f"Endpoint parameter '{endpoint}' does not contain tech/resource")
        if not resource:
            raise AriError(422, f"No resource provided in endpoint parameter '{endpoint}'")
        if tech.lower() != channel.tech.lower():
            raise AriError(422, f"Endpoint technology '{tech}' does not match channel technology '{channel.tech}'")

        async def leave() -> None:
            if channel.caller is not None:
                channel.caller.redirected_to = endpoint
            channel.hanging_up = True  # the channel is on its way out: a hang-up now just waits for it
            self._exit_stasis(channel)
            await self.timers.sleep(self.hangup_step())
            self.emit_channel(channel, "ChannelDestroyed", cause=16, cause_txt=CAUSE_TEXT[16])
            self._forget(channel, "redirected")

        assert channel.control is not None
        channel.control.post(lambda: Deferred.fromCoroutine(leave()))

    # -- variables ---------------------------------------------------------------------------------------

    def get_variable(self, channel: Channel, name: str) -> str:
        if name.endswith(")"):
            function, _, argument = name[:-1].partition("(")
            values = {
                ("CALLERID", "num"): channel.caller_number, ("CALLERID", "number"): channel.caller_number,
                ("CALLERID", "name"): channel.caller_name,
                ("CALLERID", "all"): f'"{channel.caller_name}" <{channel.caller_number}>',
                ("CHANNEL", "name"): channel.name, ("CHANNEL", "uniqueid"): channel.id,
                ("CHANNEL", "state"): channel.state, ("CHANNEL", "language"): channel.language,
            }
            value = values.get((function.upper(), argument.lower()))
            if value is None:
                raise AriError(500, "Unable to read provided function", "Error With Function")
            return value
        if name not in channel.variables:
            raise AriError(404, "Provided variable was not found", "Variable Not Found")
        return channel.variables[name]

    def set_variable(self, channel: Channel, name: str, value: str, report: bool) -> None:
        if name.endswith(")"):
            function, _, argument = name[:-1].partition("(")
            key = (function.upper(), argument.lower())
            if key == ("TALK_DETECT", "set"):
                settings = parse_setting(value)
                if settings is None:  # Asterisk logs it and answers 204: the write runs on the channel later
                    self.log.warn("Invalid TALK_DETECT(set) value {value!r} on {channel}", value=value,
                                  channel=channel.name)
                else:
                    channel.talk_detect = settings
            elif key == ("TALK_DETECT", "remove"):
                channel.talk_detect = None
            elif key in (("CALLERID", "num"), ("CALLERID", "number")):
                channel.caller_number = value
            elif key == ("CALLERID", "name"):
                channel.caller_name = value
            else:
                raise AriError(400, "Failed to execute function")
        else:
            channel.variables[name] = value
        if report:
            self.emit_channel(channel, "ChannelVarset", variable=name, value=value)

    # -- bridges ---------------------------------------------------------------------------------------

    def create_bridge(self, bridge_id: str | None, types: str | None, name: str | None) -> Bridge:
        bridge_id = bridge_id or self.ids.uuid()
        if bridge_id in self.bridges:
            raise AriError(409, f"Bridge with id '{bridge_id}' already exists")
        requested = {part.strip() for part in (types or "mixing").split(",") if part.strip()}
        if not requested <= BRIDGE_TYPES:
            raise AriError(500, "Unable to create bridge", "Internal Error")
        bridge_type = "holding" if "holding" in requested else "mixing"
        bridge = Bridge(bridge_id, bridge_type, name or "", self.timers.seconds())
        self.bridges[bridge_id] = bridge
        return bridge

    def bridge(self, bridge_id: str) -> Bridge:
        bridge = self.bridges.get(bridge_id)
        if bridge is None:
            raise AriError(404, "Bridge not found", "Not found")
        return bridge

    def bridge_members(self, channel_ids: list[str]) -> list[Channel]:
        """control_list_create (resource_bridges.c): 400 unknown channel, 422 channel not in Stasis."""
        if not channel_ids:
            raise AriError(400, "Missing parameter channel")
        members = []
        for channel_id in channel_ids:
            channel = self.channels.get(channel_id)
            if channel is None:
                raise AriError(400, "Channel not found")
            if not channel.in_stasis or channel.control is None:
                raise AriError(422, "Channel not in Stasis application")
            members.append(channel)
        return members

    def join(self, channel: Channel, bridge: Bridge, *, mute: bool, absorb_dtmf: bool) -> None:
        if bridge.destroyed or channel.hanging_up:
            return
        if channel.bridge is not bridge:
            if channel.bridge is not None:
                self._leave_bridge(channel)
            bridge.channels.append(channel)
            channel.bridge = bridge
            bridge.apps.add(channel.app)
            self._emit_bridge(bridge, "ChannelEnteredBridge", channel)
        channel.muted = mute
        channel.absorb_dtmf = absorb_dtmf

    def leave(self, channel: Channel, bridge: Bridge) -> None:
        if channel.bridge is bridge:
            self._leave_bridge(channel)

    def _leave_bridge(self, channel: Channel) -> None:
        bridge = channel.bridge
        if bridge is None:
            return
        bridge.channels.remove(channel)
        channel.bridge = None
        channel.muted = channel.absorb_dtmf = channel.suspended = False
        self._emit_bridge(bridge, "ChannelLeftBridge", channel)

    def destroy_bridge(self, bridge: Bridge) -> None:
        for channel in list(bridge.channels):
            self._leave_bridge(channel)
        bridge.destroyed = True
        self.bridges.pop(bridge.id, None)
        self._emit_bridge(bridge, "BridgeDestroyed")

    # -- playback ------------------------------------------------------------------------------------------

    def play(self, channel: Channel, media: list[str], playback_id: str | None, language: str | None,
             offset_ms: int = 0) -> Playback:
        playback = Playback(playback_id or self.ids.uuid(), media, channel, language or channel.language,
                            offset_ms=offset_ms)
        self.playback.register(playback)
        assert channel.control is not None
        channel.control.post(lambda: self.playback.run(playback), self.playback_start_delay())
        return playback

    def _set_suspended(self, channel: Channel, suspended: bool) -> None:
        channel.suspended = suspended and channel.bridge is not None

    def _play_frame(self, channel: Channel, position: int, pcm: bytes, label: str) -> None:
        if channel.hanging_up:
            return
        if channel.caller is not None:
            channel.caller.hear_at(position, pcm, label)
        elif channel.leg is not None:
            channel.leg.send_audio(pcm)

    # -- media -------------------------------------------------------------------------------------------

    def caller_audio(self, channel: Channel, pcm: bytes) -> None:
        self._relay(channel, pcm, "caller")

    def media_audio(self, channel_id: str, pcm: bytes, label: str) -> None:
        channel = self.channels.get(channel_id)
        if channel is not None:
            self._relay(channel, pcm, label)

    def _relay(self, source: Channel, pcm: bytes, label: str) -> None:
        bridge = source.bridge
        if bridge is None or not bridge.mixing or source.suspended or source.muted or source.hanging_up:
            return
        for member in bridge.channels:
            if member is source or member.suspended or member.hanging_up:
                continue
            if member.caller is not None:
                member.caller.hear_stream(source.id, pcm, label)
            elif member.leg is not None:
                member.leg.send_audio(pcm)

    def media_hangup(self, channel_id: str) -> None:
        channel = self.channels.get(channel_id)
        if channel is not None and not channel.hanging_up:
            self.hangup(channel, 16, soft=False, reason="media ended")

    def caller_dtmf(self, channel: Channel, digit: str, duration_ms: int) -> None:
        if channel.hanging_up or channel.destroyed:
            return
        if channel.in_stasis:
            self.emit_channel(channel, "ChannelDtmfReceived", digit=digit, duration_ms=duration_ms)
        bridge = channel.bridge
        if bridge is None or channel.absorb_dtmf or channel.suspended:
            return
        for member in bridge.channels:
            if member is channel or member.suspended:
                continue
            if member.leg is not None:
                member.leg.send_dtmf(digit)
            elif member.caller is not None:
                member.caller.dtmf_heard.append(digit)

    def caller_hangup(self, channel: Channel) -> Deferred[None]:
        return self.hangup(channel, 16, soft=False, reason="caller hung up")

    def caller_talking(self, channel: Channel, talking: bool, duration_ms: int) -> None:
        if not channel.in_stasis:
            return
        if talking:
            self.emit_channel(channel, "ChannelTalkingStarted")
        else:
            self.emit_channel(channel, "ChannelTalkingFinished", duration=duration_ms)

    def close(self) -> list[Deferred[None]]:
        """Forget every channel; the Deferreds fire once their sockets are released."""
        self.playback.close()
        for channel in list(self.channels.values()):
            self._forget(channel, "simulator stopped")
        closing, self._closing = [d for d in self._closing if not d.called], []
        return closing


def parse_bool(value: str | None, default: bool = False) -> bool:
    """ast_true: yes, true, y, t, 1, on (case-insensitive)."""
    return default if value is None else value.strip().lower() in _TRUE
