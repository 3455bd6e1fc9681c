"""Whole calls through the cloud providers against their fakes and the simulated Asterisk.

Deepgram Voice Agent and OpenAI Realtime each answer from a script (``fake.script``: one step per
caller turn): the greeting, a turn, a barge-in, tools that hang up and transfer through ARI, and a
connection dropped mid-call. In file and stream mode, over RTP and AudioSocket. After every call
the simulator has no live channel or bridge and MEDIA_DIR no reply file, and the fakes saw no
protocol violation.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.calls.simstack import QUESTION, Stack, sleep, until
from tests.calls.test_conversation_sim import with_local_provider
from twisted_agent.providers.deepgram import DeepgramProvider
from twisted_agent.providers.openai_realtime import RealtimeProvider
from twisted_agent.sim.deepgram import FakeDeepgram
from twisted_agent.sim.openai_realtime import FakeRealtime

PROVIDERS = ["deepgram", "openai_realtime"]
MODES = {"stream": {"DOWNSTREAM_MODE": "stream"}, "file": {}}
ANSWER = "We open at nine every morning."
#: 30 words of tone voice: about 5 s
LONG = ("Our bakery opens at nine every morning and closes at six in the evening on weekdays, "
        "on Saturdays we close at noon, and on Sundays the shop stays closed all day long for rest.")


class Clouds:
    def __init__(self) -> None:
        self.deepgram = FakeDeepgram(reactor)
        self.openai = FakeRealtime(reactor)

    def of(self, provider: str) -> Any:
        return self.deepgram if provider == "deepgram" else self.openai

    def env(self) -> dict[str, str]:
        return {"DEEPGRAM_API_KEY": "test-key", "DEEPGRAM_URL": self.deepgram.url,
                "OPENAI_API_KEY": "test-key", "OPENAI_REALTIME_URL": self.openai.url}


@pytest.fixture
def clouds() -> Any:
    fakes = Clouds()
    pytest_twisted.blockon(fakes.deepgram.start())
    pytest_twisted.blockon(fakes.openai.start())
    yield fakes
    pytest_twisted.blockon(fakes.deepgram.stop())
    pytest_twisted.blockon(fakes.openai.stop())


async def cloud_stack(stacks: Any, clouds: Clouds, provider: str, **env: str) -> Stack:
    return await stacks(AI_PROVIDER=provider, TRANSFER_CONTEXT="humans", FALLBACK_CONTEXT="ai-failed",
                        **clouds.env(), **env)


def heard_seconds(caller: Any) -> float:
    return sum(end - start for start, end, _ in caller.heard_segments())


async def greeted(caller: Any) -> None:
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, timeout=10, what="the greeting")
    await sleep(1.5)  # the greeting (6 words of tone voice) plays out


async def ask(caller: Any) -> int:
    """The caller asks a question; fires once a new stretch of the agent's voice is heard."""
    before = len(caller.heard_segments())
    await caller.say(QUESTION)
    await until(lambda: len(caller.heard_segments()) > before, timeout=10, what="the agent's answer")
    return before


