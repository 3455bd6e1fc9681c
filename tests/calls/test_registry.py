from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_agent.calls.registry import CallRegistry, ICallHandle, Refusal
from twisted_agent.status import IStatusSource


@implementer(ICallHandle)
class FakeCall:
    def __init__(self, call_id: str, registry: CallRegistry | None = None, slow: bool = False) -> None:
        self.call_id = call_id
        self.released: list[str] = []
        self._registry = registry
        self._slow = slow
        self.pending: Deferred[None] | None = None

    def release(self, reason: str) -> Deferred[None]:
        self.released.append(reason)
        if self._slow:
            self.pending = Deferred()
            return self.pending
        return succeed(None)


def test_fake_and_registry_provide_their_interfaces():
    registry = CallRegistry(Clock())
    assert verifyObject(ICallHandle, FakeCall("a"))
    assert verifyObject(IStatusSource, registry)


def test_admit_and_discard():
    registry = CallRegistry(Clock())
    registry.admit(FakeCall("a"))
    registry.admit(FakeCall("b"))
    assert len(registry) == 2 and "a" in registry
    with pytest.raises(ValueError):
        registry.admit(FakeCall("a"))
    registry.discard("a")
    registry.discard("a")  # idempotent
    assert len(registry) == 1
    assert registry.total_admitted == 2


def test_call_limit_refuses_and_recovers():
    registry = CallRegistry(Clock(), max_calls=1)
    registry.admit(FakeCall("a"))
    assert not registry.accepting
    with pytest.raises(Refusal) as info:
        registry.admit(FakeCall("b"))
    assert info.value.reason == "full"
    registry.discard("a")
    assert registry.accepting
    registry.admit(FakeCall("b"))
    assert registry.total_refused == 1


def test_drain_with_no_calls_finishes_at_once():
    registry = CallRegistry(Clock())
    d = registry.drain(30)
    assert registry.draining and not registry.accepting
    assert d.called
    with pytest.raises(Refusal) as info:
        registry.admit(FakeCall("late"))
    assert info.value.reason == "draining"


def test_drain_waits_for_calls_to_end_by_themselves():
    clock = Clock()
    registry = CallRegistry(clock)
    calls = [FakeCall("a"), FakeCall("b")]
    for call in calls:
        registry.admit(call)
    d = registry.drain(30)
    clock.advance(10)
    registry.discard("a")
    assert not d.called
    clock.advance(10)
    registry.discard("b")
    assert d.called
    assert [c.released for c in calls] == [[], []], "calls that ended by themselves are not released"
    clock.advance(60)  # the timeout was cancelled: nothing fires late
    assert registry.status().state == "draining"


def test_drain_releases_calls_left_at_the_timeout():
    clock = Clock()
    registry = CallRegistry(clock)
    quick, slow = FakeCall("quick"), FakeCall("slow", slow=True)
    registry.admit(quick)
    registry.admit(slow)
    d = registry.drain(30)
    clock.advance(29.9)
    assert not d.called and quick.released == []
    clock.advance(0.2)
    assert quick.released == ["shutdown"] and slow.released == ["shutdown"]
    assert not d.called, "drain waits for the release to finish"
    assert slow.pending is not None
    slow.pending.callback(None)
    assert d.called
    assert len(registry) == 0


def test_drain_survives_a_failing_release():
    clock = Clock()
    registry = CallRegistry(clock)
    call = FakeCall("x", slow=True)
    registry.admit(call)
    d = registry.drain(1)
    clock.advance(1)
    assert call.pending is not None
    call.pending.errback(RuntimeError("ARI gone"))
    assert d.called and len(registry) == 0


@given(st.lists(st.sampled_from(["admit", "end"]), max_size=40), st.integers(0, 5))
def test_active_count_never_exceeds_the_limit(ops, limit):
    registry = CallRegistry(Clock(), max_calls=limit)
    live: list[str] = []
    for n, op in enumerate(ops):
        if op == "admit":
            try:
                registry.admit(FakeCall(str(n)))
                live.append(str(n))
            except Refusal:
                assert limit and len(live) >= limit
        elif live:
            registry.discard(live.pop(0))
        assert len(registry) == len(live)
        assert not limit or len(registry) <= limit
