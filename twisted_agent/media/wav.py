"""16-bit mono PCM WAV files: what espeak-ng writes, and what an operator may give as a sound."""

from __future__ import annotations

import struct

__all__ = ["WavError", "parse_wav"]


class WavError(ValueError):
    """Bytes that are not a 16-bit PCM mono WAV."""


def parse_wav(data: bytes) -> tuple[bytes, int]:
    """The s16le samples and the sample rate of a RIFF/WAVE file of 16-bit mono PCM.

    Walks the chunks (so LIST or fact chunks before the data are skipped). A WAV written to a pipe
    cannot go back to fill in its sizes: espeak-ng --stdout declares 0x7ffff000-odd bytes, others 0
    or 0xffffffff; the data then runs to the end of the bytes (trimmed to whole samples).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    offset = 12
    rate = 0
    while offset + 8 <= len(data):
        chunk_id = data[offset:offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise WavError("truncated fmt chunk")
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if fmt == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: the format is the subformat GUID's first word
                (fmt,) = struct.unpack_from("<H", data, body + 24)
            if fmt != 1 or bits != 16 or channels != 1:
                raise WavError(f"need 16-bit mono PCM, got format {fmt}, {bits} bits, {channels} channel(s)")
            if rate <= 0:
                raise WavError(f"bad sample rate {rate}")
        elif chunk_id == b"data":
            if not rate:
                raise WavError("data chunk before the fmt chunk")
            end = len(data) if size in (0, 0xFFFFFFFF) or body + size > len(data) else body + size
            end -= (end - body) % 2
            return data[body:end], rate
        offset = body + size + (size & 1)  # chunks are padded to an even length
    raise WavError("no data chunk")
