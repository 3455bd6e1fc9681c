"""Speech to text with Whisper, in worker processes (:mod:`twisted_agent.providers.local.workers`).

A caller's turn arrives as 8 kHz s16le PCM. The worker resamples it to 16 kHz with the project's
soxr resampler (not ``audioop.ratecv``: soxr keeps the telephone band intact), measures how much of
it is voiced (the media plane's :class:`~twisted_agent.media.vad.FrameVAD`), and only then runs
the model: openai-whisper (default) or faster-whisper (``STT_BACKEND=faster-whisper``, int8, when
installed), greedy, temperature 0, no timestamps, no conditioning on previous text.

**Hallucination guard.** Whisper writes text for any audio, silence and line noise included:
"Thank you.", "you", "Bye.", subtitle credits. A turn is suppressed (``Transcript.suppressed``,
empty text, a reason, counted per reason) when:

* it holds less than ``min_voiced_ms`` (200 ms) of voiced audio: the model is not even run;
* Whisper itself says so: ``no_speech_prob > 0.6 and avg_logprob < -1.0`` (per segment, the rule
  openai-whisper applies internally; it is switched off there so the guard sees and counts it);
* the text is a known phantom phrase *and* the confidence is low (``no_speech_prob > 0.3`` or
  ``avg_logprob < -0.7``): a caller who really says "thank you" is recognised with
  ``avg_logprob`` near -0.1 and ``no_speech_prob`` under 0.1 (measured on Piper speech);
* the text is a subtitle credit ("Subtitles by the Amara.org community"): nobody says that on a
  phone line, so it is dropped whatever the confidence;
* the text loops (gzip compression ratio above 2.4: "you you you you ..."), or has no words.

Language: English-only models (``tiny.en``) always get "en". A multilingual model gets the call's
language ("en-US" -> "en"); with none, or a code Whisper does not know, it detects the language
(base: 1.1 s for a 3 s turn with the language given, 1.9 s detecting it).

Threads: each worker runs torch (or CTranslate2) with ``threads`` intra-op threads, by default
``(cores - 1) // workers`` (at least 1), leaving a core to the reactor and the language model.
Measured on the 2-core box (tiny.en, a 3 s turn): 270 ms with 2 threads on an idle machine, 470 ms
with 1; but with one other busy process, 2 threads took 0.9-2 s (OpenMP threads wait on each
other) while 1 thread stayed at 480 ms. The worker also sets ``OMP_WAIT_POLICY=PASSIVE``.

**Window.** openai-whisper's ``transcribe`` pads every turn to 30 s of audio, and the encoder's cost
grows with that window, not with the turn. A turn of ``d`` seconds (at most 25) is instead padded to
``max(stt_window, d + 5)`` seconds (``STT_WINDOW``, 10 by default) and decoded once: tiny.en, 1
thread, a 3 s turn, 165 ms instead of 450 ms, with the same text on 10 Piper test phrases. Whisper
was trained on 30 s windows: with under ~2 s of silence after the speech it loops ("Yes. Yes.
Yes."), hence the 10 s floor and the 5 s margin; and output that still looks broken (compression
ratio above 2.4, or no end before ``10 + 6 * d`` tokens) is thrown away and the turn re-run on the
full window (counted, with the reason, in :meth:`WhisperSTT.stats`). Longer turns, ``STT_WINDOW=30``
and faster-whisper (CTranslate2's encoder only takes 30 s) always use the full window.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import AgentConfig, LocalProviderConfig
from twisted_agent.providers.local.interfaces import ISpeechToText, ModelStatus, Transcript
from twisted_agent.providers.local.workers import JobResult, WorkerPool

__all__ = [
    "FASTER_WHISPER",
    "OPENAI_WHISPER",
    "Recognition",
    "Segment",
    "WhisperSTT",
    "judge",
]

OPENAI_WHISPER = "openai-whisper"
FASTER_WHISPER = "faster-whisper"
_MODULES = {OPENAI_WHISPER: "whisper", FASTER_WHISPER: "faster_whisper"}

WHISPER_RATE = 16000

# The guard's thresholds (see the module docstring).
NO_SPEECH_PROB = 0.6
LOGPROB = -1.0
PHANTOM_NO_SPEECH_PROB = 0.3
PHANTOM_LOGPROB = -0.7
COMPRESSION_RATIO = 2.4
MIN_VOICED_MS = 200

# The encoder's window (see the module docstring), in seconds.
FULL_WINDOW = 30.0  # Whisper's own
WINDOW_MARGIN = 5.0  # silence after the turn, at least: with less Whisper loops
MAX_SHORT_TURN = FULL_WINDOW - WINDOW_MARGIN
WARM_UP_WINDOW = 10.0

#: What Whisper says to silence and noise, after :func:`normalise_text`.
PHANTOM_PHRASES = frozenset({
    "thank you", "thank you very much", "thanks", "thanks for watching", "thank you for watching",
    "thank you so much for watching", "thanks for listening", "thank you for listening",
    "you", "bye", "bye bye", "goodbye", "oh", "so", "okay", "ok", "hmm", "uh", "um", "ah",
    "please subscribe", "like and subscribe", "see you next time", "see you in the next video",
    "i'm sorry", "music", "applause", "silence", "the end",
})
#: Subtitle credits Whisper learned from film subtitles.
_CREDIT = re.compile(r"\b(subtitles?|captions?|captioning|transcri(bed|ption)|translated) by\b|amara\.org"
                     r"|\bsubtitles? (made|provided)\b")
_NOT_WORD = re.compile(r"[^\w']+")


def normalise_text(text: str) -> str:
    """Lower case, punctuation and extra spaces gone: ``" Thank you."`` -> ``"thank you"``."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class Segment:
    text: str
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float


