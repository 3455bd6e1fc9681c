"""Text to speech: Piper in a worker process, or espeak-ng as a model-free fallback.

:class:`PiperTTS` runs the Piper voice in one worker process
(:mod:`twisted_agent.providers.local.workers`). Piper speaks at the voice's rate (22050 Hz for the
medium voices); the worker resamples that to the call's 8 kHz with the project's soxr resampler
(~0.5 ms a sentence) before sending it back, so 2.76 times fewer bytes cross the pipe and the
reactor gets audio it can play as it is. ``Speech.rate`` says the rate (``rate=None`` keeps the
voice's own). The voice's onnxruntime session gets ``threads`` threads (default: cores - 1) that
sleep rather than spin while they wait. Measured at nice 10 on the 2-core box, "We are open from
nine to five on Saturday." (2.4 s of audio): onnxruntime's defaults (2 spinning threads) 100 ms
when the machine is idle but 270-300 ms beside a busy language model; 1 thread 165-180 ms in both
cases. The pipeline speaks while the language model is still writing, so the steady one wins.

:class:`EspeakTTS` runs ``espeak-ng --stdout`` once per sentence (the text goes in on stdin, never
on the command line), parses the WAV it writes, and resamples on the reactor thread: espeak-ng
takes ~10 ms for a sentence and the resampling of its ~3 s of 22050 Hz audio ~0.4 ms (measured),
so no worker is needed. Its voice is robotic; use it for tests, or when Piper is not installed.

:func:`make_tts` picks one from the configuration: espeak when ``TTS_BACKEND=espeak``, Piper when
its library and voice are installed, else espeak, whose status then says why.

Timings in ``Speech.timings`` (milliseconds): ``queue_ms`` (waiting for the worker),
``first_byte_ms`` (from the request until the engine produced its first audio: Piper's first
sentence chunk, espeak's first stdout bytes), ``synthesis_ms`` (the engine's whole run),
``resample_ms`` and ``total_ms`` (from the request until the Speech is delivered).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import AgentConfig, LocalProviderConfig
from twisted_agent.media.codecs import resample
from twisted_agent.media.interfaces import SAMPLE_RATE
from twisted_agent.media.wav import WavError, parse_wav
from twisted_agent.providers.local.interfaces import ITextToSpeech, ModelStatus, Speech
from twisted_agent.providers.local.workers import JobResult, WorkerPool

__all__ = ["EspeakTTS", "PiperTTS", "WavError", "make_tts", "parse_wav"]

ESPEAK = "espeak-ng"


def local_config(config: AgentConfig | LocalProviderConfig) -> LocalProviderConfig:
    return config if isinstance(config, LocalProviderConfig) else config.providers.local


# -- Piper, in a worker ---------------------------------------------------------------------------

_voices: dict[str, Any] = {}  # model path -> PiperVoice, in the worker
_MAX_VOICES = 3
_threads = 1


def _voice(model: str, config_json: str) -> Any:
    voice = _voices.get(model)
    if voice is None:
        piper: Any = importlib.import_module("piper")
        ort: Any = importlib.import_module("onnxruntime")
        # PiperVoice.load builds its onnxruntime session from a default SessionOptions(): all cores,
        # threads spinning while they wait. Next to a busy language model that costs 269 ms per
        # sentence instead of 168 ms with one thread (measured at nice 10 beside llama.cpp), so the
        # options are swapped for the load, in this worker process only.
        default_options = ort.SessionOptions

        def options() -> Any:
            chosen = default_options()
            chosen.intra_op_num_threads = _threads
            chosen.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return chosen

        ort.SessionOptions = options
        try:
            voice = piper.PiperVoice.load(model, config_path=config_json)
        finally:
            ort.SessionOptions = default_options
        while len(_voices) >= _MAX_VOICES:
            _voices.pop(next(iter(_voices)))
        _voices[model] = voice
    return voice


def load_piper(model: str, config_json: str, threads: int = 1) -> None:
    """Worker initializer: load the voice, and speak once so the first sentence is not slower."""
    global _threads
    _threads = threads
    _voice(model, config_json)
    speak("Hello.", model, config_json, None)


@dataclass(frozen=True)
class Rendered:
    pcm: bytes
    rate: int
    source_rate: int
    first_chunk_ms: float
    synthesis_ms: float
    resample_ms: float


def speak(text: str, model: str, config_json: str, rate: int | None) -> Rendered:
    """The job, in the worker: Piper's sentence chunks, joined, resampled to ``rate``."""
    clock = time.perf_counter
    voice = _voice(model, config_json)
    started = clock()
    first = 0.0
    chunks: list[bytes] = []
    for chunk in voice.synthesize(text):
        if not chunks:
            first = clock() - started
        chunks.append(chunk.audio_int16_bytes)
    synthesis = clock() - started
    source_rate = int(voice.config.sample_rate)
    pcm = b"".join(chunks)
    started = clock()
    if rate is not None and rate != source_rate:
        pcm = resample(pcm, source_rate, rate)
    return Rendered(pcm, rate or source_rate, source_rate, round(first * 1000, 2), round(synthesis * 1000, 2),
                    round((clock() - started) * 1000, 2))


