"""Barge-in on whole calls: the real engine against the simulated Asterisk, on loopback sockets.

The caller talks over the agent (it stops, and answers the new question), says "mm-hm" (it goes on),
its own echo and line noise come back (it goes on), pauses mid-sentence (one answer to the whole
sentence); in stream mode and in file mode, where Asterisk suspends the caller from the bridge
while a file plays and the engine hears them through TALK_DETECT.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.calls.simstack import QUESTION, altered_frames, reply_audio, sleep, until
from twisted_agent.providers.echo import EchoProvider
from twisted_agent.sim.line import LineEcho, LineNoise
from twisted_agent.sim.talkdetect import frame_energy

LONG_GREETING = "Hello and welcome to the bakery, we are glad you called, how can we help you today?"
FRAME = 320  # bytes of a 20 ms frame of the clips (8 kHz s16le)
#: the clip says "Hello" in frames 12-30, pauses, then "what are your opening hours ..." from frame 49
HELLO, REST = QUESTION[: 32 * FRAME], QUESTION[48 * FRAME:]
LEAD_S = 0.24  # the clip's leading silence: its voice reaches the line this long after say()


def the_call(stack: Any) -> Any:
    return next(iter(stack.engine.calls.values()))


@pytest_twisted.ensureDeferred
async def test_caller_talks_over_the_agent_the_agent_stops_and_answers_the_new_question(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream", CONTEXT_DEFAULT_GREETING=LONG_GREETING)
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.5)  # mid-greeting (the tone voice takes ~3 s for it)
    call = the_call(stack)
    provider: EchoProvider = call.provider
    assert call.state == "speaking"
    speech_started = reactor.seconds() + LEAD_S
    await caller.say(QUESTION)
    assert len(call.barge_ins) == 1, "one interruption"
    stopped_after = call.barge_ins[0] - speech_started
    assert 0.1 < stopped_after < 0.2, f"the agent stopped {stopped_after * 1000:.0f} ms after the caller began"
    greeting_heard = caller.heard_segments()[0]
    origin = caller.answered_at
    assert origin is not None
    assert origin + greeting_heard[1] < call.barge_ins[0] + 0.1, "no agent audio on the wire after the barge-in"
    assert provider.interruptions and 0 < next(iter(provider.interruptions[0].values())) < 3000, \
        "the provider was told how much of the greeting was heard"
    heard_before = len(caller.heard_segments())
    await until(lambda: len(caller.heard_segments()) > heard_before, timeout=5, what="the answer")
    assert len(provider.turns) == 1 and provider.turns[0] >= 2500, "the whole question, from its first syllable"
    assert call.conversation[-1][1].startswith("You spoke for")
    await caller.hangup()
    await stack.all_released()


@pytest.mark.parametrize("idle", ["silent", "silence_frames"])
@pytest.mark.parametrize(("sound", "env"), [
    (QUESTION[13 * FRAME: 18 * FRAME], {}),  # a 100 ms "mm", under the default BARGE_IN_MIN_MS of 120
    (HELLO[12 * FRAME:], {"BARGE_IN_MIN_MS": "600"}),  # a 400 ms "hello?" where the minimum is 600 ms
], ids=["mm-120", "hello-600"])
@pytest_twisted.ensureDeferred
async def test_a_backchannel_does_not_interrupt(stacks: Any, sound: bytes, env: dict[str, str], idle: str) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream", CONTEXT_DEFAULT_GREETING=LONG_GREETING, **env)
    caller = stack.call(idle=idle)
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.6)
    call = the_call(stack)
    await caller.say(sound)
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    assert call.barge_ins == [] and stack.engine.counters["backchannels"] >= 1, \
        f"heard, counted, not an interruption: {dict(stack.engine.counters)}, barge-ins {call.barge_ins}"
    differ = altered_frames(caller.heard(), reply_audio(LONG_GREETING))
    assert stack.engine.counters["ducks"] >= 1 and differ, f"ducked while the caller made the sound: {differ}"
    assert differ[-1] - differ[0] < len(sound) // FRAME + 25, \
        f"while the sound lasted: all else was heard intact (frames that differ: {differ})"
    await caller.hangup()
    await stack.all_released()


@pytest.mark.parametrize("line", ["echo", "noise", "echo+noise", "file+echo"])
@pytest_twisted.ensureDeferred
async def test_the_agents_own_echo_and_line_noise_do_not_interrupt_it(stacks: Any, line: str) -> None:
    mode = "file" if line.startswith("file") else "stream"
    stack = await stacks(DOWNSTREAM_MODE=mode, CONTEXT_DEFAULT_GREETING=LONG_GREETING)
    caller = stack.call()
    caller.line(echo=LineEcho(delay_ms=40, gain_db=-10) if "echo" in line else None,
                noise=LineNoise(dbfs=-40) if "noise" in line else None)
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    call = the_call(stack)
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    assert call.barge_ins == [], "the agent interrupted itself"
    expected_ms = call.provider.voice.duration_ms(LONG_GREETING)
    segments = caller.heard_segments()  # the tone voice leaves gaps between words
    assert (segments[-1][1] - segments[0][0]) * 1000 >= expected_ms - 60, "the whole greeting was heard"
    if mode == "stream" and "echo" in line:
        assert call.session.echo.echoes > 0 and call.session.echo.delay is not None, "echo was seen and judged"
    if mode == "file":
        talks = [e for e in stack.sim.events_sent() if e["type"] == "ChannelTalkingStarted"]
        assert talks == [], "the echo of the file never reached the talk detection threshold"
    await caller.hangup()
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_barge_in_still_works_over_the_echo(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream", CONTEXT_DEFAULT_GREETING=LONG_GREETING)
    caller = stack.call()
    caller.line(echo=LineEcho(delay_ms=40, gain_db=-10))
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.8)
    call = the_call(stack)
    speech_started = reactor.seconds() + LEAD_S
    await caller.say(QUESTION)
    assert len(call.barge_ins) == 1
    assert call.barge_ins[0] - speech_started < 0.25
    await caller.hangup()
    await stack.all_released()


@pytest.mark.parametrize("echo", [False, True], ids=["clean", "echo"])
@pytest_twisted.ensureDeferred
async def test_file_mode_barge_in_stops_the_playback_deletes_its_file_and_answers(stacks: Any, echo: bool) -> None:
    stack = await stacks(CONTEXT_DEFAULT_GREETING=LONG_GREETING)  # DOWNSTREAM_MODE=file, the default
    caller = stack.call()
    if echo:
        caller.line(echo=LineEcho(delay_ms=40, gain_db=-10))
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    greeting_files = stack.reply_files()
    assert len(greeting_files) == 1, "the greeting plays from a file"
    await sleep(0.8)
    call = the_call(stack)
    provider: EchoProvider = call.provider
    speech_started = reactor.seconds() + LEAD_S
    await caller.say(QUESTION)
    assert len(call.barge_ins) == 1, "Asterisk's talk detection heard the caller over the file"
    stops = [r for r in stack.sim.requests if r[0] == "DELETE" and r[1].startswith("/ari/playbacks/")]
    assert len(stops) == 1, "the ARI playback was stopped"
    finished = [e for e in stack.sim.events_sent() if e["type"] == "PlaybackFinished"]
    assert finished and stops[0][1].endswith(finished[0]["playback"]["id"])
    assert greeting_files[0] not in stack.reply_files(), "and its file deleted"
    greeting = next(segment for segment in caller.heard_segments() if segment[2].startswith("playback:"))
    origin = caller.answered_at
    assert origin is not None
    silent_after = origin + greeting[1] - speech_started
    confirmed_after = call.barge_ins[0] - speech_started
    # at the caller's first syllable (talk detection), not once the barge-in is confirmed ~120 ms on;
    # how fast exactly is bench/barge_in.py's business (p95 23 ms), this must hold on a busy machine too
    assert silent_after < 0.2 and silent_after < confirmed_after - 0.05, \
        f"the file stopped {silent_after * 1000:.0f} ms after the caller began, the barge-in was confirmed " \
        f"at {confirmed_after * 1000:.0f} ms"
    assert 0.1 < confirmed_after < 0.25, f"confirmed {confirmed_after * 1000:.0f} ms after the caller began"
    heard = len(caller.heard_segments())
    await until(lambda: len(caller.heard_segments()) > heard, timeout=5, what="the answer")
    assert provider.interruptions and list(provider.interruptions[0]) == [f"{call.call_id}-1"]
    assert len(provider.turns) == 1 and provider.turns[0] >= 2500, "the question from its first syllable"
    await caller.hangup()
    await stack.all_released()


def frame_means(pcm: bytes) -> list[int]:
    """TALK_DETECT's measure of each 20 ms frame (sim/talkdetect.py)."""
    return [frame_energy(pcm[n:n + FRAME], "ulaw") for n in range(0, len(pcm) - FRAME + 1, FRAME)]


