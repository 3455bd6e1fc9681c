"""Fakes for media tests: a UDP transport, a consumer that records, a VAD that listens for energy."""

from __future__ import annotations

import audioop
from typing import Any

from zope.interface import implementer

from twisted_agent.media.interfaces import FRAME_BYTES, IMediaConsumer


class FakeUDPTransport:
    """What DatagramProtocol needs of an IUDPTransport (MemoryReactor has no UDP)."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        #: raised by every write while set (the kernel refusing: no route, a firewall)
        self.error: OSError | None = None

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((data, addr))

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", "127.0.0.1", 18080)

    def stopListening(self) -> None:
        pass


@implementer(IMediaConsumer)
class Recorder:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.events: list[tuple[Any, ...]] = []

    @property
    def audio(self) -> bytes:
        return b"".join(self.frames)

    def audio_received(self, frame: bytes) -> None:
        assert len(frame) == FRAME_BYTES
        self.frames.append(frame)

    def speech_started(self) -> None:
        self.events.append(("speech_started",))

    def speech_ended(self) -> None:
        self.events.append(("speech_ended",))

    def utterance_sent(self, utterance_id: str, ms: int) -> None:
        self.events.append(("utterance_sent", utterance_id, ms))

    def dtmf_received(self, digit: str) -> None:
        self.events.append(("dtmf", digit))

    def media_closed(self, reason: str) -> None:
        self.events.append(("media_closed", reason))

    def stream_failed(self, reason: str) -> None:
        self.events.append(("stream_failed", reason))


class EnergyVAD:
    """Deterministic stand-in for webrtcvad: a frame is speech when it is loud."""

    def __init__(self, threshold: int = 1000) -> None:
        self.threshold = threshold

    def is_speech(self, frame: bytes) -> bool:
        return audioop.rms(frame, 2) > self.threshold


def detector_factory(start_ms: int = 60, end_ms: int = 300) -> Any:
    from twisted_agent.media.vad import SpeechDetector

    def make(on_start: Any, on_end: Any) -> SpeechDetector:
        return SpeechDetector(EnergyVAD(), on_start=on_start, on_end=on_end, start_ms=start_ms, end_ms=end_ms)

    return make


def tone(ms: int, amplitude: int = 8000, rate: int = 8000, freq: float = 440.0) -> bytes:
    import math
    import struct

    n = rate * ms // 1000
    return struct.pack(f"<{n}h", *(int(amplitude * math.sin(2 * math.pi * freq * i / rate)) for i in range(n)))
