"""Whole calls through a real Asterisk 22: what the caller heard, in what order, and what was left.

Each caller is a Local channel whose dialplan plays speech and records what it hears (see
harness.py). The echo provider answers with tone words (ToneVoice), so the recording says which
sentences the caller heard and how much of each; one call goes through the real local pipeline.
No test asserts a time: the figures are bench/asterisk_calls.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.asterisk import audio, harness
from tests.asterisk.harness import Engine, call, nothing_left, until
from tests.asterisk.instance import Asterisk
from tests.helpers import http_get, unavailable

GREETING = "Hello, how can I help you?"
#: 24 words, 3.8 s of ToneVoice: long enough to be talked over
LONG_GREETING = ("Thank you for calling the bakery on the corner of Main Street where the bread is fresh every "
                 "morning and the coffee is always hot today")
ANSWER = "You spoke for"  # the echo provider's answer: "You spoke for 2.9 seconds."
ASK = "wait:2,play:question,wait:3.5,hangup"
TRANSPORTS = [("externalmedia", "stream"), ("audiosocket", "stream"), ("externalmedia", "file"),
              ("audiosocket", "file")]

Engines = Callable[..., Engine]


def answer_covers(words: list[audio.Sound], seconds: float) -> list[float]:
    """The lengths from ``seconds`` to 1.5 s more (the turn's end: TURN_END_MS and the VAD's hangover)
    that the echo provider's answer ("You spoke for N seconds.") may have said: empty when its number
    is none of them, i.e. the agent did not hear all of the ``seconds`` the caller spoke."""
    at = audio.find_sentence(words, ANSWER)
    if not at or at[-1] + 3 >= len(words):
        return []
    hz = words[at[-1] + 3].hz
    near = [round(seconds - 0.2 + k / 10, 1) for k in range(18)]
    return [x for x in near if abs(audio.word_hz(f"{x:.1f}") - hz) <= 5]


def said(caller: harness.Caller) -> list[audio.Sound]:
    return audio.sounds(caller.said(), gap_ms=300)


def the_log_says(engine: Engine, *needles: str) -> None:
    """The engine logged each of ``needles``, in this order."""
    text = "\n".join(engine.messages())
    at = 0
    for i, needle in enumerate(needles):
        found = text.find(needle, at)
        assert found >= 0, f"the engine did not log {needle!r} (after {needles[:i]})\n--- engine log (end)\n" \
                           f"{engine.log_tail()}"
        at = found + len(needle)


@pytest.mark.parametrize(("transport", "mode"), TRANSPORTS, ids=[f"{t}-{m}" for t, m in TRANSPORTS])
def test_a_caller_hears_the_greeting_asks_and_hears_the_answer(asterisk: Asterisk, engines: Engines,
                                                                transport: str, mode: str) -> None:
    engine = engines(AUDIO_TRANSPORT=transport, DOWNSTREAM_MODE=mode)
    caller = call(asterisk, ASK)
    caller.wait_gone(engine=engine)
    words = audio.tone_words(caller.heard())
    question = said(caller)
    assert len(question) == 1, f"the caller said one thing: {question}"
    greeting = audio.find_sentence(words, GREETING)
    answer = audio.find_sentence(words, ANSWER)
    assert greeting == [0], f"the greeting, first: {words}"
    assert answer and words[answer[0]].start > question[0].end, "the answer, after the question"
    assert words[greeting[0] + 5].end < question[0].start, "the whole greeting, before the question"
    assert answer_covers(words, question[0].end - question[0].start), \
        "the answer says the agent heard the whole question"
    assert not audio.handed_back(caller.heard()), "the caller stayed with the agent"
    nothing_left(asterisk, engine)
    the_log_says(engine, f"call {caller.agent_channel_id} from", "up: provider echo", f"{transport}",
                 f"call {caller.agent_channel_id} ended: caller hung up")


@pytest.mark.parametrize("mode", ["stream", "file"])
def test_the_caller_talks_over_the_agent_which_stops_and_answers_the_interruption(
        asterisk: Asterisk, engines: Engines, mode: str) -> None:
    engine = engines(DOWNSTREAM_MODE=mode, CONTEXT_DEFAULT_GREETING=LONG_GREETING)
    caller = call(asterisk, "wait:1.2,play:question,wait:3,hangup")
    caller.wait_gone(engine=engine)
    words = audio.tone_words(caller.heard())
    interruption = said(caller)
    heard_of_greeting = audio.prefix_heard(words, LONG_GREETING)
    assert 0 < heard_of_greeting < len(LONG_GREETING.split()), f"the greeting was cut: {heard_of_greeting} words"
    answer = audio.find_sentence(words, ANSWER)
    assert answer and words[answer[0]].start > interruption[-1].end, "then answered, after the caller"
    length = interruption[-1].end - interruption[0].start
    assert answer_covers(words, length), f"the answer covers the whole interruption, from its first syllable " \
                                         f"({length:.1f} s)"
    the_log_says(engine, "barge-in", f"call {caller.agent_channel_id} ended")
    nothing_left(asterisk, engine)


# A 400 ms "Hello?" where 600 ms are needed. (The simulator's other backchannel, a 100 ms "mm" under
# the default 120 ms, interrupts on a real line: Asterisk's frames do not start where the sound does,
# so its 100 ms straddle six 20 ms frames, which is 120 ms to the detector.)
@pytest.mark.parametrize("mode", ["stream", "file"])
def test_a_backchannel_does_not_interrupt_the_agent(asterisk: Asterisk, engines: Engines, mode: str) -> None:
    engine = engines(DOWNSTREAM_MODE=mode, CONTEXT_DEFAULT_GREETING=LONG_GREETING, BARGE_IN_MIN_MS=600)
    caller = call(asterisk, "wait:1.5,play:hello,wait:4,hangup")
    caller.wait_gone(engine=engine)
    words = audio.tone_words(caller.heard())
    assert audio.prefix_heard(words, LONG_GREETING) == len(LONG_GREETING.split()), \
        f"the whole greeting was heard: {words}"
    assert "barge-in" not in " ".join(engine.messages())
    assert not audio.find_sentence(words, ANSWER), "the sound was not taken for a question"
    nothing_left(asterisk, engine)


def test_the_caller_hangs_up_in_the_middle_of_a_reply(asterisk: Asterisk, engines: Engines) -> None:
    engine = engines(CONTEXT_DEFAULT_GREETING=LONG_GREETING, DOWNSTREAM_MODE="file")
    caller = call(asterisk, "wait:1.0,hangup")
    caller.wait_gone(engine=engine)
    assert 0 < audio.prefix_heard(audio.tone_words(caller.heard()), LONG_GREETING) < len(LONG_GREETING.split())
    nothing_left(asterisk, engine)
    the_log_says(engine, f"call {caller.agent_channel_id} ended: caller hung up")
    until(lambda: http_get(engine.health_url + "/health")[1]["components"]["calls"]["detail"].startswith("0 "), 5,
          "no call left in the engine", engine)


def test_a_silent_caller_is_asked_then_told_goodbye_and_hung_up_on(asterisk: Asterisk, engines: Engines) -> None:
    engine = engines(INACTIVITY_PROMPT_SECONDS=2, INACTIVITY_HANGUP_SECONDS=2,
                     CONTEXT_DEFAULT_STILL_THERE="Are you still there?", CONTEXT_DEFAULT_GOODBYE="Goodbye for now.")
    caller = call(asterisk, "wait:30,hangup")
    caller.wait_gone(timeout=25, engine=engine)  # the agent hangs up long before the caller would
    words = audio.tone_words(caller.heard())
    spoken = [audio.find_sentence(words, text) for text in (GREETING, "Are you still there?", "Goodbye for now.")]
    assert all(spoken) and spoken[0][0] < spoken[1][0] < spoken[2][0], f"in this order: {spoken}"
    the_log_says(engine, f"call {caller.agent_channel_id} ended: caller inactive")
    nothing_left(asterisk, engine)


def test_five_callers_at_once_each_hear_their_own_answer(asterisk: Asterisk, engines: Engines) -> None:
    engine = engines()
    callers = [call(asterisk, f"wait:{1.5 + 0.3 * i},play:question,wait:3.5,hangup") for i in range(5)]
    for caller in callers:
        caller.wait_gone(engine=engine)
    for caller in callers:
        words = audio.tone_words(caller.heard())
        question = said(caller)
        answer = audio.find_sentence(words, ANSWER)
        assert audio.find_sentence(words, GREETING) == [0], caller.rec
        assert len(answer) == 1 and words[answer[0]].start > question[-1].end, caller.rec
    nothing_left(asterisk, engine)


def test_the_events_socket_drops_while_asterisk_stays_up_and_the_call_goes_on(
        asterisk: Asterisk, engines: Engines) -> None:
    proxy = harness.Proxy(("127.0.0.1", int(asterisk.ari_url.split(":")[2].split("/")[0])))
    try:
        engine = engines(ari_url=f"http://127.0.0.1:{proxy.port}/ari", ARI_RECONNECT_MAX_DELAY=1)
        caller = call(asterisk, "wait:3,play:question,wait:3.5,hangup")
        until(lambda: any("up: provider" in m for m in engine.messages()), 10, "the call up", engine)
        assert proxy.drop_websockets() == 1
        until(lambda: proxy.websockets() == 1 and engine.registered(), 15, "the engine back on the events socket",
              engine)
        caller.wait_gone(engine=engine)
        words = audio.tone_words(caller.heard())
        answer = audio.find_sentence(words, ANSWER)
        assert audio.find_sentence(words, GREETING) == [0] and answer, f"greeting and answer: {words}"
        assert words[answer[0]].start > said(caller)[-1].end
        the_log_says(engine, "ARI events connected", "ARI events connection", "lost", "ARI events connected",
                     f"call {caller.agent_channel_id} ended: caller hung up")
        nothing_left(asterisk, engine)
    finally:
        proxy.close()


def test_asterisk_restarts_the_engine_cleans_up_and_takes_the_next_call(asterisk: Asterisk,
                                                                        engines: Engines) -> None:
    engine = engines(DOWNSTREAM_MODE="file", ARI_RECONNECT_MAX_DELAY=1, CONTEXT_DEFAULT_GREETING=LONG_GREETING)
    first = call(asterisk, "wait:30,hangup")
    until(lambda: engine.reply_files(), 10, "the greeting's reply file", engine)
    asterisk.crash()
    until(lambda: any("ARI events connection" in m and "lost" in m for m in engine.messages()), 10,
          "the engine saw Asterisk go", engine)
    asterisk.start()
    engine.wait_registered()
    until(lambda: not engine.reply_files(), 10, "the old call's reply file removed", engine)
    until(lambda: any(f"call {first.agent_channel_id} ended" in m for m in engine.messages()), 10,
          "the old call ended in the engine", engine)
    caller = call(asterisk, ASK)
    caller.wait_gone(engine=engine)
    words = audio.tone_words(caller.heard())
    # (the question comes 2 s in: it interrupts the long greeting)
    assert audio.prefix_heard(words, LONG_GREETING) >= 5 and audio.find_sentence(words, ANSWER), words
    nothing_left(asterisk, engine)


def test_a_call_placed_the_moment_the_engine_starts_is_held_then_answered_by_the_local_pipeline(
        asterisk: Asterisk, engines: Engines) -> None:
    models = os.environ.get("AI_AGENT_TEST_MODELS") or str(Path(__file__).resolve().parents[2] / ".models")
    if not (Path(models) / "piper").is_dir():
        unavailable(f"the local pipeline's models are not installed in {models}: `make test` installs them")
    engine = engines(registered=False, AI_PROVIDER="local", MODELS_DIR=models, STT_BACKEND="openai-whisper",
                     DOWNSTREAM_MODE="stream")
    until(engine.registered, 60, "the engine's Stasis app registered", engine)
    caller = call(asterisk, "wait:9,play:question,wait:9,hangup")  # placed before the models are loaded
    caller.wait_gone(timeout=60, engine=engine)
    assert not audio.handed_back(caller.heard()), "the call was not refused"
    question = said(caller)
    heard = audio.sounds(caller.heard(), gap_ms=300)
    assert any(s.end < question[0].start for s in heard), "something (ringback, then the greeting) before the question"
    after = [s for s in heard if s.start > question[-1].end]
    assert after, "an answer after the question"
    reply = caller.heard()[int(after[0].start * audio.RATE):int((after[-1].end + 0.3) * audio.RATE)]
    text = transcribe(reply.tobytes(), models)
    assert len(text.split()) >= 3, f"the answer is speech: {text!r}"
    the_log_says(engine, f"call {caller.agent_channel_id}", "local pipeline ready",
                 f"call {caller.agent_channel_id} from", "up: provider local")
    nothing_left(asterisk, engine)


def transcribe(pcm: bytes, models: str) -> str:
    """Whisper tiny.en, in this process, on what the caller heard."""
    from twisted_agent.config import load_config
    from twisted_agent.providers.local import stt

    config = load_config(None, {"MODELS_DIR": models, "STT_BACKEND": "openai-whisper"})
    path = stt.WhisperSTT(None, config).model_path()
    stt.load_whisper(stt.OPENAI_WHISPER, path, 1)
    recognition = stt.recognise(pcm, audio.RATE, "en", 0)
    return " ".join(segment.text for segment in recognition.segments)

