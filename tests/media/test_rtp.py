"""RTP parsing and building: known packets, every malformed shape, and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_agent.media import rtp
from twisted_agent.media.rtp import (
    RTPBadHeaderExtension,
    RTPBadPadding,
    RTPBadVersion,
    RTPError,
    RTPPacket,
    RTPTooShort,
    RTPTruncatedCSRC,
    build,
    header,
    parse,
    seq_distance,
)

# what Asterisk 22.10.1 sends on a format=ulaw ExternalMedia leg: V=2, PT 0, no marker, first timestamp 160
ASTERISK_ULAW = bytes.fromhex("80 00 5a3c 000000a0 1f2e3d4c") + bytes(range(96, 256))


def test_asterisk_ulaw_packet() -> None:
    packet = parse(ASTERISK_ULAW)
    assert packet == RTPPacket(0, 0x5A3C, 160, 0x1F2E3D4C, bytes(range(96, 256)))
    assert len(packet.payload) == 160
    assert packet.marker is False
    assert packet.csrcs == ()
    assert packet.extension is None
    assert packet.padding == 0
    assert build(packet) == ASTERISK_ULAW
    assert header(0, 0x5A3C, 160, 0x1F2E3D4C) + packet.payload == ASTERISK_ULAW


def test_slin16_packet() -> None:
    data = bytes.fromhex("80 76 0001 00000140 00000007") + bytes(640)
    packet = parse(data)
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc) == (118, 1, 320, 7)
    assert len(packet.payload) == 640


def test_marker() -> None:
    packet = parse(bytes.fromhex("80 88 ffff ffffffff ffffffff") + b"\xd5")
    assert packet.marker is True
    assert packet.payload_type == 8
    assert (packet.sequence, packet.timestamp, packet.ssrc) == (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert packet.payload == b"\xd5"


def test_padding_is_stripped() -> None:
    data = bytes.fromhex("a0 00 0001 00000002 00000003") + b"abc" + b"\x00\x00\x03"
    packet = parse(data)
    assert packet.payload == b"abc"
    assert packet.padding == 3
    assert build(packet) == data


def test_padding_may_take_the_whole_payload() -> None:
    packet = parse(bytes.fromhex("a0 00 0001 00000002 00000003 01"))
    assert packet.payload == b""
    assert packet.padding == 1


def test_extension_is_skipped_and_kept() -> None:
    data = bytes.fromhex("90 00 0001 00000002 00000003  bede 0002  01020304 05060708") + b"\xff" * 4
    packet = parse(data)
    assert packet.extension == (0xBEDE, bytes.fromhex("0102030405060708"))
    assert packet.payload == b"\xff" * 4
    assert build(packet) == data


def test_empty_extension() -> None:
    packet = parse(bytes.fromhex("90 00 0001 00000002 00000003  1000 0000") + b"x")
    assert packet.extension == (0x1000, b"")
    assert packet.payload == b"x"


def test_csrcs() -> None:
    data = bytes.fromhex("82 00 0001 00000002 00000003  0000000a 0000000b") + b"pay"
    packet = parse(data)
    assert packet.csrcs == (10, 11)
    assert packet.payload == b"pay"
    assert build(packet) == data


def test_everything_at_once() -> None:
    data = (bytes.fromhex("b1 e5 1234 00abcdef 01020304  cafebabe  0001 0001 aabbccdd") + b"voice"
            + b"\x00\x02")
    packet = parse(data)
    assert packet == RTPPacket(
        payload_type=101, sequence=0x1234, timestamp=0xABCDEF, ssrc=0x01020304, payload=b"voice",
        marker=True, csrcs=(0xCAFEBABE,), extension=(1, bytes.fromhex("aabbccdd")), padding=2)
    assert build(packet) == data


@pytest.mark.parametrize(("data", "error", "words"), [
    (b"", RTPTooShort, "0 bytes"),
    (b"\x80" * 11, RTPTooShort, "11 bytes"),
    (bytes(12), RTPBadVersion, "version 0"),
    (b"\x40" + bytes(20), RTPBadVersion, "version 1"),
    (b"\xc0" + bytes(20), RTPBadVersion, "version 3"),
    (b"\x83" + bytes(11 + 8), RTPTruncatedCSRC, "needs 24 bytes"),
    (b"\x8f" + bytes(11), RTPTruncatedCSRC, "packet has 12"),
    (b"\x90" + bytes(11) + b"\x00\x00", RTPBadHeaderExtension, "ends at 14"),
    (b"\x91" + bytes(11) + bytes(4) + bytes(3), RTPBadHeaderExtension, "starts at byte 16 but the packet ends at 19"),
    (b"\x90" + bytes(11) + b"\x00\x00\x00\x02" + bytes(7), RTPBadHeaderExtension, "needs 24 bytes"),
    (b"\xa0" + bytes(11), RTPBadPadding, "no byte follows"),
    (b"\xa0" + bytes(11) + b"abc\x00", RTPBadPadding, "pad count 0"),
    (b"\xa0" + bytes(11) + b"abc\x05", RTPBadPadding, "pad count 5 with 4 bytes"),
    (b"\xa1" + bytes(11) + b"\x00\x00\x00\x01" + b"\x02", RTPBadPadding, "pad count 2 with 1 bytes"),
    (b"\xb0" + bytes(11) + b"\x00\x00\x00\x01" + b"\x04\x04\x04\x04", RTPBadPadding, "no byte follows"),
])
def test_malformed_packets_raise_their_own_error(data: bytes, error: type[RTPError], words: str) -> None:
    with pytest.raises(error) as raised:
        parse(data)
    assert words in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(("packet", "words"), [
    (RTPPacket(128, 0, 0, 0, b""), "payload type 128"),
    (RTPPacket(-1, 0, 0, 0, b""), "payload type -1"),
    (RTPPacket(0, 0, 0, 0, b"", csrcs=tuple(range(16))), "16 CSRCs"),
    (RTPPacket(0, 0, 0, 0, b"", extension=(1, b"abc")), "3 bytes"),
    (RTPPacket(0, 0, 0, 0, b"", extension=(0x10000, b"")), "out of range"),
    (RTPPacket(0, 0, 0, 0, b"", padding=256), "padding of 256"),
    (RTPPacket(0, 0x10000, 0, 0, b""), "out of range"),
    (RTPPacket(0, 0, 2**32, 0, b""), "out of range"),
    (RTPPacket(0, 0, 0, -1, b""), "out of range"),
    (RTPPacket(0, 0, 0, 0, b"", csrcs=(2**32,)), "out of range"),
])
def test_build_refuses_fields_that_do_not_fit(packet: RTPPacket, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        build(packet)


def test_header_wraps_sequence_and_timestamp() -> None:
    assert header(0, 0x10005, 2**32 + 160, 9) == bytes.fromhex("80 00 0005 000000a0 00000009")
    assert header(8, 1, 2, 3, marker=True) == bytes.fromhex("80 88 0001 00000002 00000003")
    assert parse(header(127, 65535, 2**32 - 1, 2**32 - 1, marker=True)) == RTPPacket(
        127, 65535, 2**32 - 1, 2**32 - 1, b"", True)


@pytest.mark.parametrize(("args", "words"), [
    ((128, 0, 0, 0), "payload type 128"),
    ((-1, 0, 0, 0), "payload type -1"),
    ((0, 0, 0, 2**32), "SSRC"),
    ((0, 0, 0, -5), "SSRC"),
])
def test_header_refuses_bad_fields(args: tuple[int, int, int, int], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        header(*args)


def test_seq_distance_examples() -> None:
    assert seq_distance(65535, 0) == 1
    assert seq_distance(0, 65535) == -1
    assert seq_distance(100, 100) == 0
    assert seq_distance(100, 103) == 3
    assert seq_distance(65500, 20) == 56
    assert seq_distance(0, 32767) == 32767
    assert seq_distance(0, 32768) == -32768
    assert seq_distance(32768, 0) == -32768


u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
extensions = st.none() | st.tuples(u16, st.integers(0, 8).flatmap(lambda words: st.binary(min_size=4 * words,
                                                                                           max_size=4 * words)))
packets = st.builds(
    RTPPacket,
    payload_type=st.integers(0, 127),
    sequence=u16,
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=400),
    marker=st.booleans(),
    csrcs=st.lists(u32, max_size=15).map(tuple),
    extension=extensions,
    padding=st.just(0) | st.integers(1, 255),
)


@given(packets)
def test_build_parse_round_trip(packet: RTPPacket) -> None:
    data = build(packet)
    extension_size = 4 + len(packet.extension[1]) if packet.extension is not None else 0
    assert len(data) == 12 + 4 * len(packet.csrcs) + extension_size + len(packet.payload) + packet.padding
    assert parse(data) == packet


# bytes that mostly start like RTP, so the interesting branches are reached and not just "version 1"
rtp_like = st.builds(lambda first, rest: bytes([first]) + rest, st.integers(0x80, 0xBF), st.binary(max_size=80))


@given(st.binary(max_size=80) | rtp_like)
def test_parse_raises_only_rtp_errors_and_agrees_with_build(data: bytes) -> None:
    try:
        packet = parse(data)
    except RTPError:
        return
    rebuilt = build(packet)
    # build zeroes padding bytes; everything else, and the pad count itself, comes back as it went
    body = len(data) - packet.padding
    assert len(rebuilt) == len(data)
    assert rebuilt[:body] == data[:body]
    assert rebuilt[-1:] == data[-1:]


@given(st.binary(min_size=12, max_size=60).map(lambda rest: b"\x80" + rest[1:]))
def test_fast_path_agrees_with_the_general_parser(data: bytes) -> None:
    assert parse(data) == rtp._parse_general(data)


@given(st.integers(0, 127), u16, st.integers(0, 2**40), u32, st.booleans())
def test_header_is_what_build_makes(payload_type: int, sequence: int, timestamp: int, ssrc: int,
                                    marker: bool) -> None:
    expected = build(RTPPacket(payload_type, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc, b"", marker))
    assert header(payload_type, sequence, timestamp, ssrc, marker) == expected
    assert struct.unpack("!BBHII", expected)[0] == 0x80


@given(u16, u16)
def test_seq_distance_is_antisymmetric(a: int, b: int) -> None:
    distance = seq_distance(a, b)
    assert -32768 <= distance <= 32767
    if distance != -32768:
        assert seq_distance(b, a) == -distance


@given(u16, st.integers(-32768, 32767))
def test_seq_distance_undoes_wrapping_addition(a: int, step: int) -> None:
    assert seq_distance(a, (a + step) % 65536) == step
