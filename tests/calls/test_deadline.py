"""AnswerDeadline on task.Clock: QUEUE_TIMEOUT until the turn's work starts, then PROVIDER_TIMEOUT."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.deadline import AnswerDeadline


def make(queue: float = 20.0, provider: float = 10.0) -> tuple[Clock, AnswerDeadline, list[tuple[str, str, float]]]:
    clock = Clock()
    expired: list[tuple[str, str, float]] = []
    deadline = AnswerDeadline(clock, queue, provider,
                              lambda reason, what: expired.append((reason, what, clock.seconds())))
    return clock, deadline, expired


def test_the_wait_in_the_queue_has_its_own_bound() -> None:
    clock, deadline, expired = make()
    deadline.turn_started()
    clock.advance(19.9)  # twice PROVIDER_TIMEOUT, still queued: nothing is wrong with the provider
    assert expired == [] and deadline.pending
    clock.advance(0.1)
    assert expired == [("queue_timeout", "did not start on the turn within 20s (QUEUE_TIMEOUT: its work waited "
                        "behind other calls' turns)", 20.0)]
    assert not deadline.pending and deadline.phase == "idle"


def test_provider_timeout_counts_from_when_the_work_started() -> None:
    clock, deadline, expired = make()
    deadline.turn_started()
    clock.advance(15)
    assert deadline.work_started() and deadline.phase == "working"
    clock.advance(9.9)  # 24.9 s after the turn end: past QUEUE_TIMEOUT, which no longer applies
    assert expired == []
    clock.advance(0.1)
    assert expired == [("provider_timeout", "gave no answer within 10s of starting on the turn (PROVIDER_TIMEOUT)",
                        25.0)]


def test_only_the_first_report_of_work_starts_the_count() -> None:
    clock, deadline, expired = make()
    assert not deadline.work_started(), "no turn waits for its work"
    deadline.turn_started()
    clock.advance(1)
    assert deadline.work_started()
    clock.advance(5)
    assert not deadline.work_started(), "a repeated report does not restart PROVIDER_TIMEOUT"
    clock.advance(5)
    assert [reason for reason, _, _ in expired] == ["provider_timeout"] and expired[0][2] == 11.0


def test_cancelled_it_never_fires_and_a_late_report_starts_nothing() -> None:
    clock, deadline, expired = make()
    deadline.turn_started()
    clock.advance(3)
    deadline.cancel()  # the caller went on, or the answer began playing
    assert not deadline.work_started()
    clock.advance(60)
    assert expired == [] and not deadline.pending
    deadline.turn_started()  # the next turn: a fresh QUEUE_TIMEOUT
    clock.advance(20)
    assert [(reason, at) for reason, _, at in expired] == [("queue_timeout", 83.0)]
