"""Asterisk's side of an ExternalMedia RTP leg (chan_rtp + res_rtp_asterisk, PROTOCOLS §1.7, §6).

Sending: one random SSRC and first sequence number per channel, the timestamp starting at the
first frame's sample count (160 for μ-law) and following the wall clock across pauses, marker
never set, packets sent to exactly ``external_host`` from the channel's own even port.

Receiving follows strict RTP (:class:`StrictRtp`), then Asterisk's static payload table: a
payload type above 34 is dropped silently, 0/8 are G.711 and 10/11 are 8 kHz big-endian L16.
"""

from __future__ import annotations

import random
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from twisted_agent.media import rtp
from twisted_agent.media.codecs import PayloadFormat, StreamResampler, payload_format
from twisted_agent.media.interfaces import SAMPLE_RATE

__all__ = ["LAST_STATIC_PT", "MAX_TIMESTAMP_SKEW", "LegHost", "RtpLeg", "StrictRtp"]

#: AST_RTP_PT_LAST_STATIC: above this, a payload type needs SDP, which chan_rtp never has
LAST_STATIC_PT = 34
#: res_rtp_asterisk.c: a timestamp this far (in samples) from the prediction follows the clock instead
MAX_TIMESTAMP_SKEW = 640

Address = tuple[str, int]


class LegHost(Protocol):
    """What a media leg tells the simulated PBX."""

    def media_audio(self, channel_id: str, pcm: bytes, label: str) -> None:
        """8 kHz s16le audio that arrived from the agent on this leg."""

    def media_hangup(self, channel_id: str) -> None:
        """The far end ended the leg (AudioSocket hang-up frame or closed connection)."""


class StrictRtp:
    """Which source addresses a leg accepts (``strictrtp=yes``, res_rtp_asterisk.c).

    The requested target (``external_host``) is accepted at once. Another source is learned after
    :data:`LEARN_MIN_SEQUENTIAL` packets with consecutive sequence numbers, all of which are dropped.
    Once a source is locked, other sources can still be learned for :data:`LOCK_TIMEOUT_S`; after
    that everything but the locked source is dropped for good.
    """

    LEARN_MIN_SEQUENTIAL = 4
    LOCK_TIMEOUT_S = 5.0

    def __init__(self, target: Address) -> None:
        self.target = target
        self.locked: Address | None = None
        self._locked_at = 0.0
        self._learning: Address | None = None
        self._learning_seq = 0
        self._learning_count = 0

    def accept(self, source: Address, sequence: int, now: float) -> bool:
        if source == self.locked:
            return True
        if self.locked is None and source == self.target:
            self._lock(source, now)
            return True
        if self.locked is not None and now - self._locked_at > self.LOCK_TIMEOUT_S:
            return False
        if source == self._learning and sequence == (self._learning_seq + 1) & 0xFFFF:
            self._learning_count += 1
        else:
            self._learning = source
            self._learning_count = 1
        self._learning_seq = sequence
        if self._learning_count >= self.LEARN_MIN_SEQUENTIAL:
            self._lock(source, now)
        return False

    def _lock(self, source: Address, now: float) -> None:
        self.locked = source
        self._locked_at = now
        self._learning = None
        self._learning_count = 0


class RtpLeg(DatagramProtocol):
    """The UDP socket of one UnicastRTP channel."""

    log = Logger()

    def __init__(self, host: LegHost, channel_id: str, fmt: PayloadFormat, remote: Address,
                 rng: random.Random, clock: IReactorTime) -> None:
        self._host = host
        self.channel_id = channel_id
        self.format = fmt
        self.remote = remote
        self._clock = clock
        self.ssrc = rng.getrandbits(32)
        self._sequence = rng.randrange(0x10000)
        self._timestamp = 0
        self._sent_at: float | None = None
        self.strict = StrictRtp(remote)
        self._upsample = StreamResampler(SAMPLE_RATE, fmt.rate) if fmt.rate != SAMPLE_RATE else None
        self.stats = {"sent": 0, "received": 0, "strict_dropped": 0, "pt_dropped": 0, "malformed": 0}

    @property
    def local_port(self) -> int:
        assert self.transport is not None
        return int(self.transport.getHost().port)

    # -- Asterisk -> agent ---------------------------------------------------------------------------

    def send_audio(self, pcm: bytes) -> None:
        if self.transport is None or not pcm:
            return
        if self._upsample is not None:
            pcm = self._upsample.process(pcm)
        samples = len(pcm) // 2
        packet = rtp.header(self.format.payload_type, self._sequence, self._next_timestamp(samples), self.ssrc)
        self._sequence += 1
        self.transport.write(packet + self.format.encode(pcm), self.remote)
        self.stats["sent"] += 1

    def _next_timestamp(self, samples: int) -> int:
        now = self._clock.seconds()
        elapsed = 0 if self._sent_at is None else round((now - self._sent_at) * self.format.rate)
        self._sent_at = now
        predicted = self._timestamp + samples
        by_clock = self._timestamp + elapsed
        self._timestamp = predicted if abs(by_clock - predicted) < MAX_TIMESTAMP_SKEW else by_clock
        return self._timestamp

    def send_dtmf(self, digit: str) -> None:
        """The UnicastRTP technology has no ``send_digit``: DTMF never reaches this leg (§1.7)."""

    # -- agent -> Asterisk ---------------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            packet = rtp.parse(datagram)
        except rtp.RTPError:
            self.stats["malformed"] += 1
            return
        source = (addr[0], int(addr[1]))
        if not self.strict.accept(source, packet.sequence, self._clock.seconds()):
            self.stats["strict_dropped"] += 1
            return
        fmt = payload_format(packet.payload_type) if packet.payload_type <= LAST_STATIC_PT else None
        if fmt is None or fmt.rate != SAMPLE_RATE:
            self.stats["pt_dropped"] += 1
            return
        try:
            pcm = fmt.decode(packet.payload)
        except ValueError:
            self.stats["malformed"] += 1
            return
        self.stats["received"] += 1
        self._host.media_audio(self.channel_id, pcm, "rtp")

    def close(self) -> Deferred[None] | None:
        if self.transport is None:
            return None
        port, self.transport = self.transport, None
        return port.stopListening()