@implementer(ITextToSpeech)
class PiperTTS:
    """Piper in one worker process. ``rate``: what :class:`Speech` comes back at (None: the voice's)."""

    log = Logger()

    def __init__(self, reactor: Any, config: AgentConfig | LocalProviderConfig, *,
                 rate: int | None = SAMPLE_RATE, threads: int | None = None, timeout: float = 30.0) -> None:
        self._reactor = reactor
        self.timeout = timeout
        # like Whisper's workers: leave a core to the reactor and the language model
        self.threads = threads or max(1, (os.cpu_count() or 1) - 1)
        self.config = local_config(config)
        self.rate = rate
        self._pool: WorkerPool | None = None
        self._load_error = ""
        self._unknown_voices: set[str] = set()
        self.spoken = 0

    @property
    def name(self) -> str:
        return f"piper {self.config.tts_voice}"

    def voice_paths(self, voice: str | None = None) -> tuple[str, str]:
        """``(model.onnx, model.onnx.json)``; raises ``ModelMissing`` (with ``.fix``) when not installed."""
        from twisted_agent.providers.local.models import piper_voice_paths

        return piper_voice_paths(self.config, voice or self.config.tts_voice)

    def _get_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(self._reactor, load_piper, (*self.voice_paths(), self.threads), size=1,
                                    name="piper", max_pending=self.config.max_queue)
        return self._pool

    def _paths_for(self, voice: str | None) -> tuple[str, str]:
        """A call's voice when it is an installed Piper voice; else (e.g. a cloud voice name) the default."""
        if not voice or voice == self.config.tts_voice:
            return self.voice_paths()
        from twisted_agent.providers.local.models import ModelMissing

        try:
            return self.voice_paths(voice)
        except ModelMissing as e:
            if voice not in self._unknown_voices:
                self._unknown_voices.add(voice)
                self.log.warn("voice {voice!r} is not a Piper voice here ({error}); using {default}",
                              voice=voice, error=e.detail, default=self.config.tts_voice)
            return self.voice_paths()

    def start(self) -> Deferred[None]:
        try:
            pool = self._get_pool()
        except Exception:
            return fail()
        self._load_error = ""

        def loaded(infos: list[Any]) -> None:
            self.log.info("{name} loaded: {load_ms} ms", name=self.name, load_ms=[i.load_ms for i in infos])

        def failed(failure: Failure) -> Failure:
            self._load_error = failure.getErrorMessage()
            return failure

        return pool.start().addCallbacks(loaded, failed)

    def stop(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        return succeed(None) if pool is None else pool.stop()

    def synthesize(self, text: str, voice: str | None = None) -> Deferred[Speech]:
        if not text.strip():
            return succeed(Speech(b"", self.rate or SAMPLE_RATE))
        try:
            pool = self._get_pool()
            model, config_json = self._paths_for(voice)
        except Exception:
            return fail()
        started = self._reactor.seconds()
        job = pool.submit_timed(speak, text, model, config_json, self.rate)
        job.addTimeout(self.timeout, self._reactor)
        return job.addCallback(self._speech, started)

    def _speech(self, result: JobResult, started: float) -> Speech:
        rendered: Rendered = result.value
        self.spoken += 1
        return Speech(rendered.pcm, rendered.rate, {
            "queue_ms": result.queued_ms, "first_byte_ms": round(result.queued_ms + rendered.first_chunk_ms, 2),
            "synthesis_ms": rendered.synthesis_ms, "resample_ms": rendered.resample_ms,
            "total_ms": round((self._reactor.seconds() - started) * 1000, 2)})

    def status(self) -> ModelStatus:
        from twisted_agent.providers.local.models import ModelMissing, install_command

        extra: dict[str, Any] = {"backend": "piper", "rate": self.rate, "threads": self.threads, "spoken": self.spoken,
                                 "pool": self._pool.stats() if self._pool is not None else {}}
        if importlib.util.find_spec("piper") is None:
            return ModelStatus(self.name, False, "piper-tts is not installed", install_command(self.config),
                               extra=extra)
        try:
            model, _ = self.voice_paths()
        except ModelMissing as e:
            return ModelStatus(self.name, False, e.detail, e.fix, extra=extra)
        extra["path"] = model
        if self._load_error:
            return ModelStatus(self.name, False, f"failed to load {model}: {self._load_error}",
                               "check the voice files (ai-agent models install reinstalls them)", extra=extra)
        loaded = self._pool is not None and self._pool.loaded_workers > 0
        return ModelStatus(self.name, True, f"{self.name}: {model}, {'loaded' if loaded else 'not loaded yet'}",
                           loaded=loaded, extra=extra)


# -- espeak-ng, as a child process ------------------------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self, text: bytes, clock: Any) -> None:
        self.text = text
        self.clock = clock
        self.started = clock.seconds()
        self.first_byte: float | None = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(self.text)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = self.clock.seconds()
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(ProcessDone):
            self.done.callback(b"".join(self.out))
        else:
            message = b"".join(self.err).decode(errors="replace").strip()
            self.done.errback(RuntimeError(f"{ESPEAK} failed ({reason.getErrorMessage()}): {message or 'no output'}"))

    def _cancel(self, _: Deferred[bytes]) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:  # already gone
            pass


@implementer(ITextToSpeech)
class EspeakTTS:
    """espeak-ng as a child process per sentence; no model, robotic voice.

    ``instead_of``: the status of the Piper voice this stands in for, so status() can say why.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, voice: str = "en-us", wpm: int = 160, rate: int | None = SAMPLE_RATE,
                 executable: str = ESPEAK, instead_of: ModelStatus | None = None, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.voice = voice
        self.wpm = wpm
        self.rate = rate
        self.executable = executable
        self.instead_of = instead_of
        self.spoken = 0

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def status(self) -> ModelStatus:
        name = f"espeak-ng {self.voice}"
        extra: dict[str, Any] = {"backend": "espeak", "rate": self.rate, "spoken": self.spoken}
        if shutil.which(self.executable) is None:
            return ModelStatus(name, False, f"{self.executable} is not installed", "apt-get install espeak-ng",
                               extra=extra)
        if self.instead_of is not None:
            extra["piper"] = self.instead_of.detail
            return ModelStatus(name, True, f"{name}, instead of {self.instead_of.name}: {self.instead_of.detail}",
                               self.instead_of.fix, loaded=True, extra=extra)
        return ModelStatus(name, True, f"{name} (TTS_BACKEND=espeak)", loaded=True, extra=extra)

    def synthesize(self, text: str, voice: str | None = None) -> Deferred[Speech]:
        # a call's voice names a Piper or cloud voice, not an espeak one: this speaks with its own
        if not text.strip():
            return succeed(Speech(b"", self.rate or SAMPLE_RATE))
        collect = _Collect(text.encode("utf-8"), self._reactor)
        argv = [self.executable, "--stdout", "-v", self.voice, "-s", str(self.wpm)]
        try:
            self._reactor.spawnProcess(collect, self.executable, argv, env=None)
        except OSError as e:
            return fail(RuntimeError(f"cannot run {self.executable}: {e} (apt-get install espeak-ng)"))
        collect.done.addTimeout(self.timeout, self._reactor)  # a timeout cancels: the process is killed
        return collect.done.addCallback(self._speech, collect)

    def _speech(self, wav: bytes, collect: _Collect) -> Speech:
        ended = self._reactor.seconds()
        pcm, source_rate = parse_wav(wav)
        clock = time.perf_counter
        started = clock()
        rate = self.rate or source_rate
        if rate != source_rate:
            pcm = resample(pcm, source_rate, rate)
        resample_ms = (clock() - started) * 1000
        first = collect.first_byte if collect.first_byte is not None else ended
        self.spoken += 1
        return Speech(pcm, rate, {
            "first_byte_ms": round((first - collect.started) * 1000, 2),
            "synthesis_ms": round((ended - collect.started) * 1000, 2), "resample_ms": round(resample_ms, 2),
            "total_ms": round((self._reactor.seconds() - collect.started) * 1000, 2)})


def make_tts(reactor: Any, config: AgentConfig | LocalProviderConfig) -> PiperTTS | EspeakTTS:
    """Piper unless ``TTS_BACKEND=espeak`` or Piper (library or voice) is not installed."""
    local = local_config(config)
    if local.tts_backend == "espeak":
        return EspeakTTS(reactor)
    piper = PiperTTS(reactor, local)
    status = piper.status()
    if status.ready:
        return piper
    EspeakTTS.log.warn("Piper is not usable ({detail}); speaking with espeak-ng. Fix: {fix}",
                       detail=status.detail, fix=status.fix)
    return EspeakTTS(reactor, instead_of=status)
