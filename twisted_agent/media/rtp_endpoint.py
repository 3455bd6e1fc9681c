"""RTP over UDP for ExternalMedia: one listening socket, many calls, deterministic routing.

Asterisk sends each call's RTP from the address it reports in the externalMedia response
(``UNICASTRTP_LOCAL_ADDRESS:PORT``) to our ``external_host``, and its strict RTP only accepts our
replies from that same ``external_host`` socket (PROTOCOLS.md §1.7, §6). So the engine binds each
session's peer before audio flows; packets are routed by source address, and replies leave from the
one listening socket. Anything else is counted and dropped, and the first few are logged with what
would have matched — the clue an operator needs when a call has "no audio".
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from twisted_agent.media.codecs import PayloadFormat, payload_format
from twisted_agent.media.interfaces import FRAME_SAMPLES
from twisted_agent.media.jitter import JitterEstimator, ReorderBuffer
from twisted_agent.media.pacer import Pacer
from twisted_agent.media.rtp import RTPError, header, parse
from twisted_agent.media.session import MediaSession, VADFactory

Address = tuple[str, int]

#: PT 13: comfort noise. Not audio to decode; counted apart from unknown payload types.
COMFORT_NOISE = 13
#: consecutive in-order packets from a new SSRC on a call's own peer before we follow it
#: (Asterisk re-SSRCs after some bridge changes; its own strict RTP learning also wants 4)
SSRC_RELATCH_PACKETS = 4
SEND_FORMATS = {"ulaw": 0, "alaw": 8}


class PeerNotAllowed(Exception):
    """The peer address is outside the RTP allow-list."""


class RTPSession(MediaSession):
    transport = "rtp"

    def __init__(self, call_id: str, router: RTPRouter, pacer: Pacer, detector_factory: VADFactory,
                 codec: str = "ulaw", reorder_depth: int = 2, rng: random.Random | None = None) -> None:
        super().__init__(call_id, pacer, detector_factory)
        self._router = router
        self.peer: Address | None = None
        send_format = payload_format(SEND_FORMATS[codec])
        assert send_format is not None
        self._send_format: PayloadFormat = send_format
        rng = rng or random.SystemRandom()
        self._ssrc_out = rng.getrandbits(32)
        self._seq_out = rng.getrandbits(16)
        self._ts_base = rng.getrandbits(32)
        self._ssrc_in: int | None = None
        self._candidate_ssrc: int | None = None
        self._candidate_run = 0
        self._candidate_seq = 0
        self._reorder: ReorderBuffer[Any] = ReorderBuffer(reorder_depth)
        self._jitter: JitterEstimator | None = None
        self._jitter_rate = 0
        self.packets_in = self.bytes_in = 0
        self.packets_out = self.bytes_out = 0
        self.malformed = self.unknown_payload = self.comfort_noise = 0
        self.foreign_ssrc = self.ssrc_changes = 0
        self.send_errors = 0

    def bind_peer(self, host: str, port: int) -> None:
        """Asterisk's side of this call: ``UNICASTRTP_LOCAL_ADDRESS:PORT`` from externalMedia."""
        self._router.bind(self, (host, port))

    # --- inbound --------------------------------------------------------------------------------

    def datagram(self, data: bytes, now: float) -> None:
        self.packets_in += 1
        self.bytes_in += len(data)
        try:
            packet = parse(data)
        except RTPError:
            self.malformed += 1
            return
        ssrc = packet.ssrc
        if ssrc != self._ssrc_in:
            if self._ssrc_in is None:
                self._ssrc_in = ssrc
            elif not self._follow_new_ssrc(packet):
                return
        fmt = payload_format(packet.payload_type)
        if fmt is None:
            if packet.payload_type == COMFORT_NOISE:
                self.comfort_noise += 1
            else:
                self.unknown_payload += 1
            return
        jitter = self._jitter
        if jitter is None or self._jitter_rate != fmt.rate:
            jitter = self._jitter = JitterEstimator(fmt.rate)
            self._jitter_rate = fmt.rate
        jitter.update(packet.timestamp, now)
        for ready in self._reorder.push(packet.sequence, packet, now):
            self._deliver_packet(ready, now)

    def _follow_new_ssrc(self, packet: Any) -> bool:
        """A different SSRC from this call's own peer: drop it, unless it persists in order."""
        self.foreign_ssrc += 1
        if packet.ssrc == self._candidate_ssrc and packet.sequence == (self._candidate_seq + 1) & 0xFFFF:
            self._candidate_run += 1
        else:
            self._candidate_ssrc = packet.ssrc
            self._candidate_run = 1
        self._candidate_seq = packet.sequence
        if self._candidate_run < SSRC_RELATCH_PACKETS:
            return False
        self.log.info("call {call_id}: RTP source changed SSRC {old:08x} -> {new:08x}; following it",
                      call_id=self.call_id, old=self._ssrc_in, new=packet.ssrc)
        self.ssrc_changes += 1
        self.foreign_ssrc -= 1  # this packet is the new stream's
        self._ssrc_in = packet.ssrc
        self._candidate_ssrc = None
        self._reorder.reset()
        if self._jitter is not None:
            self._jitter.reset()
        return True

    def _deliver_packet(self, packet: Any, now: float) -> None:
        fmt = payload_format(packet.payload_type)
        assert fmt is not None
        self._deliver_pcm(fmt.decode(packet.payload), fmt.rate, now)

    def _tick_inbound(self, now: float) -> None:
        if self._reorder.held:
            for ready in self._reorder.tick(now):
                self._deliver_packet(ready, now)

    # --- outbound -------------------------------------------------------------------------------

    def _send_frame(self, frame: bytes, marker: bool, index: int) -> bool:
        peer = self.peer
        if peer is None:
            return False
        fmt = self._send_format
        # the timestamp follows the pacer's clock, so it keeps advancing across silences
        packet = header(fmt.payload_type, self._seq_out, self._ts_base + index * FRAME_SAMPLES, self._ssrc_out,
                        marker) + fmt.encode(frame)
        self._seq_out = (self._seq_out + 1) & 0xFFFF
        if self._router.send(packet, peer):
            self.packets_out += 1
            self.bytes_out += len(packet)
            return True
        self.send_errors += 1
        return False

    def _release(self) -> None:
        self._router.unregister(self)

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        reorder = self._reorder
        stats.update({
            "peer": f"{self.peer[0]}:{self.peer[1]}" if self.peer else None,
            "ssrc_in": self._ssrc_in, "ssrc_out": self._ssrc_out,
            "packets_in": self.packets_in, "bytes_in": self.bytes_in,
            "packets_out": self.packets_out, "bytes_out": self.bytes_out,
            "lost": reorder.lost, "late": reorder.late, "reordered": reorder.reordered,
            "duplicates": reorder.duplicates, "malformed": self.malformed,
            "unknown_payload": self.unknown_payload, "comfort_noise": self.comfort_noise,
            "foreign_ssrc": self.foreign_ssrc, "ssrc_changes": self.ssrc_changes,
            "send_errors": self.send_errors,
            "jitter_ms": round(self._jitter.jitter_ms, 3) if self._jitter else 0.0,
        })
        return stats


