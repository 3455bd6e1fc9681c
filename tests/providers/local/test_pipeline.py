"""The local provider's turn logic with fake models: streaming, overlap, order, cancellation, cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_agent.config import load_config
from twisted_agent.providers.base import ICallInfo, IProvider, IProviderEvents, ProviderError
from twisted_agent.providers.local.interfaces import (
    ILanguageModel,
    ISpeechToText,
    ITextToSpeech,
    ModelStatus,
    Speech,
    Transcript,
)
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline


@implementer(ISpeechToText)
class FakeSTT:
    def __init__(self, text: str = "What are your opening hours?") -> None:
        self.text = text
        self.suppress = False
        #: the held job: its result comes with ``pending.callback(None)`` (or fails with errback)
        self.pending: Deferred[Any] | None = None
        self.hold = False
        self.heard: list[int] = []
        #: every worker is busy (other calls' turns): a job waits until the test frees one (worker_free)
        self.queued = False
        #: the waiting job's ``started``, told when a worker takes it
        self.waiting: list[Callable[[], object]] = []

    def transcribe(self, pcm: bytes, rate: int, language: str | None = None,
                   started: Callable[[], object] | None = None) -> Deferred[Transcript]:
        self.heard.append(len(pcm))
        result = Transcript("" if self.suppress else self.text, suppressed=self.suppress,
                            reason="no speech" if self.suppress else "")
        if self.queued:
            # as WorkerPool: a job cancelled while it waits leaves the queue and never starts
            self.pending = Deferred(lambda _: self.waiting.clear())
            self.waiting = [started or (lambda: None)]
            return self.pending.addCallback(lambda _: result)
        if started is not None:
            started()  # a worker is free: the job starts at once
        if self.hold:
            self.pending = Deferred()
            return self.pending.addCallback(lambda _: result)
        return succeed(result)

    def worker_free(self) -> None:
        """A worker takes the waiting job: it starts; its result comes with ``pending.callback``."""
        self.waiting.pop(0)()

    def status(self) -> ModelStatus:
        return ModelStatus("whisper", True, "whisper tiny.en loaded")

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)


@implementer(ILanguageModel)
class FakeLLM:
    """Streams its tokens when the test says so."""

    name = "fake"

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.on_token: Any = None
        self.reply: Deferred[str] | None = None
        self.cancelled = False
        self.messages: list[dict[str, str]] = []
        self.yielded_to: list[Deferred[Any]] = []

    def chat(self, messages: list[dict[str, str]], on_token: Any) -> Deferred[str]:
        self.messages = list(messages)
        self.on_token = on_token

        def cancel(_: Deferred[str]) -> None:
            self.cancelled = True

        self.reply = Deferred(cancel)
        return self.reply

    def yield_to(self, busy: Deferred[Any]) -> None:
        self.yielded_to.append(busy)

    def stream(self, count: int | None = None) -> None:
        tokens, self.tokens = (self.tokens, []) if count is None else (self.tokens[:count], self.tokens[count:])
        for token in tokens:
            self.on_token(token)

    def status(self) -> ModelStatus:
        return ModelStatus("fake", True, "fake llm")

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)


@implementer(ITextToSpeech)
class FakeTTS:
    """Speaks the text's bytes (prefixed by the voice, when one is asked for)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.voices: list[str | None] = []
        self.pending: list[Deferred[Any]] = []
        self.hold = False
        #: texts whose synthesis fails
        self.failing: set[str] = set()

    def synthesize(self, text: str, voice: str | None = None) -> Deferred[Speech]:
        self.requests.append(text)
        self.voices.append(voice)
        if text in self.failing:
            return fail(RuntimeError(f"the voice crashed on {text!r}"))
        said = text if voice is None else f"{voice}: {text}"
        speech = Speech(said.encode() + b"\x00" * (len(said) % 2), 8000)
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d.addCallback(lambda _: speech)
        return succeed(speech)

    def status(self) -> ModelStatus:
        return ModelStatus("piper", True, "piper joe")

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)


