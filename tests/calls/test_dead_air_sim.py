"""No dead air, on whole calls against the simulated Asterisk: the filler while a slow answer is
prepared, the inactivity watchdog, and streaming that fails mid-call going on with file playback."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest
import pytest_twisted

from tests.calls.simstack import QUESTION, reply_audio, sleep, until
from twisted_agent.calls.comfort import filler_phrase
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode


def the_call(stack: Any) -> Any:
    return next(iter(stack.engine.calls.values()))


def find(needle: bytes, haystack: bytes) -> int:
    """Where ``needle`` starts in ``haystack`` (both 16-bit PCM), or -1."""
    at = haystack.find(needle)
    while at >= 0 and at % 2:
        at = haystack.find(needle, at + 1)
    return at


async def asked(stack: Any, caller: Any) -> Any:
    await caller.answered
    call = the_call(stack)
    await until(lambda: call.state == "listening" and call.conversation, timeout=10, what="the greeting")
    await sleep(0.2)
    await caller.say(QUESTION)
    return call


@pytest.mark.parametrize("mode", ["stream", "file"])
@pytest_twisted.ensureDeferred
async def test_a_slow_answer_gets_the_filler_which_stops_when_the_answer_is_ready(stacks: Any, mode: str) -> None:
    stack = await stacks(DOWNSTREAM_MODE=mode)
    stack.engine.providers.factories["echo"].think_ms = 1500  # ready 2 s after the caller's last word
    caller = stack.call()
    call = await asked(stack, caller)
    await until(lambda: call.fillers, timeout=5, what="the filler")
    await until(lambda: call.state == "speaking", timeout=5, what="the answer")
    await until(lambda: call.state == "listening", timeout=10, what="the answer to play out")
    heard = caller.heard()
    filler = ulaw_decode(ulaw_encode(filler_phrase()))
    start = find(filler[:4000], heard)
    assert start >= 0, "the caller heard the filler, from its start"
    # (found by a stretch after its first frame: where the filler stops and the answer starts in the same
    # 20 ms, the first frame the caller hears may hold the end of one and the start of the other)
    answer = find(reply_audio(call.conversation[-1][1])[640:4640], heard) - 640
    assert answer > start, f"then the answer: {caller.heard_segments()}"
    filler_ms = (answer - start) / 16
    assert filler_ms < len(filler) / 16 - 200, "the filler was cut off when the answer was ready"
    played = np.frombuffer(heard[start:answer], dtype="<i2")
    assert np.array_equal(played[: len(played) - 320], np.frombuffer(filler, dtype="<i2")[: len(played) - 320]), \
        "nothing but the filler until the answer"
    timing = call.turn_timings[-1]
    assert timing["filler_ms"] == pytest.approx(1200, abs=60), "FILLER_MS after the caller's last word"
    assert timing["voice_to_voice_ms"] == pytest.approx(2000, abs=150)
    if mode == "file":
        stops = [r for r in stack.sim.requests if r[0] == "DELETE" and r[1].startswith("/ari/playbacks/")]
        assert len(stops) == 1, "the filler's playback was stopped for the answer"
    await caller.hangup()
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_the_inactivity_watchdog_asks_then_says_goodbye_and_hangs_up(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream", INACTIVITY_PROMPT_SECONDS="1.5", INACTIVITY_HANGUP_SECONDS="1")
    caller = stack.call()
    await caller.answered
    call = the_call(stack)
    assert await caller.ended == "agent hung up"
    agent = [text for speaker, text in call.conversation if speaker == "agent"]
    assert agent == [call.context.greeting, call.context.still_there, call.context.goodbye]
    heard = caller.heard()
    for text in agent:
        assert find(reply_audio(text)[:3200], heard) >= 0, f"the caller heard {text!r}"
    assert call.end_reason == "caller inactive"
    assert stack.engine.counters["inactivity_prompts"] == 1 and stack.engine.counters["inactivity_hangups"] == 1
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_a_caller_who_answers_the_watchdog_keeps_the_call(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream", INACTIVITY_PROMPT_SECONDS="1.5", INACTIVITY_HANGUP_SECONDS="1")
    caller = stack.call()
    await caller.answered
    call = the_call(stack)
    await until(lambda: (call.conversation or [("", "")])[-1][1] == call.context.still_there, timeout=10,
                what="the question")
    await until(lambda: call.state == "listening", timeout=10, what="the question to be heard")
    await caller.say(QUESTION[: 16000])  # "Hello? Yes, I am here"
    await until(lambda: call.conversation[-1][1].startswith("You spoke for"), timeout=5, what="the answer")
    await sleep(1.5)
    assert call.end_reason == "" and caller.end_reason is None, "the call goes on"
    await caller.hangup()
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_streaming_that_fails_mid_call_goes_on_with_file_playback(stacks: Any) -> None:
    greeting = "Hello and welcome to the bakery, we are glad you called, how can we help you today?"
    stack = await stacks(DOWNSTREAM_MODE="stream", STREAM_STALL_MS="300", CONTEXT_DEFAULT_GREETING=greeting)
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.8)
    port = stack.service.media.rtp.transport

    def refused(data: bytes, addr: Any) -> None:  # as an nftables "reject" rule would answer
        raise OSError(errno.EPERM, "Operation not permitted")

    port.write = refused
    call = the_call(stack)
    await until(lambda: call.stream_fallback, timeout=3, what="the fall back to files")
    assert stack.engine.counters["playback_fallbacks"] == 1 and "no frame could be sent" in call.stream_fallback
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    segments = caller.heard_segments()
    assert segments[0][2] == "rtp" and segments[-1][2].startswith("playback:"), "streamed, then from a file"
    assert find(reply_audio(greeting)[-8000:], caller.heard()) >= 0, "the caller heard the end of the greeting"
    first_file = min(start for start, end, source in segments if source.startswith("playback:"))
    gap = first_file - max(end for start, end, source in segments if source == "rtp")
    assert gap < 0.45, f"{gap:.2f}s of silence while it switched (STREAM_STALL_MS=300)"
    heard = len(caller.heard_segments())
    await caller.say(QUESTION)
    await until(lambda: len(caller.heard_segments()) > heard, timeout=5, what="the answer")
    assert caller.heard_segments()[-1][2].startswith("playback:"), "the answer is a file too"
    await until(lambda: call.state == "listening", timeout=10, what="the answer to play out")
    assert reply_audio(call.conversation[-1][1]) in caller.heard()
    del port.write
    await caller.hangup()
    await stack.all_released()
