"""AudioSocket framing: the bytes on the TCP connection, with no I/O.

Asterisk's AudioSocket (``res_audiosocket.c`` / ``chan_audiosocket.c``, 22.10.1) frames every
message as a 3-byte header, ``kind:u8`` then ``length:u16`` big-endian, followed by ``length``
payload bytes. Facts a user of this module relies on (docs: PROTOCOLS.md §1.7 and §6):

- Asterisk is the TCP client. Its first frame is ``UUID`` (16 raw bytes: the ``data`` given to
  ``externalMedia``), then audio every 20 ms in the kind that matches the channel format.
- Audio payloads are signed 16-bit **little-endian** (Asterisk's host order, never swapped), so
  they pass to and from the rest of the media plane without a byte swap. This differs from RTP L16.
- Only the slin kinds are supported: with ``format=ulaw`` Asterisk labels μ-law bytes as ``0x10``
  and plays μ-law sent back as noise, so μ-law over AudioSocket is unusable.
- On hang-up Asterisk just closes the TCP connection; it never sends ``HANGUP``. A ``HANGUP``
  from us ends the call at once (Asterisk reads only its header, so it is sent with no payload).
- Asterisk ends the call on an audio frame with ``length < 1`` and on any kind it does not
  expect, so :func:`encode_frame` refuses to build either.
"""

from __future__ import annotations

import struct
import uuid

HANGUP = 0x00
UUID = 0x01
DTMF = 0x03
AUDIO_SLIN = 0x10
AUDIO_SLIN12 = 0x11
AUDIO_SLIN16 = 0x12
AUDIO_SLIN24 = 0x13
AUDIO_SLIN32 = 0x14
AUDIO_SLIN44 = 0x15
AUDIO_SLIN48 = 0x16
AUDIO_SLIN96 = 0x17
AUDIO_SLIN192 = 0x18
ERROR = 0xFF

AUDIO_RATES: dict[int, int] = {
    AUDIO_SLIN: 8000,
    AUDIO_SLIN12: 12000,
    AUDIO_SLIN16: 16000,
    AUDIO_SLIN24: 24000,
    AUDIO_SLIN32: 32000,
    AUDIO_SLIN44: 44100,
    AUDIO_SLIN48: 48000,
    AUDIO_SLIN96: 96000,
    AUDIO_SLIN192: 192000,
}
"""Audio kind -> sample rate in Hz."""

AUDIO_KINDS: dict[int, int] = {rate: kind for kind, rate in AUDIO_RATES.items()}
"""Sample rate in Hz -> audio kind."""

KIND_NAMES: dict[int, str] = {
    HANGUP: "hangup", UUID: "uuid", DTMF: "dtmf", ERROR: "error",
    **{kind: f"slin{rate // 1000 if rate != 8000 else ''}" for kind, rate in AUDIO_RATES.items()},
}

HEADER_BYTES = 3
MAX_PAYLOAD_BYTES = 0xFFFF
MAX_FRAME_BYTES = HEADER_BYTES + MAX_PAYLOAD_BYTES
DTMF_DIGITS = frozenset(b"0123456789*#ABCD")

_HEADER = struct.Struct(">BH")


class AudioSocketError(ValueError):
    """The peer broke the AudioSocket protocol; the connection cannot be trusted any further.

    ``frames`` holds the valid frames decoded from the same :meth:`AudioSocketDecoder.feed`
    call before the bad one, so a caller that closes the connection still delivers them.
    """

    def __init__(self, message: str, kind: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.frames: list[tuple[int, bytes]] = []


class AudioSocketUnknownKind(AudioSocketError):
    """A kind this protocol does not define (μ-law has none: it arrives mislabelled as 0x10)."""


class AudioSocketBadAudio(AudioSocketError):
    """An audio frame that is empty (Asterisk rejects those too) or not whole 16-bit samples."""


class AudioSocketBadUUID(AudioSocketError):
    """A UUID frame whose payload is not exactly 16 bytes."""


class AudioSocketBadDTMF(AudioSocketError):
    """A DTMF frame that is not one ASCII digit of ``0-9 * # A-D``."""


def kind_name(kind: int) -> str:
    return KIND_NAMES.get(kind, f"0x{kind:02x}")


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame: header then payload.

    Raises ValueError for a kind outside 0-255, a payload over 65535 bytes, or an audio payload
    that Asterisk would reject (empty, or an odd number of bytes).
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"AudioSocket kind must fit in one byte, got {kind}")
    length = len(payload)
    if length > MAX_PAYLOAD_BYTES:
        raise ValueError(f"AudioSocket payload is {length} bytes; the length field holds at most {MAX_PAYLOAD_BYTES}")
    if kind in AUDIO_RATES and (length == 0 or length % 2):
        raise ValueError(f"AudioSocket audio must be whole 16-bit samples and not empty, got {length} bytes")
    return _HEADER.pack(kind, length) + payload


def hangup_frame() -> bytes:
    """Ends the call when sent to Asterisk."""
    return encode_frame(HANGUP)