@implementer(ICallInfo, IProviderEvents)
class Sink:
    """The call: ICallInfo and IProviderEvents in one."""

    def __init__(self, config: Any) -> None:
        self.call_id = "c1"
        self.caller_number = "+1555"
        self.caller_name = "T"
        self.context_name = "default"
        self.context = config.contexts["default"]
        self.events = self
        self.log: list[tuple[Any, ...]] = []

    def transcript(self, text: str, final: bool) -> None:
        self.log.append(("transcript", text))

    def user_speech_started(self) -> None:
        self.log.append(("speech",))

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.log.append(("text", text))

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.log.append(("audio", pcm.rstrip(b"\x00").decode()))

    def utterance_end(self, utterance_id: str) -> None:
        self.log.append(("end",))

    def tool_request(self, name: str, arguments: dict[str, Any]) -> Any:
        return succeed(None)

    def work_started(self) -> None:
        self.log.append(("work_started",))

    def timing(self, stage: str, ms: float) -> None:
        self.log.append(("timing", stage, ms))

    def error(self, message: str, fatal: bool) -> None:
        self.log.append(("error", message, fatal))

    def audio(self) -> list[str]:
        return [entry[1] for entry in self.log if entry[0] == "audio"]


def make(tokens: list[str], **env: str) -> tuple[Any, Sink, FakeSTT, FakeLLM, FakeTTS, LocalPipeline]:
    config = load_config(None, {"CONTEXT_DEFAULT_GREETING": "", **env})
    stt, llm, tts = FakeSTT(), FakeLLM(tokens), FakeTTS()
    pipeline = LocalPipeline(Clock(), config, stt, llm, tts)
    provider = LocalFactory(pipeline).create()
    sink = Sink(config)
    provider.start(sink)
    for _ in range(25):
        provider.push_audio(bytes(320))
    return provider, sink, stt, llm, tts, pipeline


def test_fakes_and_provider_match_their_interfaces():
    provider, sink, stt, llm, tts, _ = make([])
    assert verifyObject(IProvider, provider) and verifyObject(IProviderEvents, sink)
    assert verifyObject(ISpeechToText, stt) and verifyObject(ILanguageModel, llm) and verifyObject(ITextToSpeech, tts)


def test_first_sentence_is_spoken_while_the_model_is_still_writing():
    tokens = ["We are", " open from", " nine to five", " on Saturday.", " On Sunday", " we are closed."]
    provider, sink, stt, llm, tts, _ = make(tokens, FIRST_PIECE_WORDS="0")
    turn = provider.end_of_turn()
    assert stt.heard == [25 * 320], "the turn's audio went to speech recognition"
    assert ("transcript", "What are your opening hours?") in sink.log
    llm.stream(4)
    assert sink.audio() == [], "a full stop is a sentence end only once the next text confirms it (not 3.5, Dr.)"
    llm.stream(1)
    assert sink.audio() == ["We are open from nine to five on Saturday."], "spoken before the reply is complete"
    assert not turn.called
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("".join(tokens))
    assert turn.called
    assert sink.audio() == ["We are open from nine to five on Saturday.", "On Sunday we are closed."]
    assert sink.log[-1] == ("end",)
    stages = [entry[1] for entry in sink.log if entry[0] == "timing"]
    assert stages[:3] == ["stt", "llm_first_token", "first_sentence"] and "tts_first_sentence" in stages
    assert llm.messages[0]["role"] == "system" and llm.messages[-1] == {"role": "user",
                                                                      "content": "What are your opening hours?"}


def test_pieces_are_spoken_in_order_even_when_synthesis_is_slow():
    provider, sink, _, llm, tts, _ = make(["One two three four five.", " Six seven.", " Eight nine."])
    tts.hold = True
    turn = provider.end_of_turn()
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("done")
    assert tts.requests == ["One two three four five."], "the next piece waits for the one before"
    for _ in range(3):
        tts.pending[-1].callback(None)
    assert sink.audio() == ["One two three four five.", "Six seven.", "Eight nine."]
    assert turn.called


def test_suppressed_transcript_gets_no_answer():
    provider, sink, stt, llm, _, _ = make(["Hi."])
    stt.suppress = True
    turn = provider.end_of_turn()
    assert turn.called and llm.reply is None and sink.audio() == []


def test_cancelling_the_turn_stops_the_model_and_pending_speech():
    provider, sink, _, llm, tts, _ = make(["First sentence here now.", " Second one."])
    tts.hold = True
    turn = provider.end_of_turn()
    llm.stream(1)
    turn.cancel()
    assert llm.cancelled
    assert isinstance(_failure(turn), CancelledError)
    for d in tts.pending:
        if not d.called:
            d.callback(None)
    assert sink.audio() == [] or sink.audio() == ["First sentence here now."]
    provider.close()
    assert ("end",) not in sink.log


def _failure(d: Deferred[Any]) -> Any:
    failures: list[Any] = []
    d.addErrback(lambda f: failures.append(f.value))
    return failures[0] if failures else None


