"""Whole conversations against the simulated Asterisk: what the agent remembers after a barge-in, and keys.

The real engine runs the real local provider (LocalPipeline/LocalProvider) with scripted models: the
language model streams its reply token by token on its own, the voice is the tone voice (one burst
per word, so the caller's track tells how many words of a reply were heard). After every call the
simulator has no live channel or bridge and MEDIA_DIR holds no reply file.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.calls.simstack import QUESTION, Stack, sleep, until
from tests.providers.local.test_pipeline import FakeSTT
from twisted_agent.providers.echo import EchoProvider
from twisted_agent.providers.local.interfaces import (
    ILanguageModel,
    ISpeechToText,
    ITextToSpeech,
    ModelStatus,
    Speech,
)
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline, LocalProvider
from twisted_agent.providers.voices import ToneVoice

#: the clip's first 240 ms are silent: the caller's voice reaches the line after that
CLIP_LEAD = 0.24
FIRST_QUESTION = "What are your opening hours?"
SECOND_QUESTION = "Do you sell bread?"
FIRST_SENTENCE = "We open at nine every morning."
LATER_SENTENCES = ["On Saturdays we close at noon because the bakers rest.",
                   "On Sundays the shop stays closed all day long."]
#: four sentences, 35 words: 5.6 s of tone voice
LONG_REPLY = " ".join([FIRST_SENTENCE, "The bakery closes at six in the evening on weekdays.", *LATER_SENTENCES])
SHORT_REPLY = "Yes we bake fresh bread every day."
#: when the caller talks over the long reply (seconds into it, at their first syllable)
TALK_OVER_AFTER = 1.5
LONG_GREETING = "Hello and welcome to the bakery, we are glad you called, how can we help you today?"


@implementer(ILanguageModel)
class ScriptedLLM:
    """Answers each question with its scripted reply, streamed one word every few ms on its own."""

    name = "scripted"

    def __init__(self, replies: dict[str, str], gap: float = 0.004) -> None:
        self.replies = replies
        self.gap = gap
        #: the messages of every request, in order (speculative ones included)
        self.requests: list[list[dict[str, str]]] = []
        self.cancelled = 0

    def chat(self, messages: list[dict[str, str]], on_token: Any) -> Deferred[str]:
        self.requests.append([dict(message) for message in messages])
        asked = messages[-1]["content"]
        reply = next((text for question, text in self.replies.items() if asked.endswith(question)), "Sorry?")
        words = reply.split(" ")
        tokens = [words[0], *(" " + word for word in words[1:])]
        pending: list[IDelayedCall] = []

        def cancel(_: Deferred[str]) -> None:
            self.cancelled += 1
            for delayed in pending:
                if delayed.active():
                    delayed.cancel()

        done: Deferred[str] = Deferred(cancel)

        def step(index: int) -> None:
            pending.clear()
            if index < len(tokens):
                on_token(tokens[index])
                pending.append(reactor.callLater(self.gap, step, index + 1))
            else:
                done.callback(reply)

        pending.append(reactor.callLater(self.gap, step, 0))
        return done

    def yield_to(self, busy: Deferred[Any]) -> None:
        pass  # not on this machine's CPU: nothing to pause

    def status(self) -> ModelStatus:
        return ModelStatus("scripted", True, "scripted llm")

    def start(self) -> Deferred[None]:
        return deferLater(reactor, 0, lambda: None)

    def stop(self) -> Deferred[None]:
        return deferLater(reactor, 0, lambda: None)


@implementer(ITextToSpeech)
class ToneTTS:
    """Speaks each piece in the tone voice a few ms after being asked: audible, as long as speech."""

    def __init__(self) -> None:
        self.voice = ToneVoice()
        self.requests: list[str] = []

    def synthesize(self, text: str, voice: str | None = None) -> Deferred[Speech]:
        self.requests.append(text)
        return deferLater(reactor, 0.005, lambda: Speech(self.voice.render(text), self.voice.rate))

    def status(self) -> ModelStatus:
        return ModelStatus("tone", True, "tone voice")

    def start(self) -> Deferred[None]:
        return deferLater(reactor, 0, lambda: None)

    def stop(self) -> Deferred[None]:
        return deferLater(reactor, 0, lambda: None)


async def with_local_provider(stack: Stack) -> tuple[FakeSTT, ScriptedLLM, ToneTTS]:
    """The engine's "local" provider becomes the real pipeline over scripted models.

    Calls choose it with the channel variable AI_PROVIDER=local (the engine's default stays echo,
    so the real models are never loaded)."""
    stt, llm, tts = FakeSTT(FIRST_QUESTION), ScriptedLLM({FIRST_QUESTION: LONG_REPLY, SECOND_QUESTION: SHORT_REPLY}), \
        ToneTTS()
    assert verifyObject(ISpeechToText, stt) and verifyObject(ILanguageModel, llm) and verifyObject(ITextToSpeech, tts)
    pipeline = LocalPipeline(reactor, stack.engine.config, stt, llm, tts)
    factory = LocalFactory(pipeline)
    await pipeline.start()
    assert factory.readiness().ready, factory.readiness()
    stack.engine.providers.factories["local"] = factory
    assert stack.engine.providers.readiness()["local"].ready
    return stt, llm, tts


def deleted_playbacks(stack: Stack) -> list[str]:
    return [path.rsplit("/", 1)[-1] for method, path, _ in stack.sim.requests
            if method == "DELETE" and "/playbacks/" in path]


@pytest.mark.parametrize("env", [{"DOWNSTREAM_MODE": "stream"}, {}], ids=["rtp-stream", "rtp-file"])
@pytest_twisted.ensureDeferred
async def test_barge_in_leaves_only_what_the_caller_heard_in_the_conversation(stacks: Any, env: dict[str, str]) -> None:
    file_mode = "DOWNSTREAM_MODE" not in env
    stack = await stacks(FILLER_MS="0", **env)
    stt, llm, _ = await with_local_provider(stack)
    caller = stack.call(variables={"AI_PROVIDER": "local"})
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    call = next(iter(stack.engine.calls.values()))
    provider = call.provider
    assert isinstance(provider, LocalProvider)
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    greeting_words = len(caller.heard_segments())

    await caller.say(QUESTION)
    await until(lambda: len(caller.heard_segments()) > greeting_words, timeout=5, what="the long reply")
    origin = caller.answered_at
    assert origin is not None
    reply_started = origin + caller.heard_segments()[greeting_words][0]
    await until(lambda: [t.content for t in provider.history.turns][-2:] == [FIRST_QUESTION, LONG_REPLY],
                timeout=3, what="the whole reply to be written into the history")
    stt.text = SECOND_QUESTION  # what the caller says over the reply
    await sleep(max(0.0, reply_started + TALK_OVER_AFTER - CLIP_LEAD - reactor.seconds()))
    assert call.state == "speaking", "the agent is still reading its reply"
    if file_mode:
        assert stack.reply_files(), "the reply's later sentences wait in MEDIA_DIR"
    speech_started = reactor.seconds() + CLIP_LEAD
    speaking = caller.say(QUESTION)
    await until(lambda: bool(call.barge_ins), timeout=3, what="the barge-in")
    assert len(call.barge_ins) == 1, "one interruption"
    stopped_after = call.barge_ins[0] - speech_started
    limit = 0.45 if file_mode else 0.3  # file mode: TALK_DETECT confirms at BARGE_IN_MIN_MS + 100 ms
    assert 0.1 < stopped_after < limit, f"the agent stopped {stopped_after * 1000:.0f} ms after the caller began"
    await until(lambda: provider.history.turns[-1].content != LONG_REPLY, timeout=2,
                what="the provider to be told what was heard")
    last = provider.history.turns[-1]
    assert last.role == "assistant"
    kept = last.content
    if file_mode:
        # the cut-off playbacks were stopped through ARI and their files deleted, while the caller still speaks
        await until(lambda: not stack.reply_files(), timeout=2, what="the cut-off reply's files to be deleted")
        assert not speaking.called, "deleted at the barge-in, not at the end of the call"
        await until(lambda: not stack.sim.pbx.playback.playbacks, timeout=2, what="no playback left queued")
    await speaking

    # what the caller heard: one tone burst per word of the reply, and nothing after the barge-in
    segments = caller.heard_segments()[greeting_words:]
    words_heard = len(segments)
    assert origin + segments[-1][1] < call.barge_ins[0] + 0.1, "no agent audio on the wire after the barge-in"
    reply_words = LONG_REPLY.split()
    assert TALK_OVER_AFTER / 0.16 <= words_heard < len(reply_words), f"{words_heard} words of the reply were heard"
    if file_mode:
        playing = segments[-1][2].removeprefix("playback:")
        assert playing in deleted_playbacks(stack), "the playback the caller was hearing was stopped through ARI"

    # the conversation keeps what was heard: the first sentence(s), not the rest
    kept_words = kept.split()
    assert kept_words == reply_words[: len(kept_words)], f"a prefix of the reply: {kept!r}"
    assert kept.startswith(FIRST_SENTENCE), kept
    assert not any(sentence in kept for sentence in LATER_SENTENCES), kept
    assert words_heard - 2 <= len(kept_words) <= words_heard, \
        f"kept {len(kept_words)} words ({kept!r}); the caller heard {words_heard}"

    # the caller's new question gets an answer, and the model is asked with the truncated history
    heard_before = len(caller.heard_segments())
    await until(lambda: len(caller.heard_segments()) > heard_before, timeout=5, what="the answer to the new question")
    asked = [messages for messages in llm.requests if messages[-1]["content"] == SECOND_QUESTION]
    assert asked, f"the model was asked the new question: {llm.requests!r}"
    messages = asked[-1]
    assert messages[-3:] == [{"role": "user", "content": FIRST_QUESTION}, {"role": "assistant", "content": kept},
                             {"role": "user", "content": SECOND_QUESTION}]
    assert not any(sentence in message["content"] for message in messages for sentence in LATER_SENTENCES), \
        "the model is not told it said what nobody heard"
    await until(lambda: provider.history.turns[-1].content == SHORT_REPLY, timeout=3, what="the answer in the history")
    assert [(t.role, t.content) for t in provider.history.turns][-4:] == [
        ("user", FIRST_QUESTION), ("assistant", kept), ("user", SECOND_QUESTION), ("assistant", SHORT_REPLY)]
    await caller.hangup()
    assert await caller.ended == "caller hung up"
    await stack.all_released()


@pytest.mark.parametrize("env", [{}, {"DOWNSTREAM_MODE": "stream"}], ids=["rtp-file", "rtp-stream"])
@pytest_twisted.ensureDeferred
async def test_a_key_reaches_the_provider_and_the_transfer_key_sends_the_caller_to_a_human(
        stacks: Any, env: dict[str, str]) -> None:
    stack = await stacks(TRANSFER_DIGIT="0", TRANSFER_CONTEXT="humans", TRANSFER_EXTENSION="100",
                         TRANSFER_PRIORITY="2", CONTEXT_DEFAULT_GREETING=LONG_GREETING, **env)
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    call = next(iter(stack.engine.calls.values()))
    provider: EchoProvider = call.provider
    assert call.state == "speaking"

    caller.send_dtmf("5")
    await until(lambda: bool(provider.digits), timeout=3, what="the key to reach the provider")
    await sleep(0.2)  # a second delivery of the same key would have come by now
    assert provider.digits == ["5"], "the provider got the key once"
    assert call.state == "speaking" and not caller.ended.called, "an ordinary key does not interrupt the agent"

    caller.send_dtmf("0", duration_ms=100)
    released = reactor.seconds() + 0.1  # ChannelDtmfReceived comes when the key is released
    assert await caller.ended == "continued in dialplan"
    left_at = reactor.seconds()
    left_after = left_at - released
    assert left_after < 0.5, f"the caller left the agent {left_after * 1000:.0f} ms after the key"
    assert caller.continued_to == ("humans", "100", 2)
    assert provider.digits == ["5"], "the transfer key is the engine's, not the provider's"
    assert call.end_reason == "caller asked for a human"
    assert stack.engine.counters["transfers_by_key"] == 1
    assert caller.answered_at is not None
    greeting_seconds = ToneVoice().duration_ms(LONG_GREETING) / 1000
    assert left_at - caller.answered_at < greeting_seconds, "the caller left mid-greeting, not after it"
    await stack.all_released()
    assert not stack.sim.pbx.playback.playbacks, "no playback left behind"


@pytest_twisted.ensureDeferred
async def test_a_key_pressed_on_an_audiosocket_call_reaches_the_provider_once(stacks: Any) -> None:
    stack = await stacks(AUDIO_TRANSPORT="audiosocket")
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    call = next(iter(stack.engine.calls.values()))
    provider: EchoProvider = call.provider
    # while a file plays Asterisk suspends the caller from the bridge (no DTMF frame on the leg): press after it
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    caller.send_dtmf("5")
    await until(lambda: bool(provider.digits), timeout=3, what="the key to reach the provider")
    await sleep(0.3)  # a second delivery of the same key would have come by now
    dtmf_events = [e for e in stack.sim.events_sent() if e.get("type") == "ChannelDtmfReceived"]
    assert len(dtmf_events) == 1, "the caller pressed one key"
    assert call.session.dtmf == 0, "absorbDTMF kept it out of the bridge: no AudioSocket DTMF frame as well"
    assert provider.digits == ["5"], f"one press, one digit: {provider.digits!r}"
    await caller.hangup()
    await stack.all_released()
