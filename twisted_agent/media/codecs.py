"""Audio payload codecs and resamplers.

Everything here takes and returns 16-bit signed little-endian mono PCM ("s16le") unless a name
says otherwise; payload bytes are what travels in RTP.

* G.711 μ-law and A-law (RTP PT 0 and 8) and big-endian L16 ("slin" in Asterisk) in both
  directions, via ``audioop``.
* :class:`PayloadFormat` and :data:`PAYLOAD_FORMATS`: what each RTP payload type from Asterisk
  means, and :func:`send_format`: what we send back.
* :func:`resample` for whole utterances (soxr, high quality) and :class:`StreamResampler` for
  live 20 ms frames (a polyphase FIR with a constant 3 ms delay for integer ratios).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

from twisted_agent.media.interfaces import FRAME_MS

with warnings.catch_warnings():
    # deprecated on 3.11/3.12 and gone in 3.13, where the audioop-lts package provides the same module
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "FORMATS_BY_NAME",
    "PAYLOAD_FORMATS",
    "FormatName",
    "PayloadFormat",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "l16_be_to_le",
    "le_to_l16_be",
    "payload_format",
    "resample",
    "send_format",
    "ulaw_decode",
    "ulaw_encode",
]

if sys.byteorder != "little":  # pragma: no cover
    # audioop reads and writes samples in native order; on a big-endian host every "le" here would lie
    raise ImportError("twisted_agent.media.codecs assumes a little-endian host")

FloatArray = npt.NDArray[np.float64]


def _require_whole_samples(pcm: bytes) -> None:
    if len(pcm) & 1:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")


# -- G.711 and L16 ------------------------------------------------------------------------------

def ulaw_decode(payload: bytes) -> bytes:
    """G.711 μ-law bytes to s16le (one sample per byte; 0xFF and 0x7F are silence)."""
    return audioop.ulaw2lin(payload, 2)


def ulaw_encode(pcm: bytes) -> bytes:
    """s16le to G.711 μ-law bytes."""
    _require_whole_samples(pcm)
    return audioop.lin2ulaw(pcm, 2)


def alaw_decode(payload: bytes) -> bytes:
    """G.711 A-law bytes to s16le."""
    return audioop.alaw2lin(payload, 2)


def alaw_encode(pcm: bytes) -> bytes:
    """s16le to G.711 A-law bytes."""
    _require_whole_samples(pcm)
    return audioop.lin2alaw(pcm, 2)


def l16_be_to_le(payload: bytes) -> bytes:
    """Network-order L16 (Asterisk's slin over RTP) to s16le."""
    _require_whole_samples(payload)
    return audioop.byteswap(payload, 2)


def le_to_l16_be(pcm: bytes) -> bytes:
    """s16le to network-order L16."""
    _require_whole_samples(pcm)
    return audioop.byteswap(pcm, 2)


FormatName = Literal["ulaw", "alaw", "slin", "slin16"]

_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "ulaw": ulaw_decode, "alaw": alaw_decode, "slin": l16_be_to_le, "slin16": l16_be_to_le,
}
_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "ulaw": ulaw_encode, "alaw": alaw_encode, "slin": le_to_l16_be, "slin16": le_to_l16_be,
}


@dataclass(frozen=True)
class PayloadFormat:
    """One RTP payload type as Asterisk uses it: what the bytes are and at which rate.

    ``decode`` turns a payload into s16le at ``rate``; ``encode`` is the inverse. Both raise
    ValueError on L16 payloads with an odd number of bytes.
    """

    name: FormatName
    payload_type: int
    rate: int
    bytes_per_sample: int

    def __post_init__(self) -> None:
        if self.name not in _DECODERS:
            raise ValueError(f"unknown payload format name {self.name!r}")
        if self.bytes_per_sample not in (1, 2):
            raise ValueError(f"bytes_per_sample must be 1 or 2, got {self.bytes_per_sample}")

    def decode(self, payload: bytes) -> bytes:
        return _DECODERS[self.name](payload)

    def encode(self, pcm: bytes) -> bytes:
        return _ENCODERS[self.name](pcm)

    @property
    def frame_samples(self) -> int:
        """Samples in one 20 ms frame; also the RTP timestamp step per packet (the clock is ``rate``)."""
        return self.rate * FRAME_MS // 1000

    @property
    def frame_bytes(self) -> int:
        """Payload bytes of one 20 ms frame: 160 for G.711, 320 for slin, 640 for slin16."""
        return self.frame_samples * self.bytes_per_sample


_ULAW = PayloadFormat("ulaw", 0, 8000, 1)
_ALAW = PayloadFormat("alaw", 8, 8000, 1)
_SLIN_PT10 = PayloadFormat("slin", 10, 8000, 2)
_SLIN16 = PayloadFormat("slin16", 118, 16000, 2)

