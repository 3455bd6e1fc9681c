"""Asterisk's side of an ExternalMedia AudioSocket leg (chan_audiosocket, PROTOCOLS §1.7, §6).

Asterisk is the TCP client: it connects to ``external_host`` while the externalMedia POST is being
answered, sends the UUID frame at once, then audio frames of the kind that matches the channel
format (slin -> 0x10 with 320 bytes, slin16 -> 0x12 with 640 bytes, little-endian). Audio frames
from the agent are played to the caller; a hang-up frame (0x00), a frame Asterisk does not
expect, or a closed connection ends the channel. When the channel ends, Asterisk closes TCP
without sending a hang-up frame.

``format=ulaw`` reproduces Asterisk's bug: μ-law bytes go out labelled 0x10 (slin), and what comes
back as 0x10 is read as slin, so μ-law sent back is heard as noise.
"""

from __future__ import annotations

import struct
import uuid

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_agent.media import audiosocket_framing as framing
from twisted_agent.media.codecs import FORMATS_BY_NAME, StreamResampler, resample
from twisted_agent.media.interfaces import SAMPLE_RATE
from twisted_agent.sim.rtp import LegHost

__all__ = ["AUDIOSOCKET_FORMATS", "AudioSocketLeg"]

#: channel format -> (audio kind Asterisk labels frames with, sample rate of the PCM it carries)
AUDIOSOCKET_FORMATS: dict[str, tuple[int, int]] = {
    "slin": (framing.AUDIO_SLIN, 8000),
    "slin16": (framing.AUDIO_SLIN16, 16000),
    "ulaw": (framing.AUDIO_SLIN, 8000),
    "alaw": (framing.AUDIO_SLIN, 8000),
}

_HEADER = struct.Struct(">BH")


class AudioSocketLeg(Protocol):
    """The TCP connection of one AudioSocket channel, Asterisk being the client."""

    log = Logger()

    def __init__(self, host: LegHost, channel_id: str, format_name: str, call_uuid: uuid.UUID) -> None:
        self._host = host
        self.channel_id = channel_id
        self.format_name = format_name
        self.call_uuid = call_uuid
        self.kind, self.rate = AUDIOSOCKET_FORMATS[format_name]
        self._decoder = framing.AudioSocketDecoder()
        self._upsample = StreamResampler(SAMPLE_RATE, self.rate) if self.rate != SAMPLE_RATE else None
        self._downsample: dict[int, StreamResampler] = {}
        self._closing = False
        self.stats = {"sent": 0, "received": 0}

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        assert self.transport is not None
        self.transport.write(framing.uuid_frame(self.call_uuid))

    # -- Asterisk -> agent ---------------------------------------------------------------------------

    def send_audio(self, pcm: bytes) -> None:
        if self.transport is None or self._closing or not pcm:
            return
        if self.format_name in ("ulaw", "alaw"):
            payload = FORMATS_BY_NAME[self.format_name].encode(pcm)
            # built by hand: the project's encoder rightly refuses an odd-length "slin" payload
            self.transport.write(_HEADER.pack(self.kind, len(payload)) + payload)
        else:
            if self._upsample is not None:
                pcm = self._upsample.process(pcm)
            self.transport.write(framing.encode_frame(self.kind, pcm))
        self.stats["sent"] += 1

    def send_dtmf(self, digit: str) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(framing.dtmf_frame(digit))

    # -- agent -> Asterisk ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except framing.AudioSocketError as error:
            self.log.info("AudioSocket {uuid}: {error}; hanging up", uuid=self.call_uuid, error=error)
            self._handle(error.frames)
            self._end()
            return
        self._handle(frames)

    def _handle(self, frames: list[tuple[int, bytes]]) -> None:
        for kind, payload in frames:
            if self._closing:
                return
            rate = framing.AUDIO_RATES.get(kind)
            if rate is None:
                # 0x00 from the agent, or a kind Asterisk only sends (UUID, DTMF, error): the read ends
                self._end()
                return
            self.stats["received"] += 1
            self._host.media_audio(self.channel_id, self._to_8k(payload, rate), "audiosocket")

    def _to_8k(self, pcm: bytes, rate: int) -> bytes:
        if rate == SAMPLE_RATE:
            return pcm
        if rate % SAMPLE_RATE == 0:
            resampler = self._downsample.setdefault(rate, StreamResampler(rate, SAMPLE_RATE))
            return resampler.process(pcm)
        return resample(pcm, rate, SAMPLE_RATE)

    def _end(self) -> None:
        if not self._closing:
            self._closing = True
            self._host.media_hangup(self.channel_id)
            self.close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._closing:
            self._closing = True
            self._host.media_hangup(self.channel_id)

    def close(self) -> None:
        """Hang-up on Asterisk's side: close TCP, no hang-up frame (§6)."""
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()
        return None
