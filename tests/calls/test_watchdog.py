"""InactivityWatchdog on task.Clock: ask after the prompt delay, give up after the hang-up delay."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.watchdog import InactivityWatchdog


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
