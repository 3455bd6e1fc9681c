"""AudioSocket framing: exact bytes, every kind, any TCP chunking, typed errors, linear decoding."""

from __future__ import annotations

import itertools
import random
import struct
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_agent.media import audiosocket_framing as af
from twisted_agent.media.audiosocket_framing import (
    AudioSocketBadAudio,
    AudioSocketBadDTMF,
    AudioSocketBadUUID,
    AudioSocketDecoder,
    AudioSocketError,
    AudioSocketUnknownKind,
)

CALL_UUID = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
FRAME_20MS = bytes(range(256)) + bytes(range(64))  # 320 bytes: one 20 ms slin frame with every byte value


def decode_all(stream: bytes, chunks: list[int] | None = None) -> list[tuple[int, bytes]]:
    """Feed ``stream`` cut at the ``chunks`` offsets (sorted, may repeat) and collect every frame."""
    decoder = AudioSocketDecoder()
    cuts = [0, *(chunks or []), len(stream)]
    out: list[tuple[int, bytes]] = []
    for a, b in itertools.pairwise(cuts):
        out.extend(decoder.feed(stream[a:b]))
    assert decoder.buffered == 0
    return out


def call_stream(frames: int = 50) -> tuple[bytes, list[tuple[int, bytes]]]:
    """What Asterisk sends for a short slin call: UUID, audio every 20 ms, then (from us) a hang-up."""
    expected = [(af.UUID, CALL_UUID.bytes)]
    for i in range(frames):
        expected.append((af.AUDIO_SLIN, struct.pack("<H", i & 0xFFFF) + FRAME_20MS[2:]))
    expected.append((af.HANGUP, b""))
    return b"".join(af.encode_frame(k, p) for k, p in expected), expected


# --- encoding -----------------------------------------------------------------------------------


def test_header_is_kind_then_big_endian_length():
    assert af.encode_frame(af.AUDIO_SLIN, b"\x01\x02") == b"\x10\x00\x02\x01\x02"
    assert af.encode_frame(af.AUDIO_SLIN, FRAME_20MS)[:3] == b"\x10\x01\x40"  # 320 = 0x0140
    assert af.hangup_frame() == b"\x00\x00\x00"
    assert af.uuid_frame(CALL_UUID) == b"\x01\x00\x10" + CALL_UUID.bytes
    assert af.dtmf_frame("#") == b"\x03\x00\x01#"


def test_kind_values_match_asterisk_22():
    assert (af.HANGUP, af.UUID, af.DTMF, af.ERROR) == (0x00, 0x01, 0x03, 0xFF)
    assert af.AUDIO_RATES == {
        0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000,
        0x15: 44100, 0x16: 48000, 0x17: 96000, 0x18: 192000,
    }
    assert af.kind_name(0x10) == "slin" and af.kind_name(0x12) == "slin16" and af.kind_name(0x42) == "0x42"


@pytest.mark.parametrize(("rate", "kind"), sorted((r, k) for k, r in af.AUDIO_RATES.items()))
def test_audio_frame_labels_every_rate(rate: int, kind: int):
    pcm = b"\x34\x12" * 8  # little-endian 0x1234, passed through unswapped
    frame = af.audio_frame(pcm, rate)
    assert frame == bytes([kind]) + struct.pack(">H", 16) + pcm
    assert decode_all(frame) == [(kind, pcm)]


def test_audio_frame_default_is_8khz_slin():
    assert af.audio_frame(FRAME_20MS)[0] == af.AUDIO_SLIN


def test_audio_frame_rejects_a_rate_without_a_kind():
    with pytest.raises(ValueError, match="no audio kind for 22050 Hz"):
        af.audio_frame(FRAME_20MS, 22050)


def test_payload_length_limit():
    assert len(af.encode_frame(af.ERROR, bytes(65535))) == 3 + 65535
    with pytest.raises(ValueError, match="65536 bytes"):
        af.encode_frame(af.ERROR, bytes(65536))
    with pytest.raises(ValueError):
        af.audio_frame(bytes(65536))


@pytest.mark.parametrize("pcm", [b"", b"\x00\x01\x02"])
def test_encoding_refuses_audio_asterisk_would_reject(pcm: bytes):
    with pytest.raises(ValueError, match="whole 16-bit samples"):
        af.audio_frame(pcm)


def test_encoding_refuses_a_kind_outside_a_byte():
    with pytest.raises(ValueError):
        af.encode_frame(256, b"")


@pytest.mark.parametrize("digit", ["", "12", "a", "E", "é"])
def test_dtmf_frame_refuses_non_digits(digit: str):
    with pytest.raises(ValueError):
        af.dtmf_frame(digit)


