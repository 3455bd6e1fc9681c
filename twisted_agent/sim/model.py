"""What the simulated Asterisk knows about: channels, bridges and playbacks, and their ARI JSON.

Plain data, no I/O. The JSON shapes follow the ``Channel``, ``Bridge`` and ``Playback`` models
of the 22.10.1 Swagger files (``channels.json``, ``bridges.json``, ``playbacks.json``) and the
fields ``ast_channel_snapshot_to_json`` / ``stasis_app_playback_to_json`` actually emit.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from twisted_agent.sim.caller import SimulatedCaller
    from twisted_agent.sim.control import CommandQueue

__all__ = [
    "CAUSE_TEXT",
    "HANGUP_REASONS",
    "INVALID_STATES",
    "AriError",
    "Bridge",
    "Channel",
    "Ids",
    "MediaLeg",
    "Playback",
    "ari_timestamp",
]

#: Q.850 cause -> ``ast_cause2str`` text, for the causes the simulator produces.
CAUSE_TEXT: dict[int, str] = {
    0: "Unknown",
    1: "Unallocated (unassigned) number",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    21: "Call Rejected",
    26: "Answered elsewhere",
    28: "Invalid number format (incomplete number)",
    31: "Normal, unspecified",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    58: "Bearer capability not available",
    127: "Interworking, unspecified",
}

#: ``DELETE /channels/{id}?reason=`` values (channels.json allowableValues) -> hang-up cause.
HANGUP_REASONS: dict[str, int] = {
    "normal": 16,
    "busy": 17,
    "congestion": 34,
    "no_answer": 19,
    "timeout": 18,
    "rejected": 21,
    "unallocated": 1,
    "normal_unspecified": 31,
    "number_incomplete": 28,
    "codec_mismatch": 58,
    "interworking": 127,
    "failure": 38,
    "answered_elsewhere": 26,
}

#: States in which ``channel_state_invalid`` (resource_channels.c) answers 412.
INVALID_STATES = frozenset({"Down", "Rsrved", "Ringing"})


def ari_timestamp(seconds: float) -> str:
    """``%FT%T.%q%z`` as main/json.c formats it: ``2026-06-25T17:17:12.345+0000`` (no colon)."""
    stamp = datetime.fromtimestamp(seconds, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{stamp.microsecond // 1000:03d}+0000"


class Ids:
    """Identifiers shaped like Asterisk's, drawn from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._counter = rng.randrange(10, 400)
        self.entity_id = ":".join(f"{rng.randrange(256):02x}" for _ in range(6))

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def unique_id(self, now: float) -> str:
        """Channel uniqueid: ``<unix seconds>.<counter>``, e.g. ``1700000000.42``."""
        return f"{int(now)}.{self._next()}"

    def pjsip_name(self, endpoint: str) -> str:
        return f"PJSIP/{endpoint}-{self._next():08x}"

    def pointer(self) -> str:
        """The ``0x…`` suffix chan_rtp gives a UnicastRTP channel (a pointer value)."""
        return f"0x{self._rng.getrandbits(44) | 0x7F0000000000:x}"

    def uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def call_id(self) -> str:
        return f"{self.uuid()}@sim"


class MediaLeg(Protocol):
    """The transport side of an ExternalMedia channel (RTP or AudioSocket)."""

    def send_audio(self, pcm: bytes) -> None:
        """One 20 ms (or shorter, last) frame of 8 kHz s16le the bridge hands this channel."""

    def send_dtmf(self, digit: str) -> None:
        """A DTMF digit the bridge passes to this channel."""

    def close(self) -> Deferred[None] | None:
        """Release sockets (on AudioSocket: close TCP without a hang-up frame); a Deferred if that takes a turn."""


@dataclass
class Channel:
    """One channel: a caller (PJSIP) or an ExternalMedia leg (UnicastRTP, AudioSocket)."""

    id: str
    name: str
    tech: str
    state: str
    app: str
    created: float
    caller_name: str = ""
    caller_number: str = ""
    context: str = "default"
    exten: str = "s"
    priority: int = 1
    app_name: str = "Stasis"
    app_data: str = ""
    protocol_id: str = ""
    language: str = "en"
    format: str = "ulaw"
    variables: dict[str, str] = field(default_factory=dict)
    in_stasis: bool = False
    hanging_up: bool = False
    destroyed: bool = False
    bridge: Bridge | None = None
    #: addChannel options of the current bridge membership
    muted: bool = False
    absorb_dtmf: bool = False
    #: a file is playing while bridged: Asterisk suspends the channel from the bridge
    suspended: bool = False
    leg: MediaLeg | None = None
    caller: SimulatedCaller | None = None
    control: CommandQueue | None = None
    talk_detect: tuple[int, int] | None = None

    @property
    def is_media(self) -> bool:
        return self.leg is not None

    def to_json(self, channelvars: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": self.protocol_id,
            "caller": {"name": self.caller_name, "number": self.caller_number},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {
                "context": self.context,
                "exten": self.exten,
                "priority": self.priority,
                "app_name": self.app_name,
                "app_data": self.app_data,
            },
            "creationtime": ari_timestamp(self.created),
            "language": self.language,
        }
        if channelvars is not None:
            body["channelvars"] = dict(channelvars)
        return body


@dataclass
class Bridge:
    id: str
    bridge_type: str
    name: str
    created: float
    channels: list[Channel] = field(default_factory=list)
    #: apps subscribed to the bridge: every app one of its channels belonged to when it entered
    apps: set[str] = field(default_factory=set)
    destroyed: bool = False

    @property
    def mixing(self) -> bool:
        return self.bridge_type == "mixing"

    def to_json(self) -> dict[str, Any]:
        if self.mixing:
            technology = "simple_bridge" if len(self.channels) <= 2 else "softmix"
        else:
            technology = "holding_bridge"
        return {
            "id": self.id,
            "technology": technology,
            "bridge_type": self.bridge_type,
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": self.name,
            "channels": [channel.id for channel in self.channels],
            "creationtime": ari_timestamp(self.created),
            "video_mode": "talker" if self.mixing else "none",
        }


@dataclass
class Playback:
    """One ``POST …/play``: a list of media URIs played in turn under one id."""

    id: str
    media: list[str]
    target: Channel
    language: str
    state: str = "queued"
    index: int = 0
    #: DELETE while queued: Asterisk's playback_cancel; it finishes "done" when its turn comes
    cancelled: bool = False
    #: DELETE while playing: playback_stop
    stopped: bool = False
    #: ``offsetms``: where the first media item starts (ast_seekstream)
    offset_ms: int = 0

    @property
    def media_uri(self) -> str:
        return self.media[self.index]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "media_uri": self.media_uri}
        if self.index < len(self.media) - 1:
            body["next_media_uri"] = self.media[self.index + 1]
        body.update({"target_uri": f"channel:{self.target.id}", "language": self.language, "state": self.state})
        return body


class AriError(Exception):
    """An ARI REST error: HTTP ``code`` with body ``{"message": message}`` and reason phrase ``reason``."""

    _REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                409: "Conflict", 412: "Precondition Failed", 422: "Unprocessable Entity",
                500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.reason = reason or self._REASONS.get(code, "Error")
