"""Whole calls that arrive while the local pipeline is still loading its models: the real engine
against the simulated Asterisk. The caller is answered, hears ringback until the models are loaded,
then the greeting; /metrics counts the held call. After every call the simulator has no live
channel or bridge and MEDIA_DIR holds no reply file.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from tests.calls.simstack import Stack, reply_audio, sleep, until
from tests.calls.test_held_calls import GREETING, LoadingVoice
from tests.calls.test_metrics_sim import samples, scrape
from tests.providers.local.test_pipeline import FakeLLM, FakeSTT
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.providers.local.pipeline import LocalFactory, LocalPipeline, LocalProvider


def loading_local_provider(stack: Stack) -> LoadingVoice:
    """The engine's "local" provider becomes the real pipeline, still loading its (fake) models.
    Calls choose it with AI_PROVIDER=local (the engine's default stays echo)."""
    voice = LoadingVoice()
    pipeline = LocalPipeline(reactor, stack.engine.config, FakeSTT(), FakeLLM([]), voice)
    stack.engine.providers.factories["local"] = LocalFactory(pipeline)
    pipeline.start()
    assert stack.engine.providers.starting("local")
    return voice


@pytest_twisted.ensureDeferred
async def test_a_call_while_the_models_load_hears_ringback_then_the_greeting(stacks: Any) -> None:
    stack = await stacks()
    voice = loading_local_provider(stack)
    caller = stack.call(variables={"AI_PROVIDER": "local"})
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the ringback")
    [call] = stack.engine.calls.values()
    assert call.state == "connecting" and call.provider is None, "held: the models are still loading"
    _, text = await scrape(stack)
    assert samples(text)[("ai_agent_held_for_ready_total", ())] == 1
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "ai_agent_held_for_ready"]
    assert "held (ringback)" in family.documentation and "# HELP ai_agent_held_for_ready_total" in text
    await sleep(1.0)  # the models take a while
    assert call.state == "connecting"

    voice.loaded()
    await until(lambda: call.conversation == [("agent", GREETING)], what="the greeting")
    assert isinstance(call.provider, LocalProvider)
    await until(lambda: call.state == "listening", what="the greeting to play out")
    heard = caller.heard()
    ringing = heard.find(ulaw_decode(ulaw_encode(stack.engine.ringback_pcm[:8000])))
    # from its second frame: the ringback's stop and the greeting's start may share the first one
    greeting = heard.find(reply_audio(GREETING)[320:])
    assert 0 <= ringing < greeting, "the caller heard ringback, then the whole greeting"
    await caller.hangup()
    assert await caller.ended == "caller hung up"
    await stack.all_released()
    assert stack.engine.outcomes["completed"] == 1


@pytest_twisted.ensureDeferred
async def test_a_caller_who_hangs_up_while_held_leaves_nothing_in_asterisk(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream")
    voice = loading_local_provider(stack)
    caller = stack.call(variables={"AI_PROVIDER": "local"})
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the ringback")
    await caller.hangup()
    await stack.all_released()
    voice.loaded()
    assert stack.engine.calls == {} and stack.engine.counters["held_for_ready"] == 1
