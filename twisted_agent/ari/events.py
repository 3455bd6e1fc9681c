"""Typed ARI events, parsed from the events WebSocket's JSON text frames.

Shapes follow Asterisk 22's ``events.json``/``channels.json`` (PROTOCOLS.md §1.3-1.4). A frame
that is not JSON, has no ``type``, lacks a field the event requires, or has a field of the wrong
type raises :class:`ARIEventError`, whose text names the field; nothing else escapes
:func:`parse_event`. Event types the engine does not use become :class:`UnknownEvent`.

Inside objects (a channel's caller, dialplan, language ...) only the identity fields are required:
Asterisk always sends the rest, but a missing cosmetic field must not cost a call its events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

from twisted_agent.ari.errors import ARIEventError

__all__ = [
    "ARIEvent", "ARIEventError", "ApplicationReplaced", "Bridge", "BridgeDestroyed", "Caller", "Channel",
    "ChannelDestroyed", "ChannelDtmfReceived", "ChannelEnteredBridge", "ChannelHangupRequest", "ChannelLeftBridge",
    "ChannelStateChange", "ChannelTalkingFinished", "ChannelTalkingStarted", "ChannelVarset", "Dial", "Dialplan",
    "Event", "Playback", "PlaybackContinuing", "PlaybackFinished", "PlaybackStarted", "StasisEnd", "StasisStart",
    "UnknownEvent", "ari_timestamp", "parse_ari_timestamp", "parse_event",
]


# --- objects that appear in events ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    name: str = ""
    number: str = ""


@dataclass(frozen=True, slots=True)
class Dialplan:
    context: str = ""
    exten: str = ""
    priority: int = 0
    app_name: str = ""
    app_data: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Channel:
    id: str
    name: str
    state: str
    caller: Caller = Caller()
    connected: Caller = Caller()
    dialplan: Dialplan = Dialplan()
    language: str = ""
    creationtime: str = ""
    #: only when asked for (ExternalMedia's UNICASTRTP_LOCAL_ADDRESS/PORT, ari.conf channelvars)
    channelvars: dict[str, str] = field(default_factory=dict, hash=False)
    accountcode: str = ""
    #: the SIP Call-ID for PJSIP channels ("" before Asterisk 20 or for other technologies)
    protocol_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bridge:
    id: str
    technology: str = ""
    bridge_type: str = ""
    bridge_class: str = ""
    channels: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Playback:
    id: str
    media_uri: str = ""
    #: ``channel:<id>`` or ``bridge:<id>``
    target_uri: str = ""
    #: queued, playing, paused, continuing, done or failed
    state: str = ""
    language: str = ""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ARIEvent:
    """What every event carries (models ``Message`` and ``Event``)."""

    type: str
    application: str = ""
    #: as Asterisk formats it, e.g. ``2026-06-25T17:17:12.345+0000`` (see :func:`parse_ari_timestamp`)
    timestamp: str = ""
    asterisk_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StasisStart(ARIEvent):
    type: str = "StasisStart"
    channel: Channel
    args: tuple[str, ...] = ()
    replace_channel: Channel | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StasisEnd(ARIEvent):
    type: str = "StasisEnd"
    channel: Channel


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelStateChange(ARIEvent):
    type: str = "ChannelStateChange"
    channel: Channel


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelHangupRequest(ARIEvent):
    type: str = "ChannelHangupRequest"
    channel: Channel
    cause: int | None = None
    soft: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelDestroyed(ARIEvent):
    type: str = "ChannelDestroyed"
    channel: Channel
    cause: int
    cause_txt: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelDtmfReceived(ARIEvent):
    type: str = "ChannelDtmfReceived"
    channel: Channel
    digit: str
    duration_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelTalkingStarted(ARIEvent):
    type: str = "ChannelTalkingStarted"
    channel: Channel


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelTalkingFinished(ARIEvent):
    type: str = "ChannelTalkingFinished"
    channel: Channel
    #: milliseconds of talking
    duration: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybackStarted(ARIEvent):
    type: str = "PlaybackStarted"
    playback: Playback


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybackContinuing(ARIEvent):
    type: str = "PlaybackContinuing"
    playback: Playback


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybackFinished(ARIEvent):
    type: str = "PlaybackFinished"
    playback: Playback


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelEnteredBridge(ARIEvent):
    type: str = "ChannelEnteredBridge"
    bridge: Bridge
    #: optional in events.json
    channel: Channel | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelLeftBridge(ARIEvent):
    type: str = "ChannelLeftBridge"
    bridge: Bridge
    channel: Channel


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelVarset(ARIEvent):
    type: str = "ChannelVarset"
    variable: str
    value: str
    #: None for a global variable
    channel: Channel | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeDestroyed(ARIEvent):
    type: str = "BridgeDestroyed"
    bridge: Bridge


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplicationReplaced(ARIEvent):
    """Another WebSocket subscribed this app: this connection no longer gets its events."""

    type: str = "ApplicationReplaced"


@dataclass(frozen=True, slots=True, kw_only=True)
class Dial(ARIEvent):
    type: str = "Dial"
    peer: Channel
    dialstatus: str
    caller: Channel | None = None
    dialstring: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(ARIEvent):
    """Any other message (RecordingStarted, MissingParams, ...), kept as received."""

    raw: dict[str, Any] = field(default_factory=dict, hash=False)


Event: TypeAlias = (
    StasisStart | StasisEnd | ChannelStateChange | ChannelHangupRequest | ChannelDestroyed | ChannelDtmfReceived
    | ChannelTalkingStarted | ChannelTalkingFinished | PlaybackStarted | PlaybackContinuing | PlaybackFinished
    | ChannelEnteredBridge | ChannelLeftBridge | ChannelVarset | BridgeDestroyed | ApplicationReplaced | Dial
    | UnknownEvent
)


# --- timestamps -------------------------------------------------------------------------------


def ari_timestamp(seconds: float) -> str:
    """``seconds`` since the epoch as Asterisk writes event timestamps (``%FT%T.%q%z``, UTC).

    >>> ari_timestamp(1782407832.345)
    '2026-06-25T17:17:12.345+0000'
    """
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def parse_ari_timestamp(text: str) -> float:
    """Seconds since the epoch from an ARI timestamp (any offset, with or without a colon)."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


