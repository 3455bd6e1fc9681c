"""The local provider: Whisper → language model → Piper, streamed and overlapped, fully offline.

One :class:`LocalPipeline` per engine holds the models (shared by every call through bounded
queues); one :class:`LocalProvider` per call holds the conversation. A turn runs as one cancellable
coroutine: transcribe the caller's audio, stream the language model's reply, cut it at sentence
(or, for the first piece, clause) boundaries and synthesize each piece as soon as it is complete,
so the caller hears the first sentence while the model is still writing the rest. Cancelling the
turn (barge-in, hang-up) stops transcription, the token stream and pending synthesis.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import AgentConfig
from twisted_agent.providers.base import ICallInfo, IProvider, IProviderFactory, ProviderError, ProviderReadiness
from twisted_agent.providers.local.interfaces import ILanguageModel, ISpeechToText, ITextToSpeech, Speech


class LocalPipeline:
    """The shared models, and how busy they are."""

    log = Logger()

    def __init__(self, reactor: Any, config: AgentConfig, stt: ISpeechToText, llm: ILanguageModel,
                 tts: ITextToSpeech) -> None:
        self.reactor = reactor
        self.config = config
        self.stt = stt
        self.llm = llm
        self.tts = tts
        self.pending_turns = 0
        self.started: Deferred[Any] | None = None
        self.start_error = ""
        self.reply_cache: dict[tuple[str, str], tuple[str, list[Speech]]] = {}
        self.cache_hits = 0

    def start(self) -> Deferred[Any]:
        if self.started is None:
            self.started = DeferredList([self.stt.start(), self.llm.start(), self.tts.start()], consumeErrors=True)
            self.started.addCallback(self._started)
        return self.started

    def _started(self, results: list[tuple[bool, Any]]) -> None:
        problems = [str(value.value) for ok, value in results if not ok]
        self.start_error = "; ".join(problems)
        if problems:
            self.log.error("local pipeline not ready: {problems}", problems=self.start_error)
        else:
            self.log.info("local pipeline ready: {stt}, {llm}, {tts}", stt=self.stt.status().detail,
                          llm=self.llm.status().detail, tts=self.tts.status().detail)

    def stop(self) -> Deferred[Any]:
        return DeferredList([self.stt.stop(), self.llm.stop(), self.tts.stop()], consumeErrors=True)

    def readiness(self) -> ProviderReadiness:
        if self.started is not None and not self.started.called:
            return ProviderReadiness("local", False, "loading the models", "wait: they load at start-up")
        statuses = [self.stt.status(), self.llm.status(), self.tts.status()]
        missing = [s for s in statuses if not s.ready]
        detail = "; ".join(s.detail for s in statuses)
        if missing:
            return ProviderReadiness("local", False, detail, missing[0].fix)
        if self.pending_turns >= self.config.providers.local.max_queue:
            return ProviderReadiness("local", False, f"busy: {self.pending_turns} turns waiting ({detail})",
                                     "raise LOCAL_MAX_QUEUE or add engines")
        return ProviderReadiness("local", True, detail)


def missing_models(config: AgentConfig) -> str:
    """Why the local pipeline cannot run (a model is not installed), or "" when everything is there."""
    from twisted_agent.providers.local import models

    local = config.providers.local
    try:
        models.whisper_path(local, local.stt_model)
        if local.tts_backend == "piper":
            models.piper_voice_paths(local, local.tts_voice)
        if local.llm_backend in ("auto", "embedded"):
            models.gguf_path(local, local.embedded_model)
    except models.ModelMissing as e:
        return str(e)
    return ""


_NORMALISE = re.compile(r"[^a-z0-9 ]+")


def normalise(text: str) -> str:
    return " ".join(_NORMALISE.sub(" ", text.lower()).split())


@implementer(IProvider)
class LocalProvider:
    name = "local"
    wants_turn_taking = True
    log = Logger()

    def __init__(self, pipeline: LocalPipeline) -> None:
        from twisted_agent.providers.local.history import ConversationHistory

        self.pipeline = pipeline
        self.reactor = pipeline.reactor
        self.call: Any = None
        self._history_class = ConversationHistory
        self.history: Any = None
        self._audio = bytearray()
        self._turn: Deferred[Any] | None = None
        self._ids = itertools.count(1)
        self.closed = False

    # --- IProvider ------------------------------------------------------------------------------

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        local = self.pipeline.config.providers.local
        self.history = self._history_class(call.context.system_prompt, local.history_turns)
        if call.context.greeting:
            self._turn = Deferred.fromCoroutine(self._say(call.context.greeting, record=True))
            self._turn.addErrback(self._failed, "greeting")
        return succeed(None)

    def push_audio(self, frame: bytes) -> None:
        self._audio.extend(frame)

    def speech_started(self) -> None:
        pass

    def speech_ended(self) -> None:
        pass

    def end_of_turn(self) -> Deferred[None]:
        audio, self._audio = bytes(self._audio), bytearray()
        self.pipeline.pending_turns += 1
        turn = Deferred.fromCoroutine(self._answer(audio))

        def done(result: Any) -> Any:
            self.pipeline.pending_turns -= 1
            return result

        turn.addBoth(done)
        self._turn = turn
        return turn

    def interrupt(self, heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        if self._turn is not None and not self._turn.called:
            self._turn.cancel()
        return succeed(None)

    def speak(self, text: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._say(text, record=True))

    def dtmf(self, digit: str) -> None:
        pass

    def close(self) -> Deferred[None]:
        self.closed = True
        if self._turn is not None and not self._turn.called:
            self._turn.cancel()
        return succeed(None)

    # --- a turn ---------------------------------------------------------------------------------

    async def _answer(self, audio: bytes) -> None:
        from twisted_agent.providers.local.sentences import SentenceSplitter

        events = self.call.events
        pipeline = self.pipeline
        started = self.reactor.seconds()
        transcript = await pipeline.stt.transcribe(audio, 8000, self.call.context.language)
        events.timing("stt", (self.reactor.seconds() - started) * 1000)
        if transcript.suppressed or not transcript.text.strip():
            self.log.info("call {call_id}: nothing recognisable said ({reason})", call_id=self.call.call_id,
                          reason=transcript.reason or "empty")
            return
        text = transcript.text.strip()
        events.transcript(text, True)
        utterance_id = f"{self.call.call_id}-{next(self._ids)}"
        cache_key = (self.call.context_name, normalise(text))
        if pipeline.config.providers.local.reply_cache and cache_key in pipeline.reply_cache:
            pipeline.cache_hits += 1
            reply, speech = pipeline.reply_cache[cache_key]
            self.history.add_user(text)
            events.agent_text(reply, utterance_id)
            for piece in speech:
                events.agent_audio(piece.pcm, piece.rate, utterance_id)
            events.utterance_end(utterance_id)
            self.history.add_assistant(reply)
            return
        self.history.add_user(text)
        splitter = SentenceSplitter()
        spoken: list[Speech] = []
        synthesis: Deferred[Any] = succeed(None)  # pieces are spoken in order, one after another
        llm_started = self.reactor.seconds()
        marks: dict[str, float] = {}

        def speak_piece(piece: str) -> None:
            nonlocal synthesis
            if "first_sentence" not in marks:
                marks["first_sentence"] = self.reactor.seconds()
                events.timing("first_sentence", (marks["first_sentence"] - llm_started) * 1000)
            synthesis = synthesis.addCallback(lambda _: self._synthesize_into(piece, utterance_id, spoken, marks))

        def on_token(token: str) -> None:
            if "first_token" not in marks:
                marks["first_token"] = self.reactor.seconds()
                events.timing("llm_first_token", (marks["first_token"] - llm_started) * 1000)
            for piece in splitter.feed(token):
                speak_piece(piece)

        chat = pipeline.llm.chat(self.history.messages(), on_token)
        try:
            reply = await chat
        except CancelledError:
            synthesis.cancel()
            raise
        rest = splitter.flush()
        if rest:
            speak_piece(rest)
        events.agent_text(reply, utterance_id)
        self.history.add_assistant(reply)
        try:
            await synthesis
        except CancelledError:
            raise
        events.utterance_end(utterance_id)
        if pipeline.config.providers.local.reply_cache and len(pipeline.reply_cache) < 256:
            pipeline.reply_cache[cache_key] = (reply, spoken)

    def _synthesize_into(self, piece: str, utterance_id: str, spoken: list[Speech],
                         marks: dict[str, float]) -> Deferred[None]:
        started = self.reactor.seconds()
        synthesizing = self.pipeline.tts.synthesize(piece, self.call.context.voice or None)

        def emit(speech: Speech) -> None:
            if "tts_first" not in marks:
                marks["tts_first"] = self.reactor.seconds()
                self.call.events.timing("tts_first_sentence", (marks["tts_first"] - started) * 1000)
            spoken.append(speech)
            if not self.closed:
                self.call.events.agent_audio(speech.pcm, speech.rate, utterance_id)

        return synthesizing.addCallback(emit)

    async def _say(self, text: str, record: bool) -> None:
        utterance_id = f"{self.call.call_id}-{next(self._ids)}"
        speech = await self.pipeline.tts.synthesize(text, self.call.context.voice or None)
        if self.closed:
            return
        events = self.call.events
        events.agent_text(text, utterance_id)
        events.agent_audio(speech.pcm, speech.rate, utterance_id)
        events.utterance_end(utterance_id)
        if record and self.history is not None:
            self.history.add_assistant(text)

    def _failed(self, failure: Any, what: str) -> None:
        if failure.check(CancelledError):
            return None
        if self.call is not None and not self.closed:
            self.call.events.error(f"{what} failed: {failure.getErrorMessage()}", True)
        return None


@implementer(IProviderFactory)
class LocalFactory:
    name = "local"

    def __init__(self, pipeline: LocalPipeline) -> None:
        self.pipeline = pipeline

    def readiness(self) -> ProviderReadiness:
        return self.pipeline.readiness()

    def create(self) -> LocalProvider:
        readiness = self.pipeline.readiness()
        if not readiness.ready:
            raise ProviderError(f"local pipeline not ready: {readiness.detail}")
        return LocalProvider(self.pipeline)

    def start(self) -> Deferred[Any]:
        return self.pipeline.start()

    def stop(self) -> Deferred[Any]:
        return self.pipeline.stop()


def make_local_factory(reactor: Any, config: AgentConfig) -> LocalFactory:
    from twisted_agent.providers.local.llm import make_llm
    from twisted_agent.providers.local.stt import WhisperSTT
    from twisted_agent.providers.local.tts import make_tts

    pipeline = LocalPipeline(reactor, config, WhisperSTT(reactor, config), make_llm(reactor, config.providers.local),
                             make_tts(reactor, config))
    return LocalFactory(pipeline)
