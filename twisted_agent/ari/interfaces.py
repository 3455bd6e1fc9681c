"""The seams between the call engine and ARI: REST operations and the stream of events.

Fakes (the simulator, call-engine tests) provide these too and are checked with ``verifyObject``.
Every REST method returns a cancellable ``Deferred`` that fails with an
:class:`~twisted_agent.ari.errors.ARIError` subclass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from twisted_agent.ari.events import Event
from twisted_agent.status import ComponentStatus


class IARIClient(Interface):
    """ARI REST, the operations the engine uses (PROTOCOLS.md §1.6)."""

    def get_info() -> Deferred[dict[str, Any]]:
        """GET /asterisk/info."""

    def answer(channel_id: str) -> Deferred[None]:
        """POST /channels/{id}/answer."""

    def hangup(channel_id: str, reason: str = "normal") -> Deferred[None]:
        """DELETE /channels/{id}?reason=..."""

    def get_channel(channel_id: str) -> Deferred[dict[str, Any]]:
        """GET /channels/{id}: the Channel JSON."""

    def list_channels() -> Deferred[list[dict[str, Any]]]:
        """GET /channels."""

    def get_variable(channel_id: str, variable: str) -> Deferred[str | None]:
        """GET /channels/{id}/variable: the value, or None if the channel exists but the variable does not."""

    def set_variable(channel_id: str, variable: str, value: str, report: bool = False) -> Deferred[None]:
        """POST /channels/{id}/variable; ``report``: Asterisk sends ChannelVarset to the channel's app."""

    def external_media(
        *,
        app: str,
        channel_id: str,
        external_host: str,
        format: str,
        encapsulation: str = "rtp",
        transport: str = "udp",
        connection_type: str = "client",
        direction: str = "both",
        data: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """POST /channels/externalMedia: the new Channel JSON, including ``channelvars``."""

    def continue_in_dialplan(
        channel_id: str,
        context: str | None = None,
        extension: str | None = None,
        priority: int | None = None,
        label: str | None = None,
    ) -> Deferred[None]:
        """POST /channels/{id}/continue: the channel leaves Stasis for the dialplan."""

    def redirect(channel_id: str, endpoint: str) -> Deferred[None]:
        """POST /channels/{id}/redirect."""

    def create_bridge(bridge_id: str, bridge_type: str = "mixing", name: str | None = None) -> Deferred[dict[str, Any]]:
        """POST /bridges?type=...&bridgeId=...: the Bridge JSON."""

    def add_channel(bridge_id: str, channel_ids: Sequence[str], absorb_dtmf: bool = False) -> Deferred[None]:
        """POST /bridges/{id}/addChannel?channel=a,b (&absorbDTMF=true: their keys stay out of the bridge)."""

    def remove_channel(bridge_id: str, channel_id: str) -> Deferred[None]:
        """POST /bridges/{id}/removeChannel."""

    def destroy_bridge(bridge_id: str) -> Deferred[None]:
        """DELETE /bridges/{id}."""

    def list_bridges() -> Deferred[list[dict[str, Any]]]:
        """GET /bridges."""

    def play(
        channel_id: str, media: str | Sequence[str], playback_id: str | None = None, lang: str | None = None,
        offset_ms: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """POST /channels/{id}/play (or /play/{playbackId}): the Playback JSON. ``offset_ms``: start the
        first item that far in."""

    def stop_playback(playback_id: str) -> Deferred[None]:
        """DELETE /playbacks/{id}."""

    def get_playback(playback_id: str) -> Deferred[dict[str, Any]]:
        """GET /playbacks/{id}: the Playback (404 once it has finished)."""

    def send_dtmf(channel_id: str, dtmf: str) -> Deferred[None]:
        """POST /channels/{id}/dtmf."""


class IARIEvents(Interface):
    """The ARI events stream: typed events to listeners, and whether it is connected."""

    connected = Attribute("True while the events WebSocket is upgraded and open")

    def add_listener(listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` with each parsed event, in order received."""

    def remove_listener(listener: Callable[[Event], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""

    def status() -> ComponentStatus:
        """The connection's state for /health; must not block and must not raise."""