#: Payload types Asterisk 22 uses on an ExternalMedia RTP leg (PROTOCOLS §1.7, §6). PT 10 and 11
#: are RFC 3551's 44.1 kHz L16 entries, but Asterisk sends format=slin as PT 10 and accepts PT 11,
#: both as 8 kHz big-endian L16; 118 is Asterisk's fixed number for slin16.
PAYLOAD_FORMATS: dict[int, PayloadFormat] = {
    0: _ULAW,
    8: _ALAW,
    10: _SLIN_PT10,
    11: PayloadFormat("slin", 11, 8000, 2),
    118: _SLIN16,
}

#: What Asterisk sends us for each ExternalMedia ``format=`` name.
FORMATS_BY_NAME: dict[str, PayloadFormat] = {"ulaw": _ULAW, "alaw": _ALAW, "slin": _SLIN_PT10, "slin16": _SLIN16}


def payload_format(payload_type: int) -> PayloadFormat | None:
    """The format of an arriving payload type, or None (the caller counts the packet and drops it)."""
    return PAYLOAD_FORMATS.get(payload_type)


def send_format(channel_format: str) -> PayloadFormat:
    """What to send Asterisk on a leg opened with ``format=channel_format``: PT 0 or 8, never L16.

    With no SDP, Asterisk's RTP receiver resolves only static payload types (PT ≤ 34): slin16's
    PT 118 is dropped without a log line. PT 11 does play as 8 kHz L16, but only because Asterisk
    bends RFC 3551 (which says 44.1 kHz), and it costs twice the bytes of G.711. So the reply is
    A-law on an A-law leg and μ-law on every other (PROTOCOLS §6, "RTP to Asterisk").
    """
    if channel_format not in FORMATS_BY_NAME:
        raise ValueError(f"no RTP payload format for Asterisk format {channel_format!r}")
    return _ALAW if channel_format == "alaw" else _ULAW


# -- resampling -----------------------------------------------------------------------------------

def _check_rate(name: str, rate: int) -> None:
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Resample a whole utterance of s16le (soxr, "HQ"): TTS output to 8 kHz, 8 kHz to 16 kHz for STT.

    soxr rounds and clips into int16 itself. The output has ``round(len * to_rate / from_rate)``
    samples, aligned with the input (no delay). Use :class:`StreamResampler` for live audio.
    """
    _check_rate("from_rate", from_rate)
    _check_rate("to_rate", to_rate)
    _require_whole_samples(pcm)
    if from_rate == to_rate:
        return bytes(pcm)
    out = soxr.resample(np.frombuffer(pcm, "<i2"), from_rate, to_rate, quality="HQ")
    return out.astype("<i2", copy=False).tobytes()


#: Anti-aliasing lowpass design shared by both directions, all relative to the lower of the two
#: rates: cutoff 0.45 of it (3.6 kHz at 8 kHz), Kaiser beta 7, taps spanning ±24 low-rate samples
#: (97 taps for 16 -> 8 kHz, 289 for 48 -> 8 kHz). Measured response:
#: flat within 0.005 dB to 0.4 (3.2 kHz), -0.66 dB at 0.425 (3.4 kHz, the telephone band edge),
#: at least 71 dB down from 0.5 (the low rate's Nyquist, so nothing aliases into the band) and 81 dB
#: from 0.55. The delay is 24 low-rate samples: 3 ms at 8 kHz.
_CUTOFF = 0.45
_KAISER_BETA = 7.0
_HALF_LOBES = 24


def _lowpass(factor: int) -> FloatArray:
    """A linear-phase lowpass at the high rate, unity DC gain, ``2 * factor * _HALF_LOBES + 1`` taps.

    The odd length centres the filter on a whole multiple of ``factor`` high-rate samples, so the
    delay is a whole number of samples at both rates.
    """
    half = factor * _HALF_LOBES
    n = np.arange(-half, half + 1, dtype=np.float64)
    cutoff = _CUTOFF / factor  # in cycles per high-rate sample
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(2 * half + 1, _KAISER_BETA)
    return taps / taps.sum()


def _to_s16le(samples: FloatArray) -> bytes:
    np.rint(samples, out=samples)
    np.clip(samples, -32768, 32767, out=samples)
    return samples.astype("<i2").tobytes()


class _Passthrough:
    delay = 0

    def process(self, pcm: bytes) -> bytes:
        return bytes(pcm)

    def flush(self) -> bytes:
        return b""


class _Decimator:
    """Lowpass and keep every ``factor``-th sample, computing only the kept ones."""

    def __init__(self, factor: int) -> None:
        self._factor = factor
        self._taps = _lowpass(factor)[::-1].copy()  # reversed so a window's dot product is the convolution
        self._history: FloatArray = np.zeros(len(self._taps) - 1)
        # where, in the next chunk, the next output instant falls (chunks need not be multiples of factor)
        self._phase = 0
        self.delay = _HALF_LOBES  # output samples

    def process(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, "<i2")
        count = len(samples)
        buffer = np.concatenate((self._history, samples))
        factor, phase, width = self._factor, self._phase, len(self._taps)
        outputs = (count - phase + factor - 1) // factor if count > phase else 0
        # row k: the len(taps) samples ending at the chunk's sample phase + k*factor, a view, no copy
        windows: FloatArray = np.ndarray((outputs, width), np.float64, buffer, phase * 8, (factor * 8, 8))
        result = windows @ self._taps
        self._history = buffer[count:]
        self._phase = phase + outputs * factor - count
        return _to_s16le(result)

    def flush(self) -> bytes:
        return b""


class _Interpolator:
    """Insert ``factor - 1`` zeros between samples and lowpass, as ``factor`` interleaved short filters."""

    def __init__(self, factor: int) -> None:
        taps = _lowpass(factor) * factor  # the zeros cost 1/factor of the energy
        per_phase = 2 * _HALF_LOBES + 1
        padded = np.zeros(factor * per_phase)
        padded[: len(taps)] = taps
        # bank[j, p]: the tap that output phase p applies to the sample j places before the newest
        phases = padded.reshape(per_phase, factor).T
        bank = np.ascontiguousarray(phases[:, ::-1].T)
        # each phase sums to 1 within ~2e-5 only (the image at the low rate is not infinitely far down):
        # a ripple that would turn a full-scale steady level into 32766, 32767, 32766 ...
        self._bank: FloatArray = bank / bank.sum(axis=0)
        self._history: FloatArray = np.zeros(per_phase - 1)
        self.delay = _HALF_LOBES * factor  # output samples

    def process(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, "<i2")
        count = len(samples)
        buffer = np.concatenate((self._history, samples))
        width = len(self._bank)
        windows: FloatArray = np.ndarray((count, width), np.float64, buffer, 0, (8, 8))
        result = windows @ self._bank  # row n holds the factor outputs that follow input sample n
        self._history = buffer[count:]
        return _to_s16le(result.ravel())

    def flush(self) -> bytes:
        return b""


class _SoxrStream:
    """soxr's streaming resampler: any ratio, but it buffers ~100 ms and emits in bursts."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16", quality="HQ")
        self.delay = 0  # soxr compensates its filter delay by holding output back instead

    def process(self, pcm: bytes) -> bytes:
        out = self._stream.resample_chunk(np.frombuffer(pcm, "<i2"))
        return out.astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        out = self._stream.resample_chunk(np.zeros(0, np.int16), last=True)
        self._stream.clear()
        return out.astype("<i2", copy=False).tobytes()


