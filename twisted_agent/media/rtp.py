"""RTP packets (RFC 3550 §5.1): parse what arrives, build what we send.

Pure functions, no Twisted: the datagram protocol hands bytes here and acts on the result.

Asterisk's ExternalMedia leg sends plain packets (version 2, no padding, extension or CSRCs,
marker never set: PROTOCOLS §6), so :func:`parse` takes a one-unpack fast path when the first
byte is ``0x80`` and only walks the optional parts for anything else. Every malformed input
raises an :class:`RTPError` subclass and nothing else, so the caller can count and drop with a
single ``except RTPError``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "HEADER_SIZE",
    "RTPBadHeaderExtension",
    "RTPBadPadding",
    "RTPBadVersion",
    "RTPError",
    "RTPPacket",
    "RTPTooShort",
    "RTPTruncatedCSRC",
    "build",
    "header",
    "parse",
    "seq_distance",
]

#: the fixed header: V/P/X/CC, M/PT, sequence, timestamp, SSRC
HEADER_SIZE = 12

_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")
# one precompiled unpacker per possible CSRC count, so the slow path never formats a struct string
_CSRCS = tuple(struct.Struct(f"!{count}I") for count in range(16))

_VERSION_2 = 0x80
_PADDING_BIT = 0x20
_EXTENSION_BIT = 0x10
_CC_MASK = 0x0F
_MARKER_BIT = 0x80
_PT_MASK = 0x7F


class RTPError(ValueError):
    """A datagram that is not a well-formed RTP packet."""


class RTPTooShort(RTPError):
    """Fewer bytes than the 12-byte fixed header."""


class RTPBadVersion(RTPError):
    """The version field is not 2."""


class RTPBadPadding(RTPError):
    """The P bit is set but the pad count is 0 or larger than what follows the header."""


class RTPBadHeaderExtension(RTPError):
    """The X bit is set but the extension header or its data is cut short."""


class RTPTruncatedCSRC(RTPError):
    """The CSRC count promises more 32-bit identifiers than the packet holds."""


class RTPPacket(NamedTuple):
    """One RTP packet, with the payload already stripped of padding.

    ``extension`` is ``(profile, data)`` with ``len(data) % 4 == 0``; ``padding`` is the number of
    padding bytes on the wire including the count byte (0 = the P bit is clear).
    """

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None
    padding: int = 0


# tuple.__new__ skips the generated __new__ (a Python-level call that fills defaults): ~0.1 µs of the
# ~0.33 µs a fast-path parse costs
_new_packet = tuple.__new__


def parse(data: bytes) -> RTPPacket:
    """Decode one datagram; raise an :class:`RTPError` subclass if it is not valid RTP."""
    if len(data) >= HEADER_SIZE and data[0] == _VERSION_2:
        _, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        return _new_packet(
            RTPPacket,
            (second & _PT_MASK, sequence, timestamp, ssrc, data[HEADER_SIZE:], second > _PT_MASK, (), None, 0),
        )
    return _parse_general(data)


def _parse_general(data: bytes) -> RTPPacket:
    size = len(data)
    if size < HEADER_SIZE:
        raise RTPTooShort(f"RTP packet of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    version = first >> 6
    if version != 2:
        raise RTPBadVersion(f"RTP version {version}, expected 2")

    offset = HEADER_SIZE
    count = first & _CC_MASK
    csrcs: tuple[int, ...] = ()
    if count:
        end = offset + 4 * count
        if size < end:
            raise RTPTruncatedCSRC(
                f"CSRC count {count} needs {end} bytes of header, packet has {size}")
        csrcs = _CSRCS[count].unpack_from(data, offset)
        offset = end

    extension: tuple[int, bytes] | None = None
    if first & _EXTENSION_BIT:
        if size < offset + 4:
            raise RTPBadHeaderExtension(
                f"header extension starts at byte {offset} but the packet ends at {size}")
        profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
        start = offset + 4
        end = start + 4 * words
        if size < end:
            raise RTPBadHeaderExtension(
                f"header extension of {words} words needs {end} bytes, packet has {size}")
        extension = (profile, bytes(data[start:end]))
        offset = end

    padding = 0
    stop = size
    if first & _PADDING_BIT:
        available = size - offset
        if not available:
            raise RTPBadPadding("P bit set but no byte follows the header to hold the pad count")
        padding = data[-1]
        if padding == 0 or padding > available:
            raise RTPBadPadding(
                f"pad count {padding} with {available} bytes after the header (must be 1..{available})")
        stop = size - padding

    return RTPPacket(second & _PT_MASK, sequence, timestamp, ssrc, bytes(data[offset:stop]),
                     bool(second & _MARKER_BIT), csrcs, extension, padding)


def build(packet: RTPPacket) -> bytes:
    """Encode ``packet``; the inverse of :func:`parse`. Out-of-range fields raise ValueError."""
    payload_type, sequence, timestamp, ssrc, payload, marker, csrcs, extension, padding = packet
    if not 0 <= payload_type <= _PT_MASK:
        raise ValueError(f"payload type {payload_type} is outside 0..127")
    if len(csrcs) > _CC_MASK:
        raise ValueError(f"{len(csrcs)} CSRCs, at most 15 fit the header")
    if not 0 <= padding <= 255:
        raise ValueError(f"padding of {padding} bytes is outside 0..255")
    first = _VERSION_2 | len(csrcs)
    if padding:
        first |= _PADDING_BIT
    if extension is not None:
        first |= _EXTENSION_BIT
    try:
        parts = [_HEADER.pack(first, payload_type | (_MARKER_BIT if marker else 0), sequence, timestamp, ssrc)]
        if csrcs:
            parts.append(_CSRCS[len(csrcs)].pack(*csrcs))
        if extension is not None:
            profile, data = extension
            if len(data) % 4:
                raise ValueError(f"header extension data of {len(data)} bytes is not a whole number of 32-bit words")
            parts.append(_EXTENSION_HEADER.pack(profile, len(data) // 4))
            parts.append(data)
    except struct.error as e:
        raise ValueError(f"RTP field out of range: {e}") from e
    parts.append(payload)
    if padding:
        parts.append(bytes(padding - 1) + bytes((padding,)))
    return b"".join(parts)


def header(payload_type: int, sequence: int, timestamp: int, ssrc: int, marker: bool = False) -> bytes:
    """The 12-byte header of a plain packet, for the sender's 20 ms hot path.

    Sequence and timestamp are reduced modulo 2**16 and 2**32, so a sender can just keep counting.
    """
    if not 0 <= payload_type <= _PT_MASK:
        raise ValueError(f"payload type {payload_type} is outside 0..127")
    try:
        return _HEADER.pack(_VERSION_2, payload_type | _MARKER_BIT if marker else payload_type,
                            sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)
    except struct.error as e:
        raise ValueError(f"SSRC {ssrc} is outside 0..2**32-1") from e


def seq_distance(a: int, b: int) -> int:
    """Signed shortest distance from sequence number ``a`` to ``b`` modulo 2**16.

    ``seq_distance(65535, 0) == 1`` and ``seq_distance(0, 65535) == -1``. The result lies in
    -32768..32767, so two numbers exactly half the space apart are -32768 in both directions.
    """
    distance = (b - a) & 0xFFFF
    return distance - 0x10000 if distance & 0x8000 else distance