@dataclass(frozen=True)
class Recognition:
    """What a worker sends back: the raw segments and where the time went."""

    segments: tuple[Segment, ...]
    language: str
    voiced_ms: int
    duration_ms: int
    timings: dict[str, float] = field(default_factory=dict)
    ran_model: bool = True
    fallback: str = ""  # why the short window's output was thrown away, when it was


@dataclass(frozen=True)
class Verdict:
    text: str
    no_speech_prob: float
    avg_logprob: float
    key: str = ""  # short reason, for the counters: "" when kept
    reason: str = ""  # the same, with the figures that decided it


def judge(recognition: Recognition, min_voiced_ms: int = MIN_VOICED_MS) -> Verdict:
    """The hallucination guard: the text to keep, or why there is none."""
    segments = recognition.segments
    no_speech = max((s.no_speech_prob for s in segments), default=1.0)
    logprob = sum(s.avg_logprob for s in segments) / len(segments) if segments else 0.0
    if recognition.voiced_ms < min_voiced_ms:
        return Verdict("", no_speech, logprob, "too little speech",
                       f"too little speech: {recognition.voiced_ms} ms voiced, under {min_voiced_ms} ms")
    kept = [s for s in segments if not (s.no_speech_prob > NO_SPEECH_PROB and s.avg_logprob < LOGPROB)]
    if not kept:
        return Verdict("", no_speech, logprob, "no speech",
                       f"no speech: no_speech_prob {no_speech:.2f} > {NO_SPEECH_PROB} and "
                       f"avg_logprob {logprob:.2f} < {LOGPROB}")
    text = "".join(s.text for s in kept).strip()
    no_speech = max(s.no_speech_prob for s in kept)
    logprob = sum(s.avg_logprob for s in kept) / len(kept)
    words = normalise_text(text)
    if not words:
        return Verdict("", no_speech, logprob, "no words", f"no words: {text!r}")
    if _CREDIT.search(words):
        return Verdict("", no_speech, logprob, "subtitle credit", f"subtitle credit: {text!r}")
    if words in PHANTOM_PHRASES and (no_speech > PHANTOM_NO_SPEECH_PROB or logprob < PHANTOM_LOGPROB):
        return Verdict("", no_speech, logprob, "phantom phrase",
                       f"phantom phrase {text!r} with low confidence: no_speech_prob {no_speech:.2f}, "
                       f"avg_logprob {logprob:.2f}")
    ratio = max(s.compression_ratio for s in kept)
    if ratio > COMPRESSION_RATIO:
        return Verdict("", no_speech, logprob, "repetition",
                       f"repetition: compression ratio {ratio:.1f} > {COMPRESSION_RATIO} in {text[:60]!r}")
    return Verdict(text, no_speech, logprob)