class StreamResampler:
    """Resample live s16le audio chunk by chunk, keeping filter state between calls.

    For integer ratios (down by 2, 3, 6 ...: 16/24/48 kHz to 8 kHz; up by 2, 3: 8 kHz to 16/24 kHz)
    this is a windowed-sinc polyphase FIR (see ``_lowpass``): each call returns at once exactly the
    samples its input covers, ``len * to_rate / from_rate`` for 20 ms frames (for other chunk
    sizes, rounded so the running total never drifts). Feeding a stream in pieces gives the same
    samples as feeding it whole (±1 LSB), shifted by a constant ``delay`` output samples: 3 ms.
    Measured per 20 ms frame on the dev box: 16→8 kHz ~12 µs, 24→8 kHz ~15 µs, 48→8 kHz ~27 µs,
    8→16 kHz ~11 µs, 8→24 kHz ~12 µs.

    Other ratios (22.05 kHz→8 kHz, 24 kHz→16 kHz ...) fall back to ``soxr.ResampleStream``, which
    holds back 80-100 ms before its first output and then emits ~0.07 s bursts every 3 to 4 frames
    with empty returns between them: use those only where frame timing does not matter, and call
    :meth:`flush` at the end to drain it.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        _check_rate("from_rate", from_rate)
        _check_rate("to_rate", to_rate)
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._impl: _Passthrough | _Decimator | _Interpolator | _SoxrStream
        self.reset()

    def reset(self) -> None:
        """Forget all history, as for a new stream (for example after an SSRC change)."""
        if self.from_rate == self.to_rate:
            self._impl = _Passthrough()
        elif self.from_rate % self.to_rate == 0:
            self._impl = _Decimator(self.from_rate // self.to_rate)
        elif self.to_rate % self.from_rate == 0:
            self._impl = _Interpolator(self.to_rate // self.from_rate)
        else:
            self._impl = _SoxrStream(self.from_rate, self.to_rate)

    @property
    def delay(self) -> int:
        """Constant delay in output samples (24 low-rate samples for the FIR paths, 0 otherwise)."""
        return self._impl.delay

    def process(self, pcm: bytes) -> bytes:
        """Resample the next chunk of the stream."""
        _require_whole_samples(pcm)
        return self._impl.process(pcm)

    def flush(self) -> bytes:
        """Drain what the soxr fallback still holds at the end of a stream; the FIR paths hold nothing."""
        return self._impl.flush()
