"""Real speech (espeak-ng + sox) and synthetic signals for media tests.

Everything here is 8 kHz, mono, signed 16-bit little-endian PCM, the format that crosses the
media seams (see :mod:`twisted_agent.media.interfaces`).

Speech is synthesised once per test session: the files live in one temporary directory that is
removed at interpreter exit, and the PCM is memoised, so any number of tests (and test modules)
can ask for the same sentence for the cost of one espeak-ng run.

Tests that need speech call :func:`require_speech_tools` first: without espeak-ng or sox it
skips the test, except when ``CI`` is set, where it fails, because CI is supposed to have them
(the Makefile installs them) and a silently skipped VAD test would hide a broken pipeline.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from array import array
from dataclasses import dataclass
from functools import cache

from tests.helpers import unavailable
from twisted_agent.media.interfaces import FRAME_BYTES, SAMPLE_RATE

SENTENCE = "Hello, what are your opening hours on Saturday?"
"""The sentence of the shared OFFLINE_MODELS.md reference measurements (3.3 s at 150 wpm)."""

_FULL_SCALE = 32767
# Where an espeak clip is cut: the first and last sample louder than this are the speech edges.
# -40 dBFS is below any phoneme espeak produces and far above its digital-zero padding.
_EDGE_DBFS = -40.0

_workdir: str | None = None


def _tmpdir() -> str:
    global _workdir
    if _workdir is None:
        _workdir = tempfile.mkdtemp(prefix="twisted-agent-speech-")
        atexit.register(shutil.rmtree, _workdir, True)
    return _workdir


def missing_tools() -> list[str]:
    """Which of the external programs speech synthesis needs are not on PATH."""
    return [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]


def require_speech_tools() -> None:
    """Skip the calling test if espeak-ng/sox are missing, or fail it when running in CI."""
    missing = missing_tools()
    if not missing:
        return
    message = (f"{' and '.join(missing)} not installed: real-speech tests need them "
               "(apt-get install espeak-ng sox, or `make test`, which installs them)")
    unavailable(message)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")


@cache
def _synthesise(text: str, telephone: bool, voice: str, wpm: int) -> bytes:
    key = hashlib.sha256(f"{text}\0{voice}\0{wpm}".encode()).hexdigest()[:16]
    work = _tmpdir()
    wav = os.path.join(work, f"{key}.wav")
    raw = os.path.join(work, f"{key}{'-tel' if telephone else ''}.raw")
    if not os.path.exists(wav):
        _run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", wav, text])
    if not os.path.exists(raw):
        # -D: no dither and -R: repeatable, so the same text gives the same bytes every run.
        out = ["-t", "raw", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-L"]
        if telephone:
            # The phone-line copy of OFFLINE_MODELS.md: 300-3400 Hz band-pass, then a G.711 μ-law round trip.
            ulaw = os.path.join(work, f"{key}-ulaw.wav")
            _run(["sox", "-D", "-R", wav, "-r", str(SAMPLE_RATE), "-c", "1", "-e", "mu-law", ulaw, "sinc", "300-3400"])
            _run(["sox", "-D", "-R", ulaw, *out, raw])
        else:
            _run(["sox", "-D", "-R", wav, *out, raw])
    with open(raw, "rb") as f:
        return f.read()


def samples(pcm: bytes) -> array[int]:
    """The PCM as an array of ints (host order converted from little-endian)."""
    values = array("h")
    values.frombytes(pcm)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def to_pcm(values: array[int]) -> bytes:
    if sys.byteorder == "big":
        values = array("h", values)
        values.byteswap()
    return values.tobytes()


def speech_edges(pcm: bytes, threshold_dbfs: float = _EDGE_DBFS) -> tuple[int, int]:
    """Sample indices ``[first, last + 1)`` of the audio louder than ``threshold_dbfs``."""
    level = _FULL_SCALE * 10 ** (threshold_dbfs / 20)
    values = samples(pcm)
    loud = [i for i, v in enumerate(values) if abs(v) > level]
    if not loud:
        raise ValueError("no audio above the threshold")
    return loud[0], loud[-1] + 1


@dataclass(frozen=True)
class Clip:
    """Speech with known edges: ``pcm`` holds ``start_s`` of silence, speech, then silence to the end."""

    pcm: bytes
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE


def speech(text: str = SENTENCE, *, telephone: bool = False, voice: str = "en-us", wpm: int = 150) -> bytes:
    """espeak-ng saying ``text`` at 8 kHz, cut to its first and last audible sample.

    ``telephone=True`` gives the same samples after a 300-3400 Hz band-pass and a μ-law round trip,
    cut at the same sample indices as the clean copy so the two line up exactly.
    """
    require_speech_tools()
    clean = _synthesise(text, False, voice, wpm)
    first, end = speech_edges(clean)
    source = _synthesise(text, True, voice, wpm) if telephone else clean
    return source[2 * first:2 * end]


def padded_speech(text: str = SENTENCE, *, telephone: bool = False, pad_ms: int = 1000) -> Clip:
    """:func:`speech` with ``pad_ms`` of digital silence each side (as OFFLINE_MODELS.md's ``*_pad`` clips)."""
    voiced = speech(text, telephone=telephone)
    pad = silence(pad_ms)
    return Clip(pad + voiced + pad, pad_ms / 1000, pad_ms / 1000 + len(voiced) / 2 / SAMPLE_RATE)


def silence(ms: int) -> bytes:
    """Digital silence (all-zero samples)."""
    return bytes(2 * SAMPLE_RATE * ms // 1000)


def white_noise(ms: int, dbfs: float, seed: int = 0) -> bytes:
    """Gaussian white noise with an RMS level of ``dbfs`` (relative to full scale), reproducible per seed."""
    rng = random.Random(seed)
    sigma = _FULL_SCALE * 10 ** (dbfs / 20)
    count = SAMPLE_RATE * ms // 1000
    return to_pcm(array("h", (max(-32768, min(32767, round(rng.gauss(0.0, sigma)))) for _ in range(count))))


def tone(ms: int, hz: float, dbfs: float) -> bytes:
    """A sine of peak level ``dbfs``."""
    peak = _FULL_SCALE * 10 ** (dbfs / 20)
    count = SAMPLE_RATE * ms // 1000
    return to_pcm(array("h", (round(peak * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)) for i in range(count))))


def gain(pcm: bytes, db: float) -> bytes:
    """The PCM scaled by ``db`` decibels (clipped to 16 bits)."""
    factor = 10 ** (db / 20)
    return to_pcm(array("h", (max(-32768, min(32767, round(v * factor))) for v in samples(pcm))))


def rms_dbfs(pcm: bytes) -> float:
    values = samples(pcm)
    if not values:
        return -math.inf
    mean_square = sum(v * v for v in values) / len(values)
    return -math.inf if mean_square == 0 else 10 * math.log10(mean_square) - 20 * math.log10(_FULL_SCALE)


def frames(pcm: bytes) -> list[bytes]:
    """Split into 20 ms frames; a short last frame is padded with silence, as a media leg would."""
    out = [pcm[i:i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    if out and len(out[-1]) < FRAME_BYTES:
        out[-1] = out[-1] + bytes(FRAME_BYTES - len(out[-1]))
    return out
