"""Timer on task.Clock: one pending call at a time, restarted or cancelled from anywhere."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.timer import Timer


def test_a_restart_replaces_what_was_pending() -> None:
    clock, fired = Clock(), list[str]()
    timer = Timer(clock)
    timer.start(1.0, fired.append, "first")
    clock.advance(0.5)
    timer.start(1.0, fired.append, "second")
    clock.advance(0.9)
    assert fired == [] and timer.pending
    clock.advance(0.1)
    assert fired == ["second"] and not timer.pending
    clock.advance(10)
    assert fired == ["second"]


def test_it_is_not_pending_while_its_function_runs_and_cancelling_is_always_allowed() -> None:
    clock, seen = Clock(), list[object]()
    timer = Timer(clock)
    timer.cancel()  # never started
    timer.start(0.2, lambda: seen.append(timer.pending))
    clock.advance(0.2)
    assert seen == [False]
    timer.cancel()  # already fired
    timer.start(0.2, lambda: seen.append("late"))
    timer.cancel()
    clock.advance(1)
    assert seen == [False] and not timer.pending and clock.getDelayedCalls() == []