def scaled(pcm: bytes, gain: float) -> bytes:
    return (np.frombuffer(pcm, dtype="<i2") * gain).astype("<i2").tobytes()


def recorded(order: list[str], owner: Any, name: str, label: str) -> None:
    """Note ``label`` in ``order`` each time ``owner.name`` is called, then call it."""
    original = getattr(owner, name)

    def note(*args: Any, **kw: Any) -> Any:
        order.append(label)
        return original(*args, **kw)

    setattr(owner, name, note)


@pytest_twisted.ensureDeferred
async def test_file_mode_a_loud_first_syllable_then_quieter_speech_stops_the_reply(stacks: Any) -> None:
    """Issue 15. Talk detection's threshold sits just under the agent's loudest audio: the caller's
    loud first syllable crosses it (the reply pauses), their quieter speech does not, and Asterisk
    says the talk finished 100 ms after the syllable while the media leg hears them go on. The
    reply must stay paused until the barge-in detector has heard BARGE_IN_MIN_MS of their voice."""
    stack = await stacks(CONTEXT_DEFAULT_GREETING=LONG_GREETING)  # file mode
    caller = stack.call()
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.8)
    call = the_call(stack)
    provider: EchoProvider = call.provider
    threshold = call.voice.talk.threshold.value
    syllable = QUESTION[14 * FRAME: 18 * FRAME]  # 80 ms of the loud "He-" of "Hello"
    quiet = REST[3 * FRAME:]  # "what are your opening hours ..." from a voiced frame, at 60 % of the threshold
    quiet = scaled(quiet, 0.6 * threshold / max(frame_means(quiet)))
    assert min(frame_means(syllable)) >= 2 * threshold and max(frame_means(quiet)) < threshold
    order: list[str] = []
    recorded(order, call.player, "pause", "pause")
    recorded(order, call.player, "resume", "resume")
    recorded(order, call, "talking_started", "talk started")
    recorded(order, call, "talking_finished", "talk finished")
    recorded(order, call.voice, "stop", "stop")
    await caller.say(syllable + bytes(3 * FRAME) + quiet)  # "He- [60 ms] -llo, what are your opening hours?"
    assert len(call.barge_ins) == 1, "the caller's quieter speech interrupted the reply"
    assert order[:4] == ["talk started", "pause", "talk finished", "stop"], \
        f"paused at the syllable, not resumed at Asterisk's end of talk, stopped by the barge-in: {order}"
    assert "resume" not in order and stack.engine.counters["backchannels"] == 0
    plays = [r[2] for r in stack.sim.requests if r[0] == "POST" and "/play" in r[1]]
    assert [p for p in plays if p["media"] == plays[0]["media"]] == plays[:1] and \
        not any("offsetms" in p for p in plays), "the greeting never played again"
    heard = len(caller.heard_segments())
    await until(lambda: len(caller.heard_segments()) > heard, timeout=5, what="the answer")
    assert provider.interruptions and list(provider.interruptions[0]) == [f"{call.call_id}-1"]
    assert len(provider.turns) == 1 and provider.turns[0] >= len(quiet) // 16, \
        f"the caller's turn, transcribed from the pause on: {provider.turns}"
    await caller.hangup()
    await stack.all_released()