# --- decoding every kind ------------------------------------------------------------------------


def test_decodes_every_kind():
    frames = [
        (af.UUID, CALL_UUID.bytes),
        (af.DTMF, b"5"),
        *((kind, FRAME_20MS) for kind in af.AUDIO_RATES),
        (af.ERROR, b"\x02"),
        (af.HANGUP, b""),
    ]
    assert decode_all(b"".join(af.encode_frame(k, p) for k, p in frames)) == frames


def test_uuid_frame_from_16_raw_bytes():
    [(kind, payload)] = decode_all(b"\x01\x00\x10" + CALL_UUID.bytes)
    assert kind == af.UUID
    assert af.parse_uuid(payload) == CALL_UUID
    assert str(af.parse_uuid(payload)) == "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_dtmf_digits(digit: str):
    [(kind, payload)] = decode_all(af.dtmf_frame(digit))
    assert kind == af.DTMF
    assert af.parse_dtmf(payload) == digit


def test_hangup_with_and_without_payload():
    assert decode_all(b"\x00\x00\x00") == [(af.HANGUP, b"")]
    assert decode_all(b"\x00\x00\x01\x07") == [(af.HANGUP, b"\x07")]


def test_audio_payload_is_passed_through_little_endian():
    pcm = struct.pack("<3h", 1, -2, 32767)
    [(kind, payload)] = decode_all(af.audio_frame(pcm))
    assert struct.unpack("<3h", payload) == (1, -2, 32767)


# --- chunking -----------------------------------------------------------------------------------


def test_partial_frame_is_held_until_complete():
    decoder = AudioSocketDecoder()
    frame = af.audio_frame(FRAME_20MS)
    assert decoder.feed(frame[:2]) == []  # not even a whole header
    assert decoder.buffered == 2
    assert decoder.feed(frame[2:100]) == []
    assert decoder.buffered == 100
    assert decoder.feed(frame[100:] + frame[:1]) == [(af.AUDIO_SLIN, FRAME_20MS)]
    assert decoder.buffered == 1
    assert decoder.feed(frame[1:]) == [(af.AUDIO_SLIN, FRAME_20MS)]
    assert decoder.buffered == 0
    assert decoder.frames_decoded == 2
    assert decoder.bytes_fed == 2 * len(frame)


def test_empty_feed_is_harmless():
    decoder = AudioSocketDecoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\x10")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1


def test_call_stream_whole_byte_by_byte_and_random_chunks():
    stream, expected = call_stream(50)
    assert len(stream) == 19 + 50 * 323 + 3
    assert decode_all(stream) == expected
    assert decode_all(stream, list(range(1, len(stream)))) == expected
    rng = random.Random(1234)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 200)))
        assert decode_all(stream, cuts) == expected


def test_accepts_bytearray_and_memoryview_reads():
    decoder = AudioSocketDecoder()
    frame = af.audio_frame(FRAME_20MS)
    assert decoder.feed(memoryview(frame)[:7]) == []
    assert decoder.feed(bytearray(frame[7:]) + frame[:3]) == [(af.AUDIO_SLIN, FRAME_20MS)]
    assert decoder.feed(memoryview(frame)[3:]) == [(af.AUDIO_SLIN, FRAME_20MS)]


def test_payload_bytes_are_independent_of_the_input_buffer():
    decoder = AudioSocketDecoder()
    data = bytearray(af.audio_frame(FRAME_20MS))
    [(_, payload)] = decoder.feed(data)
    data[5] ^= 0xFF
    assert payload == FRAME_20MS


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[int, bytes]:
    kind = draw(st.sampled_from([af.HANGUP, af.UUID, af.DTMF, af.ERROR, *af.AUDIO_RATES]))
    if kind == af.UUID:
        payload = draw(st.binary(min_size=16, max_size=16))
    elif kind == af.DTMF:
        payload = draw(st.sampled_from(list(b"0123456789*#ABCD"))).to_bytes(1, "big")
    elif kind in af.AUDIO_RATES:
        payload = draw(st.binary(min_size=1, max_size=400).filter(lambda b: len(b) % 2 == 0))
    else:
        payload = draw(st.binary(max_size=8))
    return kind, payload


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], bytes, list[int]]:
    frames = draw(st.lists(valid_frames(), max_size=30))
    stream = b"".join(af.encode_frame(k, p) for k, p in frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=60)))
    return frames, stream, cuts


@given(chunked_streams())
def test_any_chunking_yields_the_frames_of_the_unchunked_stream(case: tuple[list[tuple[int, bytes]], bytes, list[int]]):
    frames, stream, cuts = case
    assert decode_all(stream) == frames
    assert decode_all(stream, cuts) == frames


