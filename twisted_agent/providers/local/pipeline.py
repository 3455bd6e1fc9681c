"""The local provider: Whisper → language model → Piper, streamed and overlapped, fully offline.

One :class:`LocalPipeline` per engine holds the models (shared by every call through bounded
queues); one :class:`LocalProvider` per call holds the conversation. A turn runs as one cancellable
coroutine: transcribe the caller's audio, stream the language model's reply, cut it at sentence
(or, for the first piece, clause) boundaries and synthesize each piece as soon as it is complete,
so the caller hears the first sentence while the model is still writing the rest. Cancelling the
turn (barge-in, hang-up) stops transcription, the token stream and pending synthesis. Under load a
turn's transcription may wait behind other calls' turns: the call is told when it leaves the queue
(``work_started``), so the wait counts against QUEUE_TIMEOUT and only the work against PROVIDER_TIMEOUT.

**Speculation.** The engine ends the caller's turn ``TURN_END_MS`` after their last word, to be
sure they are done; the VAD reports the pause earlier (``VAD_END_MS``). With ``SPECULATE`` on, the
turn starts at that first pause on the audio so far, and everything it would tell the call (that
its work started, the transcript, timings, reply audio) and every change to the conversation
history is held. When the turn ends, the held work is adopted and released at once (often the
first reply audio is already synthesized); if the caller speaks again first, it is cancelled and
forgotten, and the next pause starts over on the whole utterance, so a sentence with a pause in it
gets one answer. While other calls' turns are using the shared models, no speculation starts:
under load it would only add work.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import AgentConfig
from twisted_agent.providers.base import ICallInfo, IProvider, IProviderFactory, ProviderError, ProviderReadiness
from twisted_agent.providers.local.greetings import Greeting, GreetingCache, greeting_of, greetings_for
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
        self.greetings = GreetingCache(tts)

    def start(self) -> Deferred[Any]:
        if self.started is None:
            # fires once the models are loaded and the greetings synthesized, or the loading failed
            self.started = Deferred()
            loading = DeferredList([self.stt.start(), self.llm.start(), self.tts.start()], consumeErrors=True)
            loading.addCallback(self._started).chainDeferred(self.started)
        return self.started

    def _started(self, results: list[tuple[bool, Any]]) -> Deferred[None] | None:
        problems = [str(value.value) for ok, value in results if not ok]
        self.start_error = "; ".join(problems)
        if problems:
            self.log.error("local pipeline not ready: {problems}", problems=self.start_error)
            return None
        greetings = greetings_for(self.config, LocalProvider.name)
        return Deferred.fromCoroutine(self.greetings.fill(greetings)).addCallback(
            lambda _: self.log.info("local pipeline ready: {stt}, {llm}, {tts}", stt=self.stt.status().detail,
                                    llm=self.llm.status().detail, tts=self.tts.status().detail))

    def stop(self) -> Deferred[Any]:
        return DeferredList([self.stt.stop(), self.llm.stop(), self.tts.stop()], consumeErrors=True)

    @property
    def loading(self) -> bool:
        """Started and not done yet: the models are loading (or the greetings being synthesized)."""
        return self.started is not None and not self.started.called

    def when_loaded(self) -> Deferred[None]:
        """Fires once :meth:`start` is done, whether it succeeded or failed (at once when nothing is
        loading); cancelling it leaves the loading alone (a held call gave up, others may not)."""
        if self.started is None or self.started.called:
            return succeed(None)
        return _when_done(self.started)

    def readiness(self) -> ProviderReadiness:
        if self.loading:
            return ProviderReadiness("local", False, "loading the models", "wait: they load at start-up",
                                     starting=True)
        statuses = [self.stt.status(), self.llm.status(), self.tts.status()]
        missing = [s for s in statuses if not s.ready]
        detail = "; ".join(s.detail for s in statuses)
        if missing:
            return ProviderReadiness("local", False, detail, missing[0].fix)
        if self.pending_turns >= self.config.providers.local.max_queue:
            return ProviderReadiness("local", False, f"busy: {self.pending_turns} turns waiting ({detail})",
                                     "raise LOCAL_MAX_QUEUE or add engines")
        return ProviderReadiness("local", True, detail)


#: the libraries each part needs, and the command that installs them
_LIBRARIES = {"whisper": "openai-whisper", "piper": "piper-tts", "llama_cpp": "llama-cpp-python"}


def installed_readiness(config: AgentConfig) -> ProviderReadiness:
    """Whether this machine has what the local pipeline needs (libraries, model files), without
    loading anything: what ``ai-agent check`` reports. The running engine reports the loaded models."""
    import importlib.util

    local = config.providers.local
    needed = ["whisper"] if local.stt_backend == "openai-whisper" else []
    if local.tts_backend == "piper":
        needed.append("piper")
    if local.llm_backend in ("auto", "embedded"):
        needed.append("llama_cpp")
    absent = [_LIBRARIES[module] for module in needed if importlib.util.find_spec(module) is None]
    if local.stt_backend == "faster-whisper" and importlib.util.find_spec("faster_whisper") is None:
        absent.append("faster-whisper")
    from twisted_agent.providers.local import models

    if absent:
        return ProviderReadiness("local", False, f"not installed: {', '.join(absent)}", models.install_command(local))

    missing: list[models.ModelMissing] = []

    def find(lookup: Callable[[], Any]) -> Any:
        try:
            return lookup()
        except models.ModelMissing as e:
            missing.append(e)
            return None

    if local.stt_backend == "openai-whisper":
        stt = find(lambda: models.whisper_path(local, local.stt_model))
    else:
        stt = find(lambda: models.faster_whisper_dir(local, local.stt_model))
    tts = f"Piper {find(lambda: models.piper_voice_paths(local, local.tts_voice)[0])}" \
        if local.tts_backend == "piper" else "espeak-ng"
    if local.llm_backend in ("auto", "embedded"):
        llm = f"embedded {find(lambda: models.gguf_path(local, local.embedded_model))}"
        if local.llm_backend == "auto":
            llm += f" (or Ollama {local.llm_model} at {local.ollama_host} when it answers)"
    elif local.llm_backend == "ollama":
        llm = f"Ollama {local.llm_model} at {local.ollama_host}"
    else:
        llm = f"{local.llm_model} at {local.openai_compatible_url}"
    if missing:
        if len(missing) == 1:
            return ProviderReadiness("local", False, f"model {missing[0].name!r} {missing[0].detail}", missing[0].fix)
        return ProviderReadiness("local", False, "models not installed: " + "; ".join(
            f"{e.name!r} {e.detail}" for e in missing), models.install_command(local))
    return ProviderReadiness("local", True, f"installed: Whisper {stt}; {llm}; {tts} (loaded at start-up)")


_NORMALISE = re.compile(r"[^a-z0-9 ]+")


def normalise(text: str) -> str:
    return " ".join(_NORMALISE.sub(" ", text.lower()).split())


class HeldEvents:
    """What a turn tells the call (``IProviderEvents``), held back while the turn is speculative.

    Events and deferred actions (``later``) are recorded in order until :meth:`release`, which
    replays them into the call and from then on passes everything straight through. A turn that
    was never speculative is created released.
    """

    def __init__(self, events: Any, released: bool = False) -> None:
        self._events = events
        self.released = released
        self._held: list[Callable[[], Any]] = []

    def release(self) -> None:
        held, self._held = self._held, []
        self.released = True
        for action in held:
            action()

    def later(self, action: Callable[[], Any]) -> None:
        """Run ``action`` now if released, else when released (never, if the turn is discarded)."""
        if self.released:
            action()
        else:
            self._held.append(action)

    def work_started(self) -> None:
        # a speculation's work that started before the turn end tells the call when it is adopted
        self.later(self._events.work_started)

    def timing(self, stage: str, ms: float) -> None:
        self.later(lambda: self._events.timing(stage, ms))

    def transcript(self, text: str, final: bool) -> None:
        self.later(lambda: self._events.transcript(text, final))

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.later(lambda: self._events.agent_text(text, utterance_id))

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.later(lambda: self._events.agent_audio(pcm, rate, utterance_id))

    def utterance_end(self, utterance_id: str) -> None:
        self.later(lambda: self._events.utterance_end(utterance_id))


class _TurnAudio:
    """A turn's audio, to give back to the caller's buffer if the turn is cancelled before it was
    transcribed (the caller went on: the next turn must hear all of it)."""

    def __init__(self, audio: bytes, committed: bool) -> None:
        self.audio = audio
        self.committed = committed  # the turn ended (a speculation is not, until adopted)
        self.transcribed = False


class _Speculation:
    def __init__(self, turn: Deferred[Any], events: HeldEvents, audio: _TurnAudio, started: float) -> None:
        self.turn = turn
        self.events = events
        self.audio = audio
        self.started = started


def _ms(speech: Speech) -> int:
    return len(speech.pcm) * 1000 // (2 * speech.rate)


def heard_text(pieces: list[tuple[str, int]], heard_ms: int) -> str:
    """What the caller heard of an utterance spoken as ``pieces`` ((text, ms of audio), in order)
    when ``heard_ms`` of it went out: whole pieces, then the share of the next one's words that
    fits (speech is roughly even within a piece)."""
    words: list[str] = []
    left = heard_ms
    for text, ms in pieces:
        if left <= 0:
            break
        piece_words = text.split()
        if ms <= left:
            words += piece_words
        else:
            words += piece_words[: int(len(piece_words) * left / ms)]
        left -= ms
    return " ".join(words)


def _trap_cancel(failure: Any) -> None:
    failure.trap(CancelledError)


def _when_done(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) when ``d`` does, leaving ``d``'s result alone."""
    done: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        done.callback(None)
        return result

    d.addBoth(fire)
    return done


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
        self._speculation: _Speculation | None = None
        #: per utterance, the pieces spoken so far: (text, ms of audio), for what a barge-in left heard
        self._pieces: dict[str, list[tuple[str, int]]] = {}
        #: the utterance whose text is the history's last assistant turn
        self._utterance_in_history = ""
        self._ids = itertools.count(1)
        self.closed = False
        #: speculative turns adopted at the turn end, and discarded because the caller went on
        self.speculations_used = 0
        self.speculations_discarded = 0
        #: pauses at which no speculation started because the models were busy with other turns
        self.speculations_skipped = 0

    # --- IProvider ------------------------------------------------------------------------------

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        local = self.pipeline.config.providers.local
        self.history = self._history_class(call.context.system_prompt, local.history_turns)
        if call.context.greeting:
            self._turn = Deferred.fromCoroutine(self._greet(greeting_of(call.context)))
            self._turn.addErrback(self._failed, "greeting")
        return succeed(None)

    def push_audio(self, frame: bytes) -> None:
        self._audio.extend(frame)

    def speech_started(self) -> None:
        self._discard_speculation()

    def speech_ended(self) -> None:
        # the caller paused and a turn end is pending: start on the answer now, held until then
        if self.closed or self.call is None or not self.pipeline.config.providers.local.speculate:
            return
        self._discard_speculation()
        if self.pipeline.pending_turns > 0:
            # other calls' turns are using the shared models: work that may be thrown away would
            # only delay them (speculation buys latency on idle models, not throughput)
            self.speculations_skipped += 1
            return
        events = HeldEvents(self.call.events)
        audio = _TurnAudio(bytes(self._audio), committed=False)
        turn = self._begin_turn(audio, events)
        self._speculation = _Speculation(turn, events, audio, self.reactor.seconds())

    def end_of_turn(self) -> Deferred[None]:
        audio, self._audio = bytes(self._audio), bytearray()
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            # no speech since the pause it started at (that would have discarded it): the frames
            # since then are silence, and the work is the answer to this turn
            self.speculations_used += 1
            speculation.audio.audio, speculation.audio.committed = audio, True
            speculation.events.release()
            self.call.events.timing("speculation_head_start", (self.reactor.seconds() - speculation.started) * 1000)
            self._turn = speculation.turn
            return speculation.turn
        turn = self._begin_turn(_TurnAudio(audio, committed=True), HeldEvents(self.call.events, released=True))
        self._turn = turn
        return turn

    def _begin_turn(self, audio: _TurnAudio, events: HeldEvents) -> Deferred[None]:
        self.pipeline.pending_turns += 1
        turn = Deferred.fromCoroutine(self._answer(audio, events))

        def done(result: Any) -> Any:
            self.pipeline.pending_turns -= 1
            return result

        return turn.addBoth(done)

    def _discard_speculation(self) -> None:
        speculation, self._speculation = self._speculation, None
        if speculation is None:
            return
        self.speculations_discarded += 1
        speculation.turn.addErrback(lambda _: None)  # its outcome (cancelled, or a failure) is moot
        speculation.turn.cancel()

    def interrupt(self, heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        """Barge-in: stop the turn; the history keeps only what the caller heard of the reply."""
        if self._turn is not None and not self._turn.called:
            self._turn.cancel()
        for utterance_id, ms in heard_ms_by_utterance.items():
            pieces = self._pieces.get(utterance_id)
            if pieces is None:
                continue
            heard = heard_text(pieces, ms)
            if utterance_id == self._utterance_in_history:
                self.history.truncate_last_assistant(heard)  # the whole reply was written: cut it
            elif heard:
                self.history.add_assistant(heard)  # the reply was cut off while being written
                self._utterance_in_history = utterance_id
        return succeed(None)

    def speak(self, text: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._say(text, record=True))

    def dtmf(self, digit: str) -> None:
        pass

    def close(self) -> Deferred[None]:
        self.closed = True
        self._discard_speculation()
        if self._turn is not None and not self._turn.called:
            self._turn.cancel()
        return succeed(None)

    # --- a turn ---------------------------------------------------------------------------------

    async def _answer(self, audio: _TurnAudio, events: HeldEvents) -> None:
        from twisted_agent.providers.local.sentences import SentenceSplitter

        pipeline = self.pipeline
        local = pipeline.config.providers.local
        started = self.reactor.seconds()

        def working() -> None:
            nonlocal started
            # transcription, the turn's first model job, left the queue it shares with other calls'
            # turns: the turn's work starts (the call's PROVIDER_TIMEOUT counts from here, and the
            # stt stage times the transcription, not the wait before it)
            started = self.reactor.seconds()
            events.work_started()

        try:
            transcript = await pipeline.stt.transcribe(audio.audio, 8000, self.call.context.language, started=working)
        except CancelledError:
            if audio.committed:
                self._audio[:0] = audio.audio  # the caller went on: the next turn hears this part too
            raise
        audio.transcribed = True
        events.timing("stt", (self.reactor.seconds() - started) * 1000)
        if transcript.suppressed or not transcript.text.strip():
            events.later(lambda: self.log.info("call {call_id}: nothing recognisable said ({reason})",
                                               call_id=self.call.call_id, reason=transcript.reason or "empty"))
            return
        text = transcript.text.strip()
        events.transcript(text, True)
        # the history changes only when (if) the turn is released; the model sees it changed already
        prompt = copy.deepcopy(self.history)
        prompt.add_user(text)
        events.later(lambda: self.history.add_user(text))
        utterance_id = f"{self.call.call_id}-{next(self._ids)}"
        cache_key = (self.call.context_name, normalise(text))
        if local.reply_cache and cache_key in pipeline.reply_cache:
            pipeline.cache_hits += 1
            reply, speech = pipeline.reply_cache[cache_key]
            events.agent_text(reply, utterance_id)
            for piece in speech:
                events.agent_audio(piece.pcm, piece.rate, utterance_id)
            events.utterance_end(utterance_id)
            events.later(lambda: self._reply_in_history(reply, utterance_id))
            self._record_piece(utterance_id, reply, sum(_ms(piece) for piece in speech))
            return
        splitter = SentenceSplitter(first_piece_words=local.first_piece_words)
        spoken: list[Speech] = []
        synthesis: Deferred[Any] = succeed(None)  # pieces are spoken in order, one after another
        llm_started = self.reactor.seconds()
        marks: dict[str, float] = {}

        def speak_piece(piece: str) -> None:
            nonlocal synthesis
            first = "first_sentence" not in marks
            if first:
                marks["first_sentence"] = self.reactor.seconds()
                events.timing("first_sentence", (marks["first_sentence"] - llm_started) * 1000)
            synthesis = synthesis.addCallback(
                lambda _: self._synthesize_into(piece, utterance_id, spoken, marks, events))
            if first:
                # the caller waits for this piece: the model holds the rest of the reply until it is spoken
                pipeline.llm.yield_to(_when_done(synthesis))

        def on_token(token: str) -> None:
            if "first_token" not in marks:
                marks["first_token"] = self.reactor.seconds()
                events.timing("llm_first_token", (marks["first_token"] - llm_started) * 1000)
            for piece in splitter.feed(token):
                speak_piece(piece)

        chat = pipeline.llm.chat(prompt.messages(), on_token)
        try:
            reply = await chat
        except CancelledError:
            synthesis.addErrback(_trap_cancel)  # nobody awaits it any more: its cancellation is expected
            synthesis.cancel()
            raise
        rest = splitter.flush()
        if rest:
            speak_piece(rest)
        events.agent_text(reply, utterance_id)
        events.later(lambda: self._reply_in_history(reply, utterance_id))
        await synthesis
        events.utterance_end(utterance_id)
        if local.reply_cache and len(pipeline.reply_cache) < 256:
            pipeline.reply_cache[cache_key] = (reply, spoken)

    def _synthesize_into(self, piece: str, utterance_id: str, spoken: list[Speech],
                         marks: dict[str, float], events: HeldEvents) -> Deferred[None]:
        started = self.reactor.seconds()
        synthesizing = self.pipeline.tts.synthesize(piece, self.call.context.voice or None)

        def emit(speech: Speech) -> None:
            if "tts_first" not in marks:
                marks["tts_first"] = self.reactor.seconds()
                events.timing("tts_first_sentence", (marks["tts_first"] - started) * 1000)
            spoken.append(speech)
            self._record_piece(utterance_id, piece, _ms(speech))
            if not self.closed:
                events.agent_audio(speech.pcm, speech.rate, utterance_id)

        return synthesizing.addCallback(emit)

    async def _greet(self, greeting: Greeting) -> None:
        # synthesized when the pipeline started: spoken at once, the same audio a synthesis gives
        speech = self.pipeline.greetings.speech(greeting)
        if speech is None:
            await self._say(greeting.text, record=True)
        else:
            self._spoken(f"{self.call.call_id}-{next(self._ids)}", greeting.text, speech, record=True)

    async def _say(self, text: str, record: bool) -> None:
        utterance_id = f"{self.call.call_id}-{next(self._ids)}"
        speech = await self.pipeline.tts.synthesize(text, self.call.context.voice or None)
        self._spoken(utterance_id, text, speech, record)

    def _spoken(self, utterance_id: str, text: str, speech: Speech, record: bool) -> None:
        if self.closed:
            return
        events = self.call.events
        self._record_piece(utterance_id, text, _ms(speech))
        if record and self.history is not None:
            self._reply_in_history(text, utterance_id)
        events.agent_text(text, utterance_id)
        events.agent_audio(speech.pcm, speech.rate, utterance_id)
        events.utterance_end(utterance_id)

    def _record_piece(self, utterance_id: str, text: str, ms: int) -> None:
        if utterance_id not in self._pieces and len(self._pieces) >= 4:
            del self._pieces[next(iter(self._pieces))]  # only the latest utterances can be interrupted
        self._pieces.setdefault(utterance_id, []).append((text, ms))

    def _reply_in_history(self, reply: str, utterance_id: str) -> None:
        self.history.add_assistant(reply)
        self._utterance_in_history = utterance_id

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

    def when_ready(self) -> Deferred[None]:
        return self.pipeline.when_loaded()

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