# -- the worker side --------------------------------------------------------------------------------

_engine: Any = None  # the loaded model, one per worker process
_backend = ""
_multilingual = False
_languages: frozenset[str] = frozenset()  # the codes the model knows


def load_whisper(backend: str, path: str, threads: int) -> None:
    """Worker initializer: load the model once, and run it once so the first turn is not slower."""
    global _engine, _backend, _multilingual, _languages
    # OpenMP threads that spin while waiting steal the CPU other processes need (see the docstring)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # importlib: these untyped, optional libraries stay out of mypy's sight
    if backend == FASTER_WHISPER:
        faster_whisper = importlib.import_module("faster_whisper")
        _engine = faster_whisper.WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads)
        _multilingual = bool(_engine.model.is_multilingual)
        _languages = frozenset(importlib.import_module("faster_whisper.tokenizer")._LANGUAGE_CODES)
    else:
        # openai-whisper only needs triton for CUDA kernels; never import its 1 GB on a CPU box
        sys.modules.setdefault("triton", None)  # type: ignore[arg-type]
        torch = importlib.import_module("torch")
        whisper = importlib.import_module("whisper")
        torch.set_num_threads(threads)
        _engine = whisper.load_model(path, device="cpu")
        _engine.encoder.forward = types.MethodType(_encode_any_window, _engine.encoder)
        _multilingual = bool(_engine.is_multilingual)
        _languages = frozenset(importlib.import_module("whisper.tokenizer").LANGUAGES)
    _backend = backend
    warm_up = _warm_up_audio()
    _infer(warm_up, "en")
    if backend == OPENAI_WHISPER:
        _decode_window(warm_up, "en", window_frames(WARM_UP_WINDOW), sample_len(len(warm_up) / WHISPER_RATE))


def _encode_any_window(encoder: Any, mel: Any) -> Any:
    """openai-whisper's ``AudioEncoder.forward``, for a mel window of up to 30 s, not only 30 s.

    The stock method asserts the input is exactly 3000 frames (30 s); the model itself only needs
    the positional embedding cut to the input's length. Bound to the encoder at load time, so
    ``whisper.decoding.decode`` runs it on the short windows :func:`_decode_window` makes.
    ``mel``: (batch, n_mels, frames), an even number of frames, at most 3000.
    """
    import torch.nn.functional as F

    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x))
    x = x.permute(0, 2, 1)
    x = (x + encoder.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)


def _warm_up_audio() -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal(WHISPER_RATE) * 0.01).astype(np.float32)


def _infer(audio: Any, language: str | None) -> tuple[list[Segment], str]:
    options: dict[str, Any] = {
        "language": language, "temperature": 0.0, "condition_on_previous_text": False,
        "without_timestamps": True,
        # the guard applies this rule itself, so it can see and count what it drops
        "no_speech_threshold": None,
    }
    if _backend == FASTER_WHISPER:
        found, info = _engine.transcribe(audio, beam_size=1, vad_filter=False, **options)
        segments = [Segment(s.text, float(s.no_speech_prob), float(s.avg_logprob), float(s.compression_ratio))
                    for s in found]
        return segments, str(info.language)
    result = _engine.transcribe(audio, fp16=False, beam_size=None, verbose=None, **options)
    segments = [Segment(s["text"], float(s["no_speech_prob"]), float(s["avg_logprob"]), float(s["compression_ratio"]))
                for s in result["segments"]]
    return segments, str(result.get("language") or language or "en")


