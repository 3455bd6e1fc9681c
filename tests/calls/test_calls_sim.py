"""Whole calls: the real engine (AgentService) against the simulated Asterisk, on loopback sockets.

After every call: the simulator has no live channel or bridge, and MEDIA_DIR holds no reply file.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults

from tests.calls.simstack import QUESTION, converse, reply_audio, sleep, until
from twisted_agent.calls.engine import APOLOGY_NAME
from twisted_agent.providers.echo import EchoFactory, EchoProvider


@pytest.mark.parametrize("env", [{}, {"AUDIO_TRANSPORT": "audiosocket"}, {"DOWNSTREAM_MODE": "stream"}],
                         ids=["rtp-file", "audiosocket-file", "rtp-stream"])
@pytest_twisted.ensureDeferred
async def test_a_whole_call(stacks: Any, env: dict[str, str]) -> None:
    stack = await stacks(**env)
    caller = stack.call()
    await converse(caller)
    call = next(iter(stack.engine.calls.values()))
    provider: EchoProvider = call.provider
    assert len(provider.turns) == 1
    spoke_ms = provider.turns[0]
    assert 2500 <= spoke_ms <= 4500, "the engine heard the caller's question"
    reply = call.conversation[-1][1]
    assert call.conversation[0] == ("agent", "Hello, how can I help you?")
    assert reply.startswith("You spoke for")
    heard = caller.heard()
    if "DOWNSTREAM_MODE" not in env:
        assert reply_audio(reply) in heard, "the caller heard the whole answer"
    timing = call.turn_timings[-1]
    assert timing["turn_end_wait_ms"] == pytest.approx(500, abs=60)
    await caller.hangup()
    assert await caller.ended == "caller hung up"
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_calls_hear_only_their_own_answers(stacks: Any) -> None:
    stack = await stacks()
    callers = [stack.call(caller_number=f"+1555000{n:04d}") for n in range(20)]
    speech = [QUESTION[: 8000 * (2 + n % 10) // 5 * 2] for n in range(20)]  # 0.4 s .. 2.2 s: ten answers
    await gatherResults([Deferred.fromCoroutine(converse(caller, speech[n])) for n, caller in enumerate(callers)])
    calls = {call.caller_number: call for call in stack.engine.calls.values()}
    replies = {}
    for n, caller in enumerate(callers):
        call = calls[f"+1555000{n:04d}"]
        replies[n] = call.conversation[-1][1]
        assert reply_audio(replies[n]) in caller.heard(), f"caller {n} heard its answer"
    for n, caller in enumerate(callers):
        for m, reply in replies.items():
            if reply != replies[n]:
                assert reply_audio(reply) not in caller.heard(), f"caller {n} heard caller {m}'s answer"
    await gatherResults([caller.hangup() for caller in callers])
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_caller_hangs_up_mid_reply(stacks: Any) -> None:
    stack = await stacks()
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.3)  # mid-greeting
    await caller.hangup()
    await stack.all_released()


class BrokenProvider(EchoProvider):
    def end_of_turn(self) -> Deferred[None]:
        return fail(RuntimeError("the model crashed"))


class BrokenFactory(EchoFactory):
    name = "broken"

    def create(self) -> EchoProvider:
        return BrokenProvider(self._clock)


@pytest_twisted.ensureDeferred
async def test_provider_fails_mid_call(stacks: Any) -> None:
    stack = await stacks(FALLBACK_CONTEXT="operator", FALLBACK_EXTENSION="s")
    stack.engine.providers.factories["broken"] = BrokenFactory(reactor)
    caller = stack.call(variables={"AI_PROVIDER": "broken"})
    await converse(caller)
    assert await caller.ended == "continued in dialplan"
    assert caller.continued_to == ("operator", "s", 1)
    labels = [label for _, _, label in caller.heard_segments()]
    assert any(APOLOGY_NAME in label or "apology" in label for label in labels), labels
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_events_connection_dropped_mid_call_and_restored(stacks: Any) -> None:
    stack = await stacks()
    kept, lost = stack.call(), stack.call()
    await gatherResults([kept.answered, lost.answered])
    stack.sim.refuse_event_connections(True)
    await stack.sim.drop_event_connections()
    await until(lambda: not stack.engine_connected, what="the engine to notice")
    await lost.hangup()  # nobody hears this hang-up: its events are lost
    await sleep(0.3)
    stack.sim.refuse_event_connections(False)
    await until(lambda: stack.engine_connected, timeout=10, what="the engine to reconnect")
    await until(lambda: len(stack.engine.calls) == 1, what="the lost call to be cleaned up")
    assert stack.engine.counters["lost_during_outage"] == 1
    await converse(kept)  # the surviving call still works
    await kept.hangup()
    await stack.all_released()


@pytest.mark.parametrize("idle", ["silent", "silence_frames"])
@pytest_twisted.ensureDeferred
async def test_both_caller_idle_behaviours(stacks: Any, idle: str) -> None:
    stack = await stacks()
    caller = stack.call(idle=idle)
    await converse(caller)
    call = next(iter(stack.engine.calls.values()))
    assert len(call.provider.turns) == 1, "one question, one turn, whether silence is sent or not"
    await caller.hangup()
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_draining_sends_new_calls_back_to_the_dialplan(stacks: Any) -> None:
    stack = await stacks(FALLBACK_CONTEXT="queue")
    stack.engine.registry.drain(5)
    caller = stack.call()
    assert await caller.ended == "continued in dialplan"
    assert caller.continued_to is not None and caller.continued_to[0] == "queue"
    assert not caller.answered.called