def test_history_carries_the_conversation_and_is_bounded():
    provider, sink, stt, llm, _, _ = make(["Fine."], HISTORY_TURNS="2")
    for n in range(4):
        stt.text = f"question {n}"
        llm.tokens = [f"Answer {n}."]
        provider.push_audio(bytes(320))
        provider.end_of_turn()
        llm.stream()
        assert llm.reply is not None
        llm.reply.callback(f"Answer {n}.")
    contents = [m["content"] for m in llm.messages]
    assert llm.messages[0]["role"] == "system"
    assert contents[-1] == "question 3"
    assert "question 0" not in contents, "the oldest exchange was dropped"
    assert "Answer 2." in contents, "the latest exchange is kept"


def test_reply_cache_reuses_text_and_audio(tmp_path: Any):
    provider, sink, stt, llm, tts, pipeline = make(["We open at nine."], REPLY_CACHE="true")
    provider.end_of_turn()
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("We open at nine.")
    synthesized = len(tts.requests)
    provider.push_audio(bytes(320))
    llm.reply = None
    second = provider.end_of_turn()
    assert second.called and llm.reply is None, "no model ran"
    assert len(tts.requests) == synthesized and pipeline.cache_hits == 1
    assert sink.audio()[-1] == "We open at nine."


def test_busy_pipeline_refuses_new_calls():
    provider, _, stt, _, _, pipeline = make(["x."], LOCAL_MAX_QUEUE="1")
    stt.hold = True
    provider.end_of_turn()
    assert pipeline.pending_turns == 1
    with pytest.raises(ProviderError, match="busy"):
        LocalFactory(pipeline).create()


def test_greeting_is_synthesized_and_recorded():
    config = load_config(None, {"CONTEXT_DEFAULT_GREETING": "Hello there."})
    pipeline = LocalPipeline(Clock(), config, FakeSTT(), FakeLLM([]), FakeTTS())
    provider = LocalFactory(pipeline).create()
    sink = Sink(config)
    assert provider.start(sink).called
    assert sink.audio() == ["Hello there."] and sink.log[-1] == ("end",)
    assert provider.history.messages()[-1] == {"role": "assistant", "content": "Hello there."}


# --- speculation: the answer starts at the caller's first pause, and is held until the turn ends ---


def test_speculative_turn_is_held_until_the_turn_ends_then_released_in_order():
    provider, sink, stt, llm, tts, pipeline = make(["Nine", " to five."], FIRST_PIECE_WORDS="0")
    provider.speech_ended()  # the caller paused
    assert stt.heard == [25 * 320], "transcription started at the pause"
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("Nine to five.")
    assert tts.requests == ["Nine to five."], "the reply was synthesized before the turn ended"
    assert sink.log == [], "nothing reaches the call while the turn may still go on"
    assert len(provider.history) == 0, "the history is untouched until the turn is adopted"
    assert pipeline.pending_turns == 0
    for _ in range(10):
        provider.push_audio(bytes(320))  # the silence until the turn ends
    turn = provider.end_of_turn()
    assert turn.called, "the work was done: the answer is released at once"
    assert [e[0] for e in sink.log if e[0] != "timing"] == ["work_started", "transcript", "audio", "text", "end"]
    stages = [e[1] for e in sink.log if e[0] == "timing"]
    assert stages[0] == "stt" and "llm_first_token" in stages and stages[-1] == "speculation_head_start"
    assert [t.role for t in provider.history.turns] == ["user", "assistant"]
    assert provider.speculations_used == 1 and provider.speculations_discarded == 0
    assert stt.heard == [25 * 320], "not transcribed twice"


def test_caller_going_on_discards_the_speculation_and_the_next_pause_hears_everything():
    provider, sink, stt, llm, tts, _ = make(["Nine to five."])
    provider.speech_ended()
    first_reply = llm.reply
    provider.speech_started()  # the caller was only pausing mid-sentence
    assert llm.cancelled, "the language model stopped"
    assert first_reply is not None and first_reply.called
    assert sink.log == [] and len(provider.history) == 0
    for _ in range(15):
        provider.push_audio(bytes(320))
    provider.speech_ended()
    assert stt.heard == [25 * 320, 40 * 320], "the second try transcribes the whole utterance"
    turn = provider.end_of_turn()
    llm.cancelled = False
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("Nine to five.")
    assert turn.called and not llm.cancelled
    assert sink.audio() == ["Nine to five."], "one answer to the whole sentence"
    assert [t.role for t in provider.history.turns] == ["user", "assistant"]
    assert provider.speculations_used == 1 and provider.speculations_discarded == 1