class RTPRouter:
    """Routes datagrams to sessions by source address; plain logic, no sockets."""

    log = Logger()
    #: how many unroutable packets per source get a log line (then they are only counted)
    LOGGED_PER_SOURCE = 3

    def __init__(self, clock: IReactorTime, send: Callable[[bytes, Address], None],
                 allowed: Iterable[str] = ()) -> None:
        self._clock = clock
        self._send = send
        self._allowed = [ipaddress.ip_network(a, strict=False) for a in allowed]
        self._by_peer: dict[Address, RTPSession] = {}
        self._sessions: set[RTPSession] = set()
        self._logged: dict[str, int] = {}
        self.packets = 0
        self.foreign = 0
        self.disallowed = 0
        self.send_errors = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def register(self, session: RTPSession) -> None:
        self._sessions.add(session)

    def allows(self, host: str) -> bool:
        if not self._allowed:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._allowed)

    def bind(self, session: RTPSession, peer: Address) -> None:
        host, port = peer
        peer = (str(ipaddress.ip_address(host)), int(port))
        if not self.allows(peer[0]):
            raise PeerNotAllowed(f"{peer[0]} is not in RTP_ALLOWED_HOSTS")
        other = self._by_peer.get(peer)
        if other is not None and other is not session:
            raise ValueError(f"RTP peer {peer[0]}:{peer[1]} is already bound to call {other.call_id}")
        if session.peer is not None:
            self._by_peer.pop(session.peer, None)
        self._by_peer[peer] = session
        session.peer = peer
        session.bound = True

    def unregister(self, session: RTPSession) -> None:
        self._sessions.discard(session)
        if session.peer is not None and self._by_peer.get(session.peer) is session:
            del self._by_peer[session.peer]

    def datagram(self, data: bytes, source: Address) -> None:
        self.packets += 1
        session = self._by_peer.get(source)
        if session is not None:
            session.datagram(data, self._clock.seconds())
            return
        if self._allowed and not self.allows(source[0]):
            self.disallowed += 1
            reason = "not in RTP_ALLOWED_HOSTS"
        else:
            self.foreign += 1
            reason = "matches no call"
        self._log_unroutable(source, reason)

    def _log_unroutable(self, source: Address, reason: str) -> None:
        key = source[0]
        seen = self._logged.get(key, 0)
        if seen >= self.LOGGED_PER_SOURCE:
            return
        if len(self._logged) > 1024:  # a scan of many sources must not grow this without bound
            self._logged.clear()
        self._logged[key] = seen + 1
        peers = ", ".join(f"{h}:{p}" for h, p in list(self._by_peer)[:5]) or "none bound"
        self.log.warn("RTP from {source} dropped: {reason} (calls' peers: {peers})",
                      source=f"{source[0]}:{source[1]}", reason=reason, peers=peers)

    def send(self, data: bytes, peer: Address) -> bool:
        try:
            self._send(data, peer)
            return True
        except OSError as e:
            self.send_errors += 1
            if self.send_errors <= 3 or self.send_errors % 1000 == 0:
                self.log.warn("RTP send to {peer} failed: {error}", peer=f"{peer[0]}:{peer[1]}",
                              error=os.strerror(e.errno) if e.errno else str(e))
            return False

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "bound": len(self._by_peer), "packets": self.packets,
                "foreign": self.foreign, "disallowed": self.disallowed, "send_errors": self.send_errors}


class RTPEndpoint(DatagramProtocol):
    """The UDP socket: hands datagrams to the router, sends what sessions give it."""

    noisy = False

    def __init__(self, router_factory: Callable[[Callable[[bytes, Address], None]], RTPRouter]) -> None:
        self.router = router_factory(self._write)

    def _write(self, data: bytes, peer: Address) -> None:
        if self.transport is None:
            raise OSError(0, "RTP socket is not open")
        self.transport.write(data, peer)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.router.datagram(datagram, addr)