@pytest.mark.parametrize("mode", ["stream", "file"])
@pytest_twisted.ensureDeferred
async def test_a_mid_sentence_pause_gets_one_answer_to_the_whole_sentence(stacks: Any, mode: str) -> None:
    stack = await stacks(DOWNSTREAM_MODE=mode)
    stack.engine.providers.factories["echo"].think_ms = 300  # an answer takes a moment, as a real one does
    caller = stack.call()
    await caller.answered
    call = the_call(stack)
    await until(lambda: call.state == "listening" and call.conversation, timeout=10, what="the greeting")
    await sleep(0.2)
    heard = len(caller.heard_segments())
    await caller.say(HELLO + bytes(30 * FRAME) + REST)  # "Hello ... <600 ms> ... what are your opening hours?"
    assert stack.engine.counters["turns_resumed"] == 1, "the turn had ended on the pause, then went on"
    assert len(caller.heard_segments()) == heard, "no answer to the first half"
    await until(lambda: len(caller.heard_segments()) > heard, timeout=5, what="the answer")
    provider: EchoProvider = call.provider
    assert len(provider.turns) == 1 and provider.turns[0] >= 2600, "one turn: the whole sentence"
    answers = [text for speaker, text in call.conversation if speaker == "agent"][1:]
    assert len(answers) == 1 and answers[0] == f"You spoke for {provider.turns[0] / 1000:.1f} seconds."
    await caller.hangup()
    await stack.all_released()


@pytest_twisted.ensureDeferred
async def test_file_mode_a_backchannel_pauses_the_reply_which_goes_on_from_where_it_stopped(stacks: Any) -> None:
    stack = await stacks(CONTEXT_DEFAULT_GREETING=LONG_GREETING)  # file mode
    caller = stack.call(idle="silence_frames")
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(0.8)
    call = the_call(stack)
    await caller.say(QUESTION[13 * FRAME: 18 * FRAME])  # "mm"
    await until(lambda: call.state == "listening", timeout=10, what="the greeting to play out")
    assert call.barge_ins == [] and call.player.pauses == 1 and stack.engine.counters["backchannels"] == 1
    files = [segment for segment in caller.heard_segments() if segment[2].startswith("playback:")]
    assert len({source for _, _, source in files}) == 2, "the greeting's file, then the same file from the pause"
    spans: dict[str, tuple[float, float]] = {}
    for start, end, source in files:  # the tone voice is heard as one segment a word
        first, last = spans.get(source, (start, end))
        spans[source] = (min(first, start), max(last, end))
    heard = caller.heard()
    pieces = [heard[round(start * 8000) * 2: round(end * 8000) * 2] for start, end in spans.values()]
    expected = reply_audio(LONG_GREETING).rstrip(b"\x00")
    assert expected.startswith(pieces[0]), "the first part from the start"
    assert expected.endswith(pieces[1].rstrip(b"\x00")), "the rest to the end"
    overlap = len(pieces[0]) + len(pieces[1].rstrip(b"\x00")) - len(expected)
    assert -640 <= overlap <= 640, f"none of it lost, none twice ({overlap / 16:.0f} ms)"
    await caller.hangup()
    await stack.all_released()
