"""``POST /channels/externalMedia``: validation as resource_channels.c does it, then the leg itself.

The checks and their answers (PROTOCOLS §1.7, §6): ``app`` and ``format`` are required (400);
``external_host`` is required (400) and must be ``<host>:<port>`` (400), with an IP literal for a
host (a name fails to resolve: 500); ``direction`` is both/in/out (400); encapsulation and
transport must pair as rtp+udp or audiosocket+tcp (400 for a wrong transport, 501 for an
unknown encapsulation); AudioSocket needs ``data`` (400). An unknown format name such as
``slin8`` makes the channel request fail (500).

The simulator implements RTP (ulaw, alaw, slin, slin16) and AudioSocket (slin, slin16, and
ulaw/alaw with Asterisk's mislabelling bug). chan_websocket (``encapsulation=none``,
``transport=websocket``) and codecs it cannot produce (g722, opus, …) answer 501: a real
Asterisk would accept them, so a test that needs them must not pass silently.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory

from twisted_agent.media.codecs import FORMATS_BY_NAME
from twisted_agent.sim.audiosocket import AUDIOSOCKET_FORMATS, AudioSocketLeg
from twisted_agent.sim.core import Pbx
from twisted_agent.sim.model import AriError, Channel
from twisted_agent.sim.rtp import RtpLeg

__all__ = ["ASTERISK_FORMATS", "RTP_PORT_RANGE", "create_external_media", "parse_host_port"]

#: Format names ast_format_cache_get knows in Asterisk 22 (anything else fails the channel request).
ASTERISK_FORMATS = frozenset({
    "g723", "gsm", "ulaw", "alaw", "g726", "g726aal2", "adpcm", "slin", "slin12", "slin16", "slin24", "slin32",
    "slin44", "slin48", "slin96", "slin192", "lpc10", "g729", "speex", "speex16", "speex32", "ilbc", "g722",
    "siren7", "siren14", "testlaw", "g719", "opus", "codec2", "none", "silk8", "silk12", "silk16", "silk24",
})

#: rtp.conf defaults: Asterisk picks an even port in this range for each RTP instance
RTP_PORT_RANGE = (10000, 20000)
_PORT_ATTEMPTS = 50
_CONNECT_TIMEOUT_S = 2


def parse_host_port(value: str) -> tuple[str, int]:
    """``1.2.3.4:5000`` or ``[::1]:5000`` -> (host, port); 400 without a valid port."""
    message = "external_host must be <host>:<port> for channels of type rtp and audiosocket"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AriError(400, message)
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise AriError(400, message)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AriError(400, message)
    return host, int(port_text)


def _resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        # Asterisk resolves names here; on the test box this failed (500) and IP literals are the rule
        raise AriError(500, "Unable to resolve host") from None


def _validate(params: dict[str, str | None]) -> tuple[str, str, str, str]:
    app = params.get("app")
    if not app:
        raise AriError(400, "app cannot be empty")
    encapsulation = params.get("encapsulation") or "rtp"
    transport = params.get("transport") or "udp"
    connection_type = params.get("connection_type") or "client"
    websocket_server = transport == "websocket" and connection_type == "server"
    if not params.get("external_host") and not websocket_server:
        raise AriError(400, "external_host is required for all but websocket server connections")
    fmt = params.get("format")
    if not fmt:
        raise AriError(400, "format cannot be empty")
    if (params.get("direction") or "both") not in ("both", "in", "out"):
        raise AriError(400, "Invalid direction specified")
    if connection_type not in ("client", "server"):
        raise AriError(400, "connection_type must be client or server")
    if connection_type == "server" and transport != "websocket":
        raise AriError(400, "connection_type server is only valid for the websocket transport")
    pairs = {"rtp": "udp", "audiosocket": "tcp", "none": "websocket"}
    if encapsulation not in pairs:
        raise AriError(501, "The encapsulation and/or transport is not supported")
    if transport != pairs[encapsulation]:
        raise AriError(400, f"encapsulation {encapsulation} requires transport {pairs[encapsulation]}")
    if encapsulation == "none":
        raise AriError(501, "The simulator does not implement chan_websocket (encapsulation=none)")
    if encapsulation == "audiosocket" and not params.get("data"):
        raise AriError(400, "data can not be empty")
    return app, encapsulation, fmt, params["external_host"] or ""


async def create_external_media(pbx: Pbx, params: dict[str, str | None], variables: dict[str, str]) -> dict[str, Any]:
    """Create the UnicastRTP or AudioSocket channel; its StasisStart follows the response."""
    app, encapsulation, fmt, external_host = _validate(params)
    channel_id = params.get("channelId")
    if channel_id and channel_id in pbx.channels:
        raise AriError(409, "Channel with given unique ID already exists")
    host, port = parse_host_port(external_host)
    address = _resolve(host)
    if fmt not in ASTERISK_FORMATS:
        raise AriError(500, "Failed to create external media channel", "Internal Server Error")
    supported = FORMATS_BY_NAME if encapsulation == "rtp" else AUDIOSOCKET_FORMATS
    if fmt not in supported:
        raise AriError(501, f"The simulator does not implement format {fmt} over {encapsulation}")
    data = params.get("data")
    # a real Asterisk answered in 1-4 ms (§6)
    await pbx.timers.sleep(pbx.rng.uniform(0.001, 0.004))
    now = pbx.timers.seconds()
    channel = Channel(id=channel_id or pbx.ids.unique_id(now), name="", tech="", state="Up", app=app, created=now,
                      app_data=",".join(filter(None, (app, data))), format=fmt, variables=dict(variables))
    channelvars: dict[str, str] | None = None
    if encapsulation == "rtp":
        leg = _rtp_leg(pbx, channel, fmt, (address, port))
        channel.tech, channel.name = "UnicastRTP", f"UnicastRTP/{external_host}-{pbx.ids.pointer()}"
        channelvars = {"UNICASTRTP_LOCAL_ADDRESS": pbx.host, "UNICASTRTP_LOCAL_PORT": str(leg.local_port)}
        channel.variables.update(channelvars)
        channel.leg = leg
    else:
        assert data is not None
        try:
            call_uuid = uuid.UUID(data)
        except ValueError:
            raise AriError(500, "Failed to create audiosocket channel: invalid UUID in data") from None
        channel.leg = await _audiosocket_leg(pbx, channel, fmt, address, port, call_uuid)
        channel.tech, channel.name = "AudioSocket", f"AudioSocket/{external_host}-{call_uuid}"
        channel.variables["AUDIOSOCKET_UUID"] = str(call_uuid)
    if channel.id in pbx.channels:  # assigned while the AudioSocket connected
        channel.leg.close()
        raise AriError(409, "Channel with given unique ID already exists")
    pbx.add_channel(channel)
    pbx.schedule_stasis_start(channel, [data] if data else [])
    return channel.to_json(channelvars)


def _rtp_leg(pbx: Pbx, channel: Channel, fmt: str, remote: tuple[str, int]) -> RtpLeg:
    leg = RtpLeg(pbx, channel.id, FORMATS_BY_NAME[fmt], remote, pbx.rng, pbx.timers.clock)
    low, high = RTP_PORT_RANGE
    for _ in range(_PORT_ATTEMPTS):
        port = pbx.rng.randrange(low, high, 2)
        try:
            pbx.reactor.listenUDP(port, leg, interface=pbx.host)  # type: ignore[attr-defined]
        except CannotListenError:
            continue
        return leg
    raise AriError(500, "Failed to create external media channel: no free RTP port", "Internal Server Error")


async def _audiosocket_leg(pbx: Pbx, channel: Channel, fmt: str, address: str, port: int,
                           call_uuid: uuid.UUID) -> AudioSocketLeg:
    leg = AudioSocketLeg(pbx, channel.id, fmt, call_uuid)
    endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint = endpoint_type(pbx.reactor, address, port, timeout=_CONNECT_TIMEOUT_S)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: leg))
    except Exception as error:
        pbx.log.warn("AudioSocket connection to {address}:{port} failed: {error}", address=address, port=port,
                     error=error)
        raise AriError(500, "Failed to create audiosocket channel", "Internal Server Error") from None
    return leg