@given(valid_frames())
def test_encode_then_decode_round_trips(frame: tuple[int, bytes]):
    assert decode_all(af.encode_frame(*frame)) == [frame]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0x02, 0x04, 0x0F, 0x19, 0x20, 0x80, 0xFE])
def test_unknown_kind(kind: int):
    with pytest.raises(AudioSocketUnknownKind, match=f"0x{kind:02x}") as info:
        AudioSocketDecoder().feed(bytes([kind, 0, 1, 0]))
    assert info.value.kind == kind


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x10\x00\x00", AudioSocketBadAudio),  # Asterisk rejects length < 1 for audio
        (b"\x12\x00\x00", AudioSocketBadAudio),
        (b"\x10\x00\x03abc", AudioSocketBadAudio),  # half a sample
        (b"\x01\x00\x0f" + bytes(15), AudioSocketBadUUID),
        (b"\x01\x00\x11" + bytes(17), AudioSocketBadUUID),
        (b"\x01\x00\x00", AudioSocketBadUUID),
        (b"\x03\x00\x01a", AudioSocketBadDTMF),
        (b"\x03\x00\x01\x05", AudioSocketBadDTMF),
        (b"\x03\x00\x02" + b"12", AudioSocketBadDTMF),
        (b"\x03\x00\x00", AudioSocketBadDTMF),
    ],
)
def test_malformed_frames_raise_typed_errors(data: bytes, error: type[AudioSocketError]):
    with pytest.raises(error):
        AudioSocketDecoder().feed(data)
    assert issubclass(error, AudioSocketError) and issubclass(error, ValueError)


def test_parse_helpers_raise_typed_errors():
    with pytest.raises(AudioSocketBadUUID):
        af.parse_uuid(bytes(15))
    with pytest.raises(AudioSocketBadDTMF):
        af.parse_dtmf(b"x")


def test_error_keeps_the_good_frames_before_it_and_poisons_the_stream():
    decoder = AudioSocketDecoder()
    good = af.uuid_frame(CALL_UUID) + af.audio_frame(FRAME_20MS)
    with pytest.raises(AudioSocketUnknownKind) as info:
        decoder.feed(good + b"\x02\x00\x00" + af.audio_frame(FRAME_20MS))
    assert info.value.frames == [(af.UUID, CALL_UUID.bytes), (af.AUDIO_SLIN, FRAME_20MS)]
    assert decoder.frames_decoded == 2
    # Framing is lost after a bad frame: even valid bytes are refused from now on.
    with pytest.raises(AudioSocketUnknownKind, match="already failed"):
        decoder.feed(af.audio_frame(FRAME_20MS))


def test_error_in_a_frame_completed_across_feeds():
    decoder = AudioSocketDecoder()
    assert decoder.feed(b"\x01\x00\x0f" + bytes(10)) == []
    with pytest.raises(AudioSocketBadUUID):
        decoder.feed(bytes(5))


# --- resources ----------------------------------------------------------------------------------


def test_a_corrupt_length_buffers_at_most_one_maximal_frame():
    decoder = AudioSocketDecoder()
    # A length of 0xFFFF where 320 was meant: the decoder waits for 65535 bytes and no more.
    assert decoder.feed(b"\x10\xff\xff" + bytes(65534)) == []
    assert decoder.buffered == af.MAX_FRAME_BYTES - 1
    # ...and then sees that 65535 bytes cannot be 16-bit audio.
    with pytest.raises(AudioSocketBadAudio, match="65535 bytes"):
        decoder.feed(bytes(1) + af.hangup_frame())
    assert decoder.buffered == 0


def test_a_maximal_frame_decodes():
    frames = decode_all(af.encode_frame(af.ERROR, bytes(65535)) + af.hangup_frame(), [1, 2, 3, 40000])
    assert [(k, len(p)) for k, p in frames] == [(af.ERROR, 65535), (af.HANGUP, 0)]


def test_large_stream_decodes_in_linear_time():
    def best_of_three(count: int) -> float:
        stream, expected = call_stream(count)
        times = []
        for _ in range(3):
            decoder = AudioSocketDecoder()
            started = time.perf_counter()
            # One huge read (a quadratic decoder re-slicing its buffer dies here) and 4 KiB reads.
            frames = decoder.feed(stream)
            for offset in range(0, len(stream), 4096):
                frames.extend(decoder.feed(stream[offset:offset + 4096]))
            times.append(time.perf_counter() - started)
            assert frames == expected + expected
        return min(times)

    best_of_three(1000)  # warm-up
    small, large = best_of_three(10_000), best_of_three(20_000)
    assert large < 3 * small, f"10k frames {small * 1e3:.1f} ms, 20k frames {large * 1e3:.1f} ms: not linear"
