"""What every call's media session does, whatever the transport.

Inbound: decoded PCM is cut into 20 ms 8 kHz frames, run through the VAD and handed to the
consumer. Outbound: ``play()`` queues audio, the shared pacer takes one frame per tick, and the
transport subclass puts it on the wire (RTP packet or AudioSocket frame).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.media.codecs import StreamResampler, resample
from twisted_agent.media.echo import EchoReference
from twisted_agent.media.interfaces import FRAME_BYTES, SAMPLE_RATE, IMediaConsumer, IMediaSession
from twisted_agent.media.pacer import LatenessHistogram, OutboundAudio, Pacer

VADFactory = Callable[[Callable[[], None], Callable[[], None]], Any]


class SessionClosed(Exception):
    """Audio was played into a session that is already closed."""


@implementer(IMediaSession)
class MediaSession:
    transport = "none"
    log = Logger()

    def __init__(self, call_id: str, pacer: Pacer, detector_factory: VADFactory, leg_rate: int = SAMPLE_RATE) -> None:
        self.call_id = call_id
        self.leg_rate = leg_rate
        self.bound = False
        self.closed = False
        self._pacer = pacer
        self._consumer: Any = None
        self.detector = detector_factory(self._speech_started, self._speech_ended)
        self.outbound = OutboundAudio(leg_rate // 50 * 2)
        self.lateness = LatenessHistogram()
        #: what the agent sent lately, to tell its echo from the caller (see media/echo.py)
        self.echo = EchoReference(leg_rate)
        self._talking = False
        self._inbound_rate = SAMPLE_RATE
        self._in_resampler: StreamResampler | None = None
        self._partial = b""
        self.frames_in = 0
        self.frames_out = 0
        #: when the latest agent frame went on the wire
        self.last_sent_at: float | None = None
        self.speech_segments = 0
        self.consumer_errors = 0
        #: called once with the session when it closes (the media service forgets it)
        self.on_close: Callable[[MediaSession], None] | None = None
        #: outbound audio that cannot leave for this long (send errors) makes the consumer give up streaming
        self.stall_seconds = 1.0
        self.send_failures = 0
        self._stalled_since: float | None = None
        self.stalled = False
        #: the outbound audio's gain (below 1 while ducked: the caller may be interrupting)
        self.gain = 1.0
        pacer.add(self)

    # --- the call engine's side -------------------------------------------------------------

    def set_consumer(self, consumer: IMediaConsumer) -> None:
        self._consumer = consumer

    def bind_peer(self, host: str, port: int) -> None:
        raise NotImplementedError

    def play(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if self.closed:
            raise SessionClosed(f"media session of call {self.call_id} is closed")
        if len(pcm) % 2:
            raise ValueError("PCM must be 16-bit samples (an even number of bytes)")
        if rate != self.leg_rate:
            pcm = resample(pcm, rate, self.leg_rate)
        self.outbound.enqueue(pcm, utterance_id)

    def flush(self) -> dict[str, int]:
        self._talking = False
        return self.outbound.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pacer.remove(self)
        self.outbound.flush()
        self._release()
        if self.on_close is not None:
            self.on_close(self)

    def stats(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "speech_segments": self.speech_segments,
            "in_speech": bool(self.detector.in_speech),
            "queued_ms": self.outbound.pending_ms(),
            "send_lateness": self.lateness.summary(),
            "consumer_errors": self.consumer_errors,
        }

    # --- transport subclasses ----------------------------------------------------------------

    def _send_frame(self, frame: bytes, marker: bool, index: int) -> bool:
        """Put one frame on the wire; False when it could not be sent."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free the transport's resources."""

    def _tick_inbound(self, now: float) -> None:
        """Clock-driven inbound work (e.g. give up on an RTP gap)."""

    def _deliver_pcm(self, pcm: bytes, rate: int, now: float) -> None:
        """Decoded inbound audio at ``rate``: resample to 8 kHz, cut into 20 ms frames, deliver."""
        if rate != SAMPLE_RATE:
            if self._in_resampler is None or self._inbound_rate != rate:
                self._in_resampler = StreamResampler(rate, SAMPLE_RATE)
                self._inbound_rate = rate
            pcm = self._in_resampler.process(pcm)
        if not self._partial and len(pcm) == FRAME_BYTES:
            self._deliver_frame(pcm, now)  # the common case: one 20 ms packet, one frame
            return
        data = self._partial + pcm
        end = len(data) - len(data) % FRAME_BYTES
        for offset in range(0, end, FRAME_BYTES):
            self._deliver_frame(data[offset:offset + FRAME_BYTES], now)
        self._partial = data[end:]

    def _deliver_frame(self, frame: bytes, now: float) -> None:
        self.frames_in += 1
        self.detector.frame(frame, now)
        consumer = self._consumer
        if consumer is not None:
            try:
                consumer.audio_received(frame)
            except Exception:
                self._consumer_failed("audio_received")

    # --- the pacer's side ---------------------------------------------------------------------

    def tick(self, index: int, deadline: float, now: float) -> None:
        if self.bound and self.outbound:
            item = self.outbound.next_frame()
            assert item is not None
            frame, utterance_id, finished_ms = item
            out = frame if self.gain == 1.0 else _scaled(frame, self.gain)
            if self._send_frame(out, not self._talking, index):
                self._stalled_since = None
                self.last_sent_at = now
                self.echo.sent(out, now)
                self._talking = True
                self.frames_out += 1
                # measured after the write: a frame late in a tick's burst counts as late as it was
                self.lateness.add(self._pacer.seconds() - deadline)
                if finished_ms >= 0:
                    self._notify("utterance_sent", utterance_id, finished_ms)
            else:
                self.outbound.unsend(frame, utterance_id)  # not lost: it goes later, or to a file
                self._send_failed(now)
        else:
            self._talking = False  # the next frame starts a new talkspurt: marker bit
        self._tick_inbound(now)
        self.detector.tick(now)

    def _send_failed(self, now: float) -> None:
        self.send_failures += 1
        if self._stalled_since is None:
            self._stalled_since = now
        elif not self.stalled and now - self._stalled_since >= self.stall_seconds - 1e-6:
            self.stalled = True
            self._notify("stream_failed", f"no frame could be sent for {now - self._stalled_since:.1f}s "
                                          f"({self.send_failures} send failures)")

    # --- events --------------------------------------------------------------------------------

    def _speech_started(self) -> None:
        self.speech_segments += 1
        self._notify("speech_started")

    def _speech_ended(self) -> None:
        self._notify("speech_ended")

    def _notify(self, event: str, *args: Any) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            getattr(consumer, event)(*args)
        except Exception:
            self._consumer_failed(event)

    def _consumer_failed(self, event: str) -> None:
        # One failing consumer must not stop the media of every other call sharing the pacer.
        self.consumer_errors += 1
        self.log.failure("media consumer of call {call_id} failed in {event}", call_id=self.call_id, event=event)


def _scaled(frame: bytes, gain: float) -> bytes:
    return (np.frombuffer(frame, dtype="<i2") * gain).astype("<i2").tobytes()
