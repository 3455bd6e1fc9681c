"""The seams of the media plane.

The call engine sees one :class:`IMediaSession` per call, whatever carries it (RTP via
ExternalMedia or AudioSocket over TCP), and gives it one :class:`IMediaConsumer` to hear from.

Audio crossing these seams is always 20 ms frames of 8 kHz, 16-bit, little-endian, mono PCM:
``FRAME_BYTES`` bytes, ``FRAME_SAMPLES`` samples.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
FRAME_BYTES = FRAME_SAMPLES * 2  # 320
FRAME_SECONDS = FRAME_MS / 1000


class IMediaConsumer(Interface):
    """What a media session tells the call engine. Called on the reactor thread; must not block."""

    def audio_received(frame: bytes) -> None:
        """One inbound 20 ms frame (8 kHz s16le), in order, decoded from whatever arrived."""

    def speech_started() -> None:
        """The VAD heard the caller start speaking."""

    def speech_ended() -> None:
        """The VAD heard the caller stop (on silence frames, or on a clock when frames stop)."""

    def utterance_sent(utterance_id: str, ms: int) -> None:
        """Every frame of an utterance went on the wire (``ms`` of audio)."""

    def dtmf_received(digit: str) -> None:
        """A DTMF digit arrived on the media leg (AudioSocket only; RTP gets DTMF from ARI)."""

    def media_closed(reason: str) -> None:
        """The media leg ended from the far side (AudioSocket hang-up or connection loss)."""

    def stream_failed(reason: str) -> None:
        """Outbound audio could not be sent for the session's ``stall_seconds`` (said once)."""


class IMediaSession(Interface):
    """One call's media, registered before its peer is known."""

    call_id = Attribute("the call this media belongs to")
    transport = Attribute("'rtp' or 'audiosocket'")
    bound = Attribute("True once the peer is known")
    closed = Attribute("True after close()")

    def set_consumer(consumer: IMediaConsumer) -> None:
        """Where inbound audio and events go."""

    def bind_peer(host: str, port: int) -> None:
        """RTP: Asterisk's side of the call (``UNICASTRTP_LOCAL_ADDRESS:PORT`` of the externalMedia
        response). AudioSocket: nothing to do, the connection binds itself by the UUID it sends."""

    def play(pcm: bytes, rate: int, utterance_id: str) -> None:
        """Queue 16-bit mono PCM at ``rate`` Hz for paced sending, resampled to the leg's rate."""

    def flush() -> dict[str, int]:
        """Stop sending at once; return, per queued utterance, the milliseconds already sent."""

    def stats() -> dict[str, Any]:
        """Per-call counters (packets, bytes, loss, jitter, send lateness ...)."""

    def close() -> None:
        """Release everything; idempotent."""