def the_call(stack: Stack) -> Any:
    return next(iter(stack.engine.calls.values()))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_greeting_a_turn_and_a_hang_up_tool(stacks: Any, clouds: Clouds, provider: str, mode: str) -> None:
    fake = clouds.of(provider)
    fake.script = [{"say": ANSWER}, {"call": "hang_up", "arguments": {}}]
    stack = await cloud_stack(stacks, clouds, provider, **MODES[mode])
    caller = stack.call(caller_number="3001")
    await greeted(caller)
    call = the_call(stack)
    assert isinstance(call.provider, DeepgramProvider if provider == "deepgram" else RealtimeProvider)
    await ask(caller)
    await until(lambda: any(text == ANSWER for speaker, text in call.conversation if speaker == "agent"),
                what="the answer in the transcript")
    await sleep(1.5)
    await caller.say(QUESTION)  # the agent decides to hang up
    await caller.ended
    assert any(method == "DELETE" and path.endswith(f"/channels/{caller.channel.id}")
               for method, path, _ in stack.sim.requests), "the agent hung up through ARI"
    await stack.all_released()
    record = await stack.engine.store.get_call(caller.channel.id)
    assert record["outcome"] == "agent_hangup" and record["provider"] == provider
    speakers = [line["speaker"] for line in record["transcript"]]
    assert speakers[:3] == ["agent", "caller", "agent"], record["transcript"]
    assert fake.violations == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_over_audiosocket(stacks: Any, clouds: Clouds, provider: str) -> None:
    fake = clouds.of(provider)
    fake.script = [{"say": ANSWER}]
    stack = await cloud_stack(stacks, clouds, provider, AUDIO_TRANSPORT="audiosocket", DOWNSTREAM_MODE="stream")
    caller = stack.call()
    await greeted(caller)
    await ask(caller)
    call = the_call(stack)
    await until(lambda: any(text == ANSWER for _, text in call.conversation), what="the answer")
    await caller.hangup()
    await stack.all_released()
    assert fake.violations == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_a_transfer_tool_sends_the_caller_to_the_transfer_context(stacks: Any, clouds: Clouds,
                                                                         provider: str) -> None:
    fake = clouds.of(provider)
    fake.script = [{"call": "transfer", "arguments": {"reason": "the caller wants a person"}}]
    stack = await cloud_stack(stacks, clouds, provider, DOWNSTREAM_MODE="stream")
    caller = stack.call()
    await greeted(caller)
    await caller.say(QUESTION)
    await caller.ended
    assert caller.continued_to == ("humans", "s", 1)
    await stack.all_released()
    record = await stack.engine.store.get_call(caller.channel.id)
    assert record["outcome"] == "transferred"
    assert fake.violations == []


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_barge_in_stops_the_agent_and_truncates_what_was_not_heard(stacks: Any, clouds: Clouds,
                                                                         provider: str, mode: str) -> None:
    fake = clouds.of(provider)
    fake.script = [{"say": LONG}, {"say": ANSWER}]
    stack = await cloud_stack(stacks, clouds, provider, **MODES[mode])
    caller = stack.call()
    await greeted(caller)
    call = the_call(stack)
    before = await ask(caller)
    await sleep(1.0)  # a second of the long reply
    assert call.state == "speaking"
    await caller.say(QUESTION)  # over the reply
    await until(lambda: call.barge_ins, timeout=5, what="the barge-in")
    await until(lambda: any(text == ANSWER for _, text in call.conversation), timeout=10,
                what="the answer to the caller's new question")
    await sleep(2)
    long_reply = caller.heard_segments()[before:]
    reply_heard = sum(end - start for start, end, label in long_reply if ANSWER not in label)
    assert reply_heard < 4, f"the caller heard {reply_heard:.1f} s of a 5 s reply they talked over"
    assert stack.engine.counters["barge_ins"] >= 1
    if provider == "openai_realtime":
        truncated = [t for t in fake.truncations if t.get("ok", True)]
        assert truncated, "conversation.item.truncate was sent"
        assert 0 < truncated[0]["audio_end_ms"] < 5000, truncated[0]
    await caller.hangup()
    await stack.all_released()
    assert fake.violations == []


async def long_reply(stack: Stack, caller: Any) -> tuple[Any, int]:
    """Once the greeting is over, the caller asks (without QUESTION's pause, which a fast endpointer
    takes for a turn end); 1.5 s into the agent's long reply (5.4 s) nothing has interrupted it.
    The call, and the count of segments heard before the reply."""
    await caller.answered
    call = the_call(stack)
    await until(lambda: caller.first_heard_at() is not None and call.state == "listening", timeout=10,
                what="the greeting to play out")
    before = len(caller.heard_segments())
    await caller.say(QUESTION[48 * 320:])
    await until(lambda: call.state == "speaking", timeout=10, what="the agent's answer")
    await sleep(1.5)
    assert call.state == "speaking" and call.barge_ins == [], f"{call.state}, barge-ins {call.barge_ins}"
    return call, before


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_the_agents_echo_does_not_interrupt_it_and_the_caller_over_the_echo_does(
        stacks: Any, clouds: Clouds, provider: str) -> None:
    """The line sends the agent's voice back (40 ms, -10 dB): the cloud agent would take it for the
    caller and stop mid-sentence. It gets silence in its place; the caller talking over it still
    interrupts."""
    from twisted_agent.sim.line import LineEcho

    fake = clouds.of(provider)
    fake.script = [{"say": LONG}, {"say": ANSWER}]
    stack = await cloud_stack(stacks, clouds, provider, DOWNSTREAM_MODE="stream")
    caller = stack.call()
    caller.line(echo=LineEcho(delay_ms=40, gain_db=-10))
    call, before = await long_reply(stack, caller)
    assert call.barge_ins == [] and call.interruptions.cloud_suppressed > 50, \
        f"1.5 s of echo, none taken for the caller ({call.interruptions.cloud_suppressed} frames silenced)"
    began = reactor.seconds()
    await caller.say(QUESTION[48 * 320:])  # over the reply and its echo
    await until(lambda: call.barge_ins, timeout=5, what="the barge-in")
    await until(lambda: any(text == ANSWER for _, text in call.conversation), timeout=10, what="the answer")
    assert call.barge_ins[0] > began, "the caller, not the echo, interrupted"
    await caller.hangup()
    await stack.all_released()
    assert fake.violations == []