def test_a_discarded_speculation_cancels_its_transcription_and_swallows_the_cancellation():
    provider, sink, stt, llm, tts, pipeline = make(["Hi."])
    stt.hold = True
    provider.speech_ended()
    assert stt.pending is not None
    pending = stt.pending
    provider.speech_started()
    assert pending.called, "the transcription job was cancelled with the turn"
    assert sink.log == [] and pipeline.pending_turns == 0 and llm.reply is None


def test_an_adopted_speculation_that_failed_fails_the_turn():
    provider, sink, stt, llm, tts, _ = make(["Hi."])
    stt.hold = True
    provider.speech_ended()
    assert stt.pending is not None
    stt.pending.errback(RuntimeError("worker died"))
    turn = provider.end_of_turn()
    failures: list[Any] = []
    turn.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError), "the call takes its failure path"


def test_speculation_can_be_switched_off():
    provider, sink, stt, llm, tts, _ = make(["Hi."], SPECULATE="false")
    provider.speech_ended()
    assert stt.heard == [] and llm.reply is None
    provider.end_of_turn()
    assert stt.heard == [25 * 320]


def test_hang_up_during_a_speculation_cancels_it():
    provider, sink, stt, llm, tts, pipeline = make(["Hi."])
    provider.speech_ended()
    provider.close()
    assert llm.cancelled and pipeline.pending_turns == 0 and sink.log == []


# --- the queue: the call hears when the turn's work starts, not when it was asked for ---------------


def test_the_call_hears_the_work_started_when_transcription_leaves_the_queue():
    provider, sink, stt, llm, tts, pipeline = make(["Nine to five."], SPECULATE="false")
    clock = pipeline.reactor
    stt.queued = True
    turn = provider.end_of_turn()
    clock.advance(3)  # other calls' turns hold the worker
    assert sink.log == [], "waiting in the queue is not work"
    stt.worker_free()
    assert sink.log == [("work_started",)]
    clock.advance(0.2)
    assert stt.pending is not None
    stt.pending.callback(None)
    assert sink.log[1] == ("timing", "stt", pytest.approx(200.0)), "transcription is timed from its start"
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("Nine to five.")
    assert turn.called and sink.audio() == ["Nine to five."]
    assert sink.log.count(("work_started",)) == 1, "once per turn: the model and the voice do not say it"


def test_a_turn_cancelled_while_queued_never_says_its_work_started():
    provider, sink, stt, llm, tts, _ = make(["Hi."], SPECULATE="false")
    stt.queued = True
    turn = provider.end_of_turn()
    turn.addErrback(lambda f: f.trap(CancelledError))
    turn.cancel()  # the caller went on, or the call's QUEUE_TIMEOUT ran out
    assert stt.waiting == [], "the job left the queue"
    assert sink.log == []


def test_a_speculations_work_is_said_to_start_when_it_is_adopted():
    provider, sink, stt, llm, tts, _ = make(["Hi."])
    provider.speech_ended()  # transcription starts at the pause, held
    assert sink.log == []
    provider.end_of_turn()
    assert sink.log[0] == ("work_started",), "released first, as the turn ends"


def test_a_speculation_still_queued_when_adopted_says_so_when_it_starts():
    provider, sink, stt, llm, tts, _ = make(["Hi."])
    stt.queued = True  # a discarded speculation's transcription still holds the worker
    provider.speech_ended()
    provider.end_of_turn()
    assert sink.log == [("timing", "speculation_head_start", 0.0)]
    stt.worker_free()
    assert sink.log[-1] == ("work_started",)


def test_first_piece_is_cut_at_a_word_boundary_when_no_punctuation_comes():
    tokens = ["The", " opening", " hours", " on", " Saturday", " are", " nine", " to", " five."]
    provider, sink, stt, llm, tts, _ = make(tokens)  # FIRST_PIECE_WORDS defaults to 5
    provider.end_of_turn()
    llm.stream(6)
    assert sink.audio() == ["The opening hours on Saturday"], "speech starts before the sentence is written"
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("The opening hours on Saturday are nine to five.")
    assert sink.audio() == ["The opening hours on Saturday", "are nine to five."]


def test_the_model_yields_to_the_first_piece_synthesis_only():
    tokens = ["Yes.", " We", " open", " at", " nine."]
    provider, sink, stt, llm, tts, _ = make(tokens)
    tts.hold = True
    provider.end_of_turn()
    llm.stream(2)
    assert tts.requests == ["Yes."] and len(llm.yielded_to) == 1
    busy = llm.yielded_to[0]
    assert not busy.called, "the model holds back while the first piece is synthesized"
    tts.pending[0].callback(None)
    assert busy.called and sink.audio() == ["Yes."]
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("Yes. We open at nine.")
    assert len(llm.yielded_to) == 1, "later pieces do not hold the model"