def window_seconds(duration: float, stt_window: float) -> float:
    """The encoder's window for a turn of ``duration`` seconds: ``FULL_WINDOW`` means the stock path."""
    if duration > MAX_SHORT_TURN or stt_window >= FULL_WINDOW:
        return FULL_WINDOW
    return min(FULL_WINDOW, max(stt_window, duration + WINDOW_MARGIN))


def window_frames(seconds: float) -> int:
    """Mel frames (10 ms each) for a window: even, as the encoder's stride-2 convolution wants."""
    return min(3000, 2 * math.ceil(round(seconds * 50, 6)))


def sample_len(duration: float) -> int:
    """The most tokens a turn may take (6 a second, and 10): output that reaches it never ended (a loop)."""
    return int(10 + 6 * duration)


def _decode_window(audio: Any, language: str | None, frames: int, max_tokens: int) -> Any:
    """One greedy decode of ``audio`` zero-padded to ``frames`` mel frames: a ``DecodingResult``."""
    whisper = importlib.import_module("whisper")
    mel = whisper.audio.log_mel_spectrogram(audio, _engine.dims.n_mels, padding=frames * 160 - len(audio))
    options = whisper.decoding.DecodingOptions(
        language=language, temperature=0.0, fp16=False, without_timestamps=True, sample_len=max_tokens)
    return whisper.decoding.decode(_engine, mel[:, :frames], options)


def _transcribe(audio: Any, language: str | None,
                stt_window: float) -> tuple[list[Segment], str, dict[str, float], str]:
    """The short window where it applies and its output looks sound, else the full one.

    Returns the segments, the language, timings (``window_s``: the window of the output kept;
    ``fallback``: 1.0 when the short window's output was thrown away, which took ``short_ms``) and
    why it was thrown away ("" when it was not).
    """
    duration = len(audio) / WHISPER_RATE
    seconds = FULL_WINDOW if _backend == FASTER_WHISPER else window_seconds(duration, stt_window)
    if seconds >= FULL_WINDOW:
        segments, detected = _infer(audio, language)
        return segments, detected, {"window_s": FULL_WINDOW}, ""
    started = time.perf_counter()
    max_tokens = sample_len(duration)
    frames = window_frames(seconds)
    result = _decode_window(audio, language, frames, max_tokens)
    if result.compression_ratio > COMPRESSION_RATIO:
        reason = "repetition"
    elif len(result.tokens) >= max_tokens:
        reason = "no end"
    else:
        segment = Segment(result.text, float(result.no_speech_prob), float(result.avg_logprob),
                          float(result.compression_ratio))
        return [segment], str(result.language or language or "en"), {"window_s": frames / 100}, ""
    short_ms = round((time.perf_counter() - started) * 1000, 2)
    segments, detected = _infer(audio, language)
    return segments, detected, {"window_s": FULL_WINDOW, "fallback": 1.0, "short_ms": short_ms}, reason


def _voiced_ms(pcm8k: bytes) -> int:
    from twisted_agent.media.interfaces import FRAME_BYTES, FRAME_MS
    from twisted_agent.media.vad import FrameVAD

    vad = FrameVAD()
    frames = len(pcm8k) // FRAME_BYTES
    return FRAME_MS * sum(vad.is_speech(pcm8k[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]) for i in range(frames))