@pytest_twisted.ensureDeferred
async def test_the_ringbacks_echo_does_not_reach_a_cloud_agent_preparing_its_greeting(stacks: Any,
                                                                                      clouds: Clouds) -> None:
    """RINGBACK fills the second Deepgram takes to prepare the greeting; on an echoing line the
    ringback's echo (-26 dBFS) would reach it as the caller's voice and spoil the greeting."""
    from twisted_agent.sim.line import LineEcho

    clouds.deepgram.greeting_delay = 1.0
    stack = await cloud_stack(stacks, clouds, "deepgram", DOWNSTREAM_MODE="stream", RINGBACK="yes")
    caller = stack.call()
    caller.line(echo=LineEcho(delay_ms=40, gain_db=-10))
    await caller.answered
    call = the_call(stack)
    await until(lambda: call.state == "speaking", timeout=10, what="the greeting")
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    [session] = clouds.deepgram.sessions
    assert [m for m in session.sent if m["type"] == "UserStartedSpeaking"] == [], "nobody spoke"
    assert call.barge_ins == [] and call.interruptions.cloud_suppressed > 40, "the ringback's echo went as silence"
    assert call.conversation == [("agent", "Hello, how can I help you?")]
    await caller.hangup()
    await stack.all_released()
    assert clouds.deepgram.violations == []


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_with_barge_in_off_the_caller_cannot_interrupt_a_cloud_agent(stacks: Any, clouds: Clouds,
                                                                            provider: str, mode: str) -> None:
    """Stream mode: the cloud agent hears silence while the agent speaks; file mode: Asterisk keeps
    the caller off the media leg while a file plays, and no talk detection stops it."""
    fake = clouds.of(provider)
    fake.script = [{"say": LONG}, {"say": ANSWER}]
    stack = await cloud_stack(stacks, clouds, provider, BARGE_IN="off", **MODES[mode])
    caller = stack.call()
    call, before = await long_reply(stack, caller)
    await caller.say(QUESTION)  # over the reply: the cloud agent hears silence
    await until(lambda: call.state == "listening", timeout=10, what="the reply to play out")
    assert call.barge_ins == []
    reply = caller.heard_segments()[before:]
    assert reply[-1][1] - reply[0][0] > 5.2, f"the whole reply (5.4 s) was heard: {reply}"
    assert not any("TALK_DETECT" in str(values) for _, _, values in stack.sim.requests)
    await caller.hangup()
    await stack.all_released()
    assert fake.violations == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_apologises_and_returns_the_caller_to_the_dialplan(
        stacks: Any, clouds: Clouds, provider: str) -> None:
    fake = clouds.of(provider)
    fake.script = [{"drop": True}]
    stack = await cloud_stack(stacks, clouds, provider, DOWNSTREAM_MODE="stream")
    caller = stack.call(caller_number="3002")
    await greeted(caller)
    heard_before = heard_seconds(caller)
    await caller.say(QUESTION)
    await caller.ended
    assert heard_seconds(caller) > heard_before + 1, "the caller heard the apology"
    assert caller.continued_to == ("ai-failed", "s", 1)
    await stack.all_released()
    record = await stack.engine.store.get_call(caller.channel.id)
    assert record["outcome"] == "failed" and provider.split("_")[0] in record["end_reason"].lower()
    assert stack.engine.counters["provider_failures"] == 1
    assert fake.violations == []


@pytest_twisted.ensureDeferred
async def test_ai_provider_per_call_local_deepgram_and_openai_at_once(stacks: Any, clouds: Clouds) -> None:
    clouds.deepgram.script = [{"say": ANSWER}]
    clouds.openai.script = [{"say": ANSWER}]
    stack = await cloud_stack(stacks, clouds, "echo", DOWNSTREAM_MODE="stream")
    await with_local_provider(stack)
    callers = {name: stack.call(caller_number=f"40{i}", variables={"AI_PROVIDER": name})
               for i, name in enumerate(["local", "deepgram", "openai_realtime"])}
    for caller in callers.values():
        await greeted(caller)
    calls = {call.caller_number: call for call in stack.engine.calls.values()}
    assert {calls[f"40{i}"].provider_name for i in range(3)} == {"local", "deepgram", "openai_realtime"}
    for caller in callers.values():
        await ask(caller)
    await until(lambda: all(sum(1 for s, _ in call.conversation if s == "agent") >= 2 for call in calls.values()),
                timeout=10, what="every call's answer")
    assert len(clouds.deepgram.sessions) == 1 and len(clouds.openai.sessions) == 1
    for caller in callers.values():
        await caller.hangup()
    await stack.all_released()
    assert clouds.deepgram.violations == [] and clouds.openai.violations == []


@pytest_twisted.ensureDeferred
async def test_an_unreachable_cloud_agent_apologises_and_returns_the_caller(stacks: Any) -> None:
    from tests.helpers import free_port

    stack = await stacks(AI_PROVIDER="deepgram", DEEPGRAM_API_KEY="test-key", FALLBACK_CONTEXT="ai-failed",
                         DEEPGRAM_URL=f"ws://127.0.0.1:{free_port()}/v1/agent/converse", CLOUD_CONNECT_TIMEOUT="2",
                         DOWNSTREAM_MODE="stream")
    caller = stack.call()
    await caller.ended
    assert heard_seconds(caller) > 1, "the caller heard the apology"
    assert caller.continued_to == ("ai-failed", "s", 1)
    await stack.all_released()
    [record] = await stack.engine.store.history()
    assert record["outcome"] == "failed" and "cannot reach Deepgram" in record["end_reason"], record["end_reason"]