# --- parsing ----------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Fields:
    """Typed reads from one JSON object; every problem is an ARIEventError naming the field.

    JSON ``null`` counts as absent.
    """

    __slots__ = ("_obj", "_where")

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise ARIEventError(f"{where}: expected an object, got {_kind(obj)}")
        self._obj: dict[Any, Any] = obj
        self._where = where

    def _get(self, key: str, required: bool) -> Any:
        value = self._obj.get(key)
        if value is None and required:
            raise ARIEventError(f"{self._where}.{key}: missing")
        return value

    def _wrong(self, key: str, expected: str, value: Any) -> ARIEventError:
        return ARIEventError(f"{self._where}.{key}: expected {expected}, got {_kind(value)}")

    def text(self, key: str, required: bool = True) -> str:
        value = self._get(key, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        return self.text(key, False) if self._obj.get(key) is not None else None

    def integer(self, key: str, required: bool = True) -> int:
        value = self._get(key, required)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value)
        return value

    def optional_integer(self, key: str) -> int | None:
        return self.integer(key, False) if self._obj.get(key) is not None else None

    def optional_boolean(self, key: str) -> bool | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._wrong(key, "a boolean", value)
        return value

    def texts(self, key: str, required: bool = True) -> tuple[str, ...]:
        value = self._get(key, required)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self._wrong(key, "a list of strings", value)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ARIEventError(f"{self._where}.{key}[{index}]: expected a string, got {_kind(item)}")
        return tuple(value)

    def variables(self, key: str) -> dict[str, str]:
        """A ``{name: value}`` object; scalar values are kept as text (null as "")."""
        value = self._get(key, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._wrong(key, "an object", value)
        result = {}
        for name, item in value.items():
            if isinstance(item, dict | list):
                raise ARIEventError(f"{self._where}.{key}.{name}: expected a string, got {_kind(item)}")
            if item is None:
                result[name] = ""
            elif isinstance(item, bool):
                result[name] = "1" if item else "0"
            else:
                result[name] = str(item)
        return result

    def child(self, key: str) -> _Fields:
        return _Fields(self._get(key, True), f"{self._where}.{key}")

    def optional_child(self, key: str) -> _Fields | None:
        value = self._get(key, False)
        return None if value is None else _Fields(value, f"{self._where}.{key}")

    def base(self, event_type: str) -> dict[str, Any]:
        return {
            "type": event_type,
            "application": self.text("application"),
            "timestamp": self.text("timestamp"),
            "asterisk_id": self.optional_text("asterisk_id"),
        }


def _caller(fields: _Fields | None) -> Caller:
    if fields is None:
        return Caller()
    return Caller(name=fields.text("name", False), number=fields.text("number", False))


def _dialplan(fields: _Fields | None) -> Dialplan:
    if fields is None:
        return Dialplan()
    return Dialplan(
        context=fields.text("context", False),
        exten=fields.text("exten", False),
        priority=fields.integer("priority", False),
        app_name=fields.text("app_name", False),
        app_data=fields.text("app_data", False),
    )


def _channel(fields: _Fields) -> Channel:
    return Channel(
        id=fields.text("id"),
        name=fields.text("name"),
        state=fields.text("state"),
        caller=_caller(fields.optional_child("caller")),
        connected=_caller(fields.optional_child("connected")),
        dialplan=_dialplan(fields.optional_child("dialplan")),
        language=fields.text("language", False),
        creationtime=fields.text("creationtime", False),
        channelvars=fields.variables("channelvars"),
        accountcode=fields.text("accountcode", False),
        protocol_id=fields.text("protocol_id", False),
    )


def _optional_channel(fields: _Fields | None) -> Channel | None:
    return None if fields is None else _channel(fields)


def _bridge(fields: _Fields) -> Bridge:
    return Bridge(
        id=fields.text("id"),
        technology=fields.text("technology", False),
        bridge_type=fields.text("bridge_type", False),
        bridge_class=fields.text("bridge_class", False),
        channels=fields.texts("channels", False),
        name=fields.text("name", False),
    )


def _playback(fields: _Fields) -> Playback:
    return Playback(
        id=fields.text("id"),
        media_uri=fields.text("media_uri", False),
        target_uri=fields.text("target_uri", False),
        state=fields.text("state", False),
        language=fields.text("language", False),
    )


def _stasis_start(f: _Fields, base: dict[str, Any]) -> Event:
    return StasisStart(**base, channel=_channel(f.child("channel")), args=f.texts("args"),
                       replace_channel=_optional_channel(f.optional_child("replace_channel")))


def _hangup_request(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelHangupRequest(**base, channel=_channel(f.child("channel")), cause=f.optional_integer("cause"),
                                soft=f.optional_boolean("soft"))


def _destroyed(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelDestroyed(**base, channel=_channel(f.child("channel")), cause=f.integer("cause"),
                            cause_txt=f.text("cause_txt"))


def _dtmf(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelDtmfReceived(**base, channel=_channel(f.child("channel")), digit=f.text("digit"),
                               duration_ms=f.integer("duration_ms"))


def _talking_finished(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelTalkingFinished(**base, channel=_channel(f.child("channel")), duration=f.integer("duration"))


def _entered_bridge(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelEnteredBridge(**base, bridge=_bridge(f.child("bridge")),
                                channel=_optional_channel(f.optional_child("channel")))


def _left_bridge(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelLeftBridge(**base, bridge=_bridge(f.child("bridge")), channel=_channel(f.child("channel")))


def _varset(f: _Fields, base: dict[str, Any]) -> Event:
    return ChannelVarset(**base, variable=f.text("variable"), value=f.text("value"),
                         channel=_optional_channel(f.optional_child("channel")))


def _dial(f: _Fields, base: dict[str, Any]) -> Event:
    return Dial(**base, peer=_channel(f.child("peer")), dialstatus=f.text("dialstatus"),
                caller=_optional_channel(f.optional_child("caller")), dialstring=f.optional_text("dialstring"))


def _with_channel(cls: Callable[..., Event]) -> Callable[[_Fields, dict[str, Any]], Event]:
    return lambda f, base: cls(**base, channel=_channel(f.child("channel")))


def _with_playback(cls: Callable[..., Event]) -> Callable[[_Fields, dict[str, Any]], Event]:
    return lambda f, base: cls(**base, playback=_playback(f.child("playback")))


_PARSERS: Mapping[str, Callable[[_Fields, dict[str, Any]], Event]] = {
    "StasisStart": _stasis_start,
    "StasisEnd": _with_channel(StasisEnd),
    "ChannelStateChange": _with_channel(ChannelStateChange),
    "ChannelHangupRequest": _hangup_request,
    "ChannelDestroyed": _destroyed,
    "ChannelDtmfReceived": _dtmf,
    "ChannelTalkingStarted": _with_channel(ChannelTalkingStarted),
    "ChannelTalkingFinished": _talking_finished,
    "PlaybackStarted": _with_playback(PlaybackStarted),
    "PlaybackContinuing": _with_playback(PlaybackContinuing),
    "PlaybackFinished": _with_playback(PlaybackFinished),
    "ChannelEnteredBridge": _entered_bridge,
    "ChannelLeftBridge": _left_bridge,
    "ChannelVarset": _varset,
    "BridgeDestroyed": lambda f, base: BridgeDestroyed(**base, bridge=_bridge(f.child("bridge"))),
    "ApplicationReplaced": lambda f, base: ApplicationReplaced(**base),
    "Dial": _dial,
}

#: the event types parsed into their own classes
KNOWN_EVENT_TYPES = frozenset(_PARSERS)


def parse_event(data: Mapping[str, Any] | str | bytes) -> Event:
    """One ARI event from a text frame (or its decoded JSON object).

    Raises :class:`ARIEventError` (and nothing else) when the frame is not a well-formed event.
    """
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ARIEventError(f"not JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise ARIEventError(f"expected a JSON object, got {_kind(data)}")
    obj = dict(data)
    event_type = obj.get("type")
    if event_type is None or event_type == "":
        raise ARIEventError("missing type")
    if not isinstance(event_type, str):
        raise ARIEventError(f"type: expected a string, got {_kind(event_type)}")
    fields = _Fields(obj, event_type)
    parser = _PARSERS.get(event_type)
    if parser is None:
        return UnknownEvent(
            type=event_type,
            application=fields.text("application", False),
            timestamp=fields.text("timestamp", False),
            asterisk_id=fields.optional_text("asterisk_id"),
            raw=obj,
        )
    return parser(fields, fields.base(event_type))
