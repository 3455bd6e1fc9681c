"""InactivityWatchdog on task.Clock: ask after the prompt delay, give up after the hang-up delay; and
InactivityPrompts: what the agent says then, and when the call ends."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from twisted_agent.calls.watchdog import InactivityPrompts, InactivityWatchdog
from twisted_agent.config import ContextConfig


def make(prompt: float = 30, hangup: float = 15) -> tuple[Clock, InactivityWatchdog, list[str], list[bool]]:
    clock, said, talking = Clock(), [], [False]
    watchdog = InactivityWatchdog(clock, prompt, hangup, lambda: said.append("still there?"),
                                  lambda: said.append("goodbye"), lambda: talking[0])
    return clock, watchdog, said, talking


def test_asks_then_gives_up_counting_only_the_callers_turns():
    clock, watchdog, said, _ = make()
    watchdog.waiting()
    clock.advance(20)
    watchdog.busy()  # the agent speaks for a minute: that is not the caller's silence
    clock.advance(60)
    watchdog.waiting()
    clock.advance(29.9)
    assert said == []
    clock.advance(0.1)
    assert said == ["still there?"] and watchdog.stage == 1
    watchdog.busy()  # the question is being spoken
    clock.advance(3)
    watchdog.waiting()
    clock.advance(14.9)
    assert said == ["still there?"]
    clock.advance(0.1)
    assert said == ["still there?", "goodbye"] and watchdog.stage == 2
    watchdog.waiting()
    clock.advance(1000)
    assert said == ["still there?", "goodbye"] and not watchdog.armed, "nothing after giving up"


def test_the_caller_showing_life_starts_it_afresh():
    clock, watchdog, said, _ = make()
    watchdog.waiting()
    clock.advance(30)
    assert said == ["still there?"]
    clock.advance(10)
    assert not watchdog.active(), "had not given up yet"
    assert watchdog.stage == 0 and watchdog.armed
    clock.advance(29)
    assert said == ["still there?"], "30 s from the caller's answer, not 15 from the question"
    clock.advance(1)
    assert said == ["still there?", "still there?"]
    clock.advance(15)
    assert watchdog.active(), "a caller who speaks over the goodbye: the call may stay"


def test_a_long_turn_is_not_silence_and_zero_switches_it_off():
    clock, watchdog, said, talking = make(prompt=5, hangup=3)
    watchdog.waiting()
    talking[0] = True
    clock.advance(12)
    assert said == [] and watchdog.armed
    talking[0] = False
    clock.advance(5)
    assert said == ["still there?"]
    clock, off, said, _ = make(prompt=0)
    off.waiting()
    clock.advance(10_000)
    assert said == [] and not off.armed


class Agent:
    """The call's side of the prompts: a provider whose speech the test finishes, and the call's state."""

    def __init__(self, context: ContextConfig | None = None) -> None:
        self.clock = Clock()
        self.context = context or ContextConfig()
        self.may_speak = True
        self.said: list[str] = []
        self.speaking: list[Deferred[None]] = []
        self.waiting: list[Any] = []  # actions waiting for the agent to finish speaking
        self.left = 0
        self.counts: Counter[str] = Counter()
        self.prompts = InactivityPrompts(
            self.clock, 30, 15, "c1", talking=lambda: False, speaker=lambda: self if self.may_speak else None,
            context=lambda: self.context, after_speaking=self.waiting.append, leave=self.leave,
            count=lambda what: self.counts.update([what]))
        self.watchdog = self.prompts.watchdog

    def speak(self, text: str) -> Deferred[None]:
        self.said.append(text)
        self.speaking.append(Deferred())
        return self.speaking[-1]

    def leave(self) -> None:
        self.left += 1

    def silence(self, seconds: float) -> None:
        """The caller's turn, and they say nothing for ``seconds``."""
        self.watchdog.waiting()
        self.clock.advance(seconds)

    def finished_speaking(self) -> None:
        for d in self.speaking:
            if not d.called:
                d.callback(None)
        waiting, self.waiting[:] = list(self.waiting), []
        for action in waiting:
            action()


def test_a_silent_caller_is_asked_then_told_goodbye_and_the_call_ends_once_that_was_heard() -> None:
    agent = Agent()
    agent.silence(30)
    assert agent.said == ["Are you still there?"] and agent.counts["inactivity_prompts"] == 1
    agent.finished_speaking()
    agent.silence(15)
    assert agent.said[-1].startswith("I haven't heard from you") and agent.counts["inactivity_hangups"] == 1
    assert agent.left == 0, "not while the goodbye is being said"
    agent.finished_speaking()
    assert agent.left == 1


def test_a_caller_who_speaks_over_the_goodbye_stays() -> None:
    agent = Agent()
    agent.silence(30)
    agent.silence(15)
    agent.speaking[-1].callback(None)  # the goodbye is out; its audio is still playing
    assert len(agent.waiting) == 1
    agent.prompts.caller_active()
    agent.finished_speaking()
    assert agent.left == 0 and agent.watchdog.stage == 0


def test_nothing_is_said_when_the_agent_may_not_speak_now() -> None:
    agent = Agent()
    agent.may_speak = False  # e.g. the call is failing or ending
    agent.silence(30)
    agent.silence(15)
    assert agent.said == [] and agent.counts == Counter() and agent.left == 0


def test_without_words_the_prompts_are_silent_and_a_failed_goodbye_still_ends_the_call() -> None:
    agent = Agent(ContextConfig(still_there="", goodbye=""))
    agent.silence(30)
    agent.silence(15)
    assert agent.said == [] and agent.counts["inactivity_prompts"] == 1
    agent.finished_speaking()
    assert agent.left == 1, "no goodbye to wait for"
    broken = Agent()
    broken.speak = lambda text: fail(RuntimeError("TTS down"))  # type: ignore[method-assign]
    broken.silence(30)
    broken.silence(15)
    broken.finished_speaking()
    assert broken.left == 1