def recognise(pcm: bytes, rate: int, language: str | None, min_voiced_ms: int,
              window: float = FULL_WINDOW) -> Recognition:
    """The job, in a worker: gate on voiced audio, resample to 16 kHz, run the model.

    ``window``: ``stt_window``, the shortest encoder window (see the module docstring); the default,
    30 s, is Whisper's stock path.
    """
    import numpy as np

    from twisted_agent.media.codecs import resample

    clock = time.perf_counter
    duration_ms = round(len(pcm) / 2 / rate * 1000)
    started = clock()
    voiced = _voiced_ms(pcm if rate == 8000 else resample(pcm, rate, 8000))
    vad_ms = (clock() - started) * 1000
    timings = {"vad_ms": round(vad_ms, 2)}
    if not _multilingual:
        language = "en"
    elif language not in _languages:
        language = None  # a code Whisper does not know: let it detect the language
    if voiced < min_voiced_ms:
        return Recognition((), language or "", voiced, duration_ms, timings, ran_model=False)
    started = clock()
    audio = np.frombuffer(resample(pcm, rate, WHISPER_RATE), "<i2").astype(np.float32) / 32768.0
    timings["resample_ms"] = round((clock() - started) * 1000, 2)
    started = clock()
    segments, detected, path, fallback = _transcribe(audio, language, window)
    timings["inference_ms"] = round((clock() - started) * 1000, 2)
    timings.update(path)
    return Recognition(tuple(segments), detected, voiced, duration_ms, timings, fallback=fallback)


# -- the reactor side -------------------------------------------------------------------------------


def local_config(config: AgentConfig | LocalProviderConfig) -> LocalProviderConfig:
    return config if isinstance(config, LocalProviderConfig) else config.providers.local