def audio_frame(pcm: bytes, rate: int = 8000) -> bytes:
    """An audio frame of 16-bit little-endian PCM, labelled with the kind for ``rate``."""
    try:
        kind = AUDIO_KINDS[rate]
    except KeyError:
        rates = ", ".join(str(r) for r in sorted(AUDIO_KINDS))
        raise ValueError(f"AudioSocket has no audio kind for {rate} Hz (supported: {rates})") from None
    return encode_frame(kind, pcm)


def uuid_frame(call_uuid: uuid.UUID) -> bytes:
    """The first frame Asterisk sends (used by the simulator playing Asterisk's part)."""
    return encode_frame(UUID, call_uuid.bytes)


def dtmf_frame(digit: str) -> bytes:
    """A DTMF frame as Asterisk sends it (used by the simulator)."""
    payload = digit.encode("ascii", "replace")
    if len(payload) != 1 or payload[0] not in DTMF_DIGITS:
        raise ValueError(f"DTMF digit must be one of 0-9 * # A-D, got {digit!r}")
    return encode_frame(DTMF, payload)


def parse_uuid(payload: bytes) -> uuid.UUID:
    """The UUID in a UUID frame's payload (16 raw bytes, as Asterisk's ``uuid_parse`` output)."""
    if len(payload) != 16:
        raise AudioSocketBadUUID(f"AudioSocket UUID payload must be 16 bytes, got {len(payload)}", UUID)
    return uuid.UUID(bytes=bytes(payload))


def parse_dtmf(payload: bytes) -> str:
    """The digit in a DTMF frame's payload."""
    if len(payload) != 1 or payload[0] not in DTMF_DIGITS:
        raise AudioSocketBadDTMF(f"AudioSocket DTMF payload must be one of 0-9 * # A-D, got {bytes(payload)!r}", DTMF)
    return chr(payload[0])


def _check(kind: int, payload: bytes) -> None:
    length = len(payload)
    if kind in AUDIO_RATES:
        if length == 0 or length % 2:
            raise AudioSocketBadAudio(
                f"AudioSocket {kind_name(kind)} frame of {length} bytes: audio must be whole 16-bit samples, not empty",
                kind)
    elif kind == UUID:
        if length != 16:
            raise AudioSocketBadUUID(f"AudioSocket UUID payload must be 16 bytes, got {length}", kind)
    elif kind == DTMF:
        if length != 1 or payload[0] not in DTMF_DIGITS:
            raise AudioSocketBadDTMF(
                f"AudioSocket DTMF payload must be one of 0-9 * # A-D, got {payload!r}", kind)
    elif kind not in (HANGUP, ERROR):
        raise AudioSocketUnknownKind(f"unknown AudioSocket kind 0x{kind:02x} (length {length})", kind)


class AudioSocketDecoder:
    """Turns the bytes of one TCP connection into ``(kind, payload)`` frames, whatever the chunking.

    Frames are validated as they complete (see the :class:`AudioSocketError` subclasses). After an
    error the byte stream has lost its framing, so every later :meth:`feed` raises the same error:
    close the connection.

    Memory is bounded: only an incomplete frame is kept between calls, and the length field caps
    a frame at :data:`MAX_FRAME_BYTES` (65538), so a corrupt length can make the decoder wait for
    at most 64 KiB, never buffer without limit. Work is linear in the bytes fed: complete frames
    are sliced out of a memoryview at a moving offset, and the unconsumed tail is copied once per
    call.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._error: AudioSocketError | None = None
        self.frames_decoded = 0
        self.bytes_fed = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held for the next :meth:`feed` (at most ``MAX_FRAME_BYTES - 1``)."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Every frame completed by ``data``, in order; an incomplete tail waits for the next call."""
        if self._error is not None:
            error = self._error
            raise type(error)(f"{error} (the stream already failed; close the connection)", error.kind)
        self.bytes_fed += len(data)
        if self._pending:
            self._pending += data
            source: bytes | bytearray | memoryview = self._pending
        else:
            # The common case (whole frames per read) decodes straight from the caller's bytes.
            source = data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        end = len(source)
        try:
            with memoryview(source) as view:
                while end - offset >= HEADER_BYTES:
                    kind, length = _HEADER.unpack_from(view, offset)
                    stop = offset + HEADER_BYTES + length
                    if stop > end:
                        break
                    # Copied at once: a live slice would pin the bytearray and forbid trimming it below.
                    payload = view[offset + HEADER_BYTES:stop].tobytes()
                    _check(kind, payload)
                    frames.append((kind, payload))
                    offset = stop
                if source is data and offset < end:
                    self._pending = bytearray(view[offset:])
        except AudioSocketError as e:
            e.frames = frames
            self._error = e
            self._pending = bytearray()
            self.frames_decoded += len(frames)
            raise
        if source is self._pending:
            # Outside the memoryview block: a bytearray cannot shrink while a view of it exists.
            del self._pending[:offset]
        self.frames_decoded += len(frames)
        return frames
