"""The echo provider: answers every turn by saying how long the caller spoke.

For tests, benchmarks and the demo until a real pipeline is chosen: it exercises the whole call
path (greeting, turn-taking, gating, replies, interruption, tools) with no model, instantly or
after a configurable thinking delay.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from twisted_agent.providers.base import ICallInfo, IProvider, IProviderFactory, ProviderReadiness
from twisted_agent.providers.voices import ToneVoice


@implementer(IProvider)
class EchoProvider:
    name = "echo"
    wants_turn_taking = True

    def __init__(self, clock: IReactorTime | None, voice: ToneVoice | None = None, think_ms: int = 0) -> None:
        self._clock = clock
        self.voice = voice or ToneVoice()
        self.think_ms = think_ms
        self.call: Any = None
        self._turn_frames = 0
        self._utterances = 0
        self.turns: list[int] = []
        self.interruptions: list[dict[str, int]] = []
        self.digits: list[str] = []
        self.closed = False

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        greeting = call.context.greeting
        if greeting:
            self._say(greeting)
        return succeed(None)

    def push_audio(self, frame: bytes) -> None:
        self._turn_frames += 1

    def speech_started(self) -> None:
        pass

    def speech_ended(self) -> None:
        pass

    def end_of_turn(self) -> Deferred[None]:
        frames, self._turn_frames = self._turn_frames, 0
        self.call.events.work_started()  # nothing queues here: the thinking delay is the work
        if not self.think_ms:
            self._answer(frames)
            return succeed(None)
        assert self._clock is not None, "a thinking delay needs a clock"

        def given_back(failure: Any) -> Any:
            # cancelled before a word of the answer: the caller went on, the next turn counts this part too
            self._turn_frames += frames
            return failure

        return deferLater(self._clock, self.think_ms / 1000, self._answer, frames).addErrback(given_back)

    def _answer(self, frames: int) -> None:
        heard_ms = frames * 20
        self.turns.append(heard_ms)
        self.call.events.transcript(f"[{heard_ms} ms of speech]", True)
        self._say(f"You spoke for {heard_ms / 1000:.1f} seconds.")

    def _say(self, text: str) -> None:
        if self.closed:
            return
        self._utterances += 1
        utterance_id = f"{self.call.call_id}-{self._utterances}"
        events = self.call.events
        events.agent_text(text, utterance_id)
        events.agent_audio(self.voice.render(text), self.voice.rate, utterance_id)
        events.utterance_end(utterance_id)

    def interrupt(self, heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        self.interruptions.append(dict(heard_ms_by_utterance))
        return succeed(None)

    def speak(self, text: str) -> Deferred[None]:
        self._say(text)
        return succeed(None)

    def dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(IProviderFactory)
class EchoFactory:
    name = "echo"

    def __init__(self, clock: IReactorTime | None = None, think_ms: int = 0) -> None:
        self._clock = clock
        self.think_ms = think_ms
        self.created: list[EchoProvider] = []

    def readiness(self) -> ProviderReadiness:
        return ProviderReadiness("echo", True, "test provider: answers with how long the caller spoke")

    def when_ready(self) -> Deferred[None]:
        return succeed(None)  # nothing to load

    def create(self) -> EchoProvider:
        provider = EchoProvider(self._clock, think_ms=self.think_ms)
        self.created.append(provider)
        return provider