def default_threads(workers: int) -> int:
    return max(1, ((os.cpu_count() or 1) - 1) // workers)


def call_language(language: str | None) -> str | None:
    """A call context's language ("en-US", "de") as Whisper's code ("en", "de"); None: detect it."""
    if not language:
        return None
    return re.split(r"[-_]", language.strip(), maxsplit=1)[0].lower() or None


@implementer(ISpeechToText)
class WhisperSTT:
    """Whisper in ``stt_workers`` worker processes (see the module docstring).

    :meth:`transcribe` fails with :class:`~twisted_agent.providers.local.workers.WorkerBusy` when
    ``max_queue`` turns already wait, with ``ModelMissing`` when the model is not installed, with
    ``TimeoutError`` after ``timeout`` seconds.
    """

    log = Logger()

    def __init__(self, reactor: Any, config: AgentConfig | LocalProviderConfig, *,
                 threads: int | None = None, min_voiced_ms: int = MIN_VOICED_MS, timeout: float = 30.0) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.config = local_config(config)
        self.workers = self.config.stt_workers
        self.threads = threads or default_threads(self.workers)
        self.min_voiced_ms = min_voiced_ms
        self.backend, self._backend_note = self._choose_backend(self.config.stt_backend)
        self._pool: WorkerPool | None = None
        self._load_error: str = ""
        self.transcribed = 0
        self.suppressed = 0
        self.suppressed_reasons: Counter[str] = Counter()
        self.short_window = 0  # turns whose text came from a short encoder window
        self.full_window = 0  # ... from the full 30 s one, fallbacks included
        self.fallback_reasons: Counter[str] = Counter()

    @staticmethod
    def _choose_backend(requested: str) -> tuple[str, str]:
        if requested == FASTER_WHISPER and importlib.util.find_spec(_MODULES[FASTER_WHISPER]) is None:
            return OPENAI_WHISPER, "faster-whisper is not installed: using openai-whisper"
        return requested, ""

    @property
    def name(self) -> str:
        return f"whisper {self.config.stt_model} ({self.backend})"

    def model_path(self) -> str:
        """Where the model is; raises ``ModelMissing`` (with ``.fix``) when it is not installed."""
        from twisted_agent.providers.local import models

        if self.backend == FASTER_WHISPER:
            return models.faster_whisper_dir(self.config, self.config.stt_model)
        return models.whisper_path(self.config, self.config.stt_model)

    def _get_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(
                self._reactor, load_whisper, (self.backend, self.model_path(), self.threads),
                size=self.workers, name="whisper", max_pending=self.config.max_queue)
        return self._pool

    def start(self) -> Deferred[None]:
        try:
            pool = self._get_pool()
        except Exception:
            return fail()
        if self._backend_note:
            self.log.warn("{note}", note=self._backend_note)
        self._load_error = ""

        def loaded(infos: list[Any]) -> None:
            self.log.info("{name} loaded in {count} worker(s) ({threads} thread(s) each): {load_ms} ms",
                          name=self.name, count=len(infos), threads=self.threads,
                          load_ms=[info.load_ms for info in infos])

        def failed(failure: Failure) -> Failure:
            self._load_error = failure.getErrorMessage()
            return failure

        return pool.start().addCallbacks(loaded, failed)

    def stop(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        return pool.stop()

    def transcribe(self, pcm: bytes, rate: int, language: str | None = None,
                   started: Callable[[], object] | None = None) -> Deferred[Transcript]:
        if len(pcm) % 2:
            return fail(ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}"))
        try:
            pool = self._get_pool()
        except Exception:
            return fail()
        asked = self._reactor.seconds()
        job = pool.submit_timed(recognise, pcm, rate, call_language(language), self.min_voiced_ms,
                                self.config.stt_window, started=started)
        # a bound for the caller; a worker stuck past it stays busy (and counted) until it returns
        job.addTimeout(self.timeout, self._reactor)
        return job.addCallback(self._transcript, asked)

    def _transcript(self, result: JobResult, asked: float) -> Transcript:
        recognition: Recognition = result.value
        verdict = judge(recognition, self.min_voiced_ms)
        timings = dict(recognition.timings, queue_ms=result.queued_ms, worker_ms=result.run_ms,
                       total_ms=round((self._reactor.seconds() - asked) * 1000, 2))
        self.transcribed += 1
        if recognition.ran_model:
            if recognition.timings.get("window_s", FULL_WINDOW) < FULL_WINDOW:
                self.short_window += 1
            else:
                self.full_window += 1
        if recognition.fallback:
            self.fallback_reasons[recognition.fallback] += 1
            self.log.debug("whisper's short window gave {reason}: re-run on the full window",
                           reason=recognition.fallback)
        if verdict.key:
            self.suppressed += 1
            self.suppressed_reasons[verdict.key] += 1
            self.log.debug("whisper output suppressed: {reason}", reason=verdict.reason)
        return Transcript(
            text=verdict.text, language=recognition.language or "en", duration_ms=recognition.duration_ms,
            no_speech_prob=round(verdict.no_speech_prob, 4), avg_logprob=round(verdict.avg_logprob, 4),
            suppressed=bool(verdict.key), reason=verdict.reason, timings=timings)

    def stats(self) -> dict[str, Any]:
        pool = self._pool.stats() if self._pool is not None else {}
        return {"transcribed": self.transcribed, "suppressed": self.suppressed,
                "suppressed_reasons": dict(self.suppressed_reasons), "short_window": self.short_window,
                "full_window": self.full_window, "fallbacks": sum(self.fallback_reasons.values()),
                "fallback_reasons": dict(self.fallback_reasons), "pool": pool}

    def status(self) -> ModelStatus:
        from twisted_agent.providers.local.models import ModelMissing, install_command

        extra = {"backend": self.backend, "workers": self.workers, "threads": self.threads, **self.stats()}
        if importlib.util.find_spec(_MODULES[self.backend]) is None:
            return ModelStatus(self.name, False, f"{self.backend} is not installed",
                               install_command(self.config), extra=extra)
        try:
            path = self.model_path()
        except ModelMissing as e:
            return ModelStatus(self.name, False, e.detail, e.fix, extra=extra)
        extra["path"] = path
        if self._load_error:
            return ModelStatus(self.name, False, f"failed to load {path}: {self._load_error}",
                               "check the model file (ai-agent models install reinstalls it)", extra=extra)
        loaded = self._pool is not None and self._pool.loaded_workers > 0
        note = f"; {self._backend_note}" if self._backend_note else ""
        detail = f"{self.name}: {path}, {'loaded' if loaded else 'not loaded yet'}{note}"
        return ModelStatus(self.name, True, detail, loaded=loaded, extra=extra)