def test_cancelling_while_a_piece_is_synthesized_leaves_no_unhandled_error():
    import gc

    from twisted.logger import ILogObserver, globalLogPublisher

    errors: list[Any] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("isError") or "Unhandled error in Deferred" in str(event.get("log_format", "")):
            errors.append(event)

    def barge_in_mid_synthesis() -> None:
        provider, sink, stt, llm, tts, _ = make(["Yes.", " We", " open", " at", " nine."])
        tts.hold = True
        turn = provider.end_of_turn()
        llm.stream(2)
        assert tts.requests == ["Yes."] and tts.pending, "a piece is being synthesized"
        turn.addErrback(lambda f: f.trap(CancelledError))
        turn.cancel()  # barge-in or hang-up
        assert llm.cancelled and tts.pending[0].called, "the model and the synthesis were both stopped"

    globalLogPublisher.addObserver(observe)
    try:
        barge_in_mid_synthesis()
        gc.collect()  # an unhandled failure is reported when its Deferred is collected
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == [], "a cancelled synthesis chain was left with an unhandled CancelledError"


def test_no_speculation_while_other_calls_use_the_models():
    provider, sink, stt, llm, tts, pipeline = make(["Hi."])
    other = LocalFactory(pipeline).create()
    other.start(sink)
    other.push_audio(bytes(320 * 25))
    other.end_of_turn()  # another call's turn holds the model (its reply is still being written)
    assert pipeline.pending_turns == 1
    provider.speech_ended()
    assert provider.speculations_skipped == 1 and len(stt.heard) == 1, "no work that might be thrown away"
    provider.end_of_turn()
    assert len(stt.heard) == 2, "the turn itself still runs"


# --- barge-in: the history keeps what the caller heard ---------------------------------------------


def test_heard_text_counts_whole_pieces_then_a_share_of_the_next():
    from twisted_agent.providers.local.pipeline import heard_text

    pieces = [("We are open", 1000), ("from nine to five on Saturday.", 2000)]
    assert heard_text(pieces, 0) == ""
    assert heard_text(pieces, 500) == "We"
    assert heard_text(pieces, 1000) == "We are open"
    assert heard_text(pieces, 2000) == "We are open from nine to"
    assert heard_text(pieces, 5000) == "We are open from nine to five on Saturday."


def test_barge_in_after_the_reply_was_written_truncates_it_to_what_was_heard():
    provider, sink, stt, llm, tts, _ = make(["Yes.", " We open at nine", " and close at five."], FIRST_PIECE_WORDS="0")
    provider.end_of_turn()
    llm.stream()
    assert llm.reply is not None
    llm.reply.callback("Yes. We open at nine and close at five.")
    utterance = "c1-1"
    spoken = {text: len(text.encode()) * 1000 // 16000 for text in sink.audio()}  # FakeTTS: text bytes as PCM
    first = sink.audio()[0]
    provider.interrupt({utterance: spoken[first] + 1})
    turns = provider.history.turns
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].content.startswith("Yes."), "only what was heard stays"
    assert "five" not in turns[-1].content


def test_barge_in_while_the_reply_is_still_being_written_keeps_the_heard_part():
    provider, sink, stt, llm, tts, _ = make(["Yes.", " We", " open", " at nine", " and"], FIRST_PIECE_WORDS="0")
    turn = provider.end_of_turn()
    llm.stream(2)
    assert sink.audio() == ["Yes."]
    provider.interrupt({"c1-1": 10_000})  # all of "Yes." was heard; the rest was never spoken
    assert llm.cancelled
    failures: list[Any] = []
    turn.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError), "the engine's turn Deferred fails with the cancellation"
    assert [(t.role, t.content) for t in provider.history.turns] == [
        ("user", "What are your opening hours?"), ("assistant", "Yes.")]


def test_caller_going_on_during_transcription_keeps_the_audio_for_the_next_turn():
    provider, sink, stt, llm, tts, _ = make(["Hi."], SPECULATE="false")
    stt.hold = True
    turn = provider.end_of_turn()
    turn.addErrback(lambda f: f.trap(CancelledError))
    turn.cancel()  # the engine: the caller spoke again before the reply began
    provider.speech_started()
    for _ in range(10):
        provider.push_audio(bytes(320))
    stt.hold = False
    provider.end_of_turn()
    assert stt.heard[-1] == 35 * 320, "the next turn hears the first part too"
