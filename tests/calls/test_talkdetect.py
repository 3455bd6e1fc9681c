"""The TALK_DETECT threshold of file-mode barge-in: above the agent's echo, below the caller's voice."""

from __future__ import annotations

import numpy as np

from tests.calls.simstack import QUESTION
from twisted_agent.calls.talkdetect import CEILING, FLOOR, TalkThreshold, loudest_frame
from twisted_agent.sim.line import LineEcho


def frame_magnitudes(pcm: bytes) -> np.ndarray:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    whole = len(samples) // 160 * 160
    return np.abs(samples[:whole]).reshape(-1, 160).mean(axis=1)


def test_loudest_frame_is_func_talkdetects_measure():
    quiet, loud = np.full(160, 100, dtype="<i2"), np.full(160, -3000, dtype="<i2")
    pcm = (quiet.tobytes() * 3) + loud.tobytes() + quiet.tobytes()
    assert loudest_frame(pcm, 8000) == 3000.0
    assert loudest_frame(np.full(320, 500, dtype="<i2").tobytes(), 16000) == 500.0, "20 ms frames at any rate"
    assert loudest_frame(b"", 8000) == 0.0 and loudest_frame(b"\x10\x00", 8000) == 16.0


def test_the_threshold_only_rises_and_stays_between_floor_and_ceiling():
    threshold = TalkThreshold()
    assert threshold.setting() == f"100,{FLOOR}"
    assert not threshold.played(np.full(160, 300, dtype="<i2").tobytes(), 8000), "quiet audio: the floor stays"
    softer = (np.frombuffer(QUESTION, dtype="<i2") // 3).astype("<i2").tobytes()
    assert threshold.played(softer, 8000) and FLOOR < threshold.value < CEILING
    value = threshold.value
    assert not threshold.played(bytes(3200), 8000) and threshold.value == value, "never lowered"
    assert threshold.played(np.full(160, 30000, dtype="<i2").tobytes(), 8000) and threshold.value == CEILING


def test_the_agents_echo_stays_under_it_and_a_caller_as_loud_as_the_agent_clears_it():
    agent = QUESTION  # the agent's voice: speech at a normal level
    threshold = TalkThreshold()
    threshold.played(agent, 8000)
    echo = LineEcho(delay_ms=40, gain_db=-10)  # what the line sends back: 40 ms late, band-limited, 10 dB down
    echo.heard(agent, 0.0)
    returned = np.clip(echo.take(0.0, len(agent) // 2 + 400), -32768, 32767).astype("<i2").tobytes()
    assert frame_magnitudes(returned).max() < threshold.value, "the echo never starts a talk"
    caller = frame_magnitudes(QUESTION)
    loud = caller >= threshold.value
    assert loud.sum() >= 20, "the caller's stressed syllables do"
    # the longest run of frames over it, with dips under SILENCE_MS (5 frames) bridged: a whole word
    runs, run, gap = [], 0, 0
    for over in loud:
        if over:
            run, gap = run + 1 + gap, 0
        elif run:
            gap += 1
            if gap >= 5:
                runs.append(run)
                run, gap = 0, 0
    runs.append(run)
    assert max(runs) * 20 >= 120, "long enough to be confirmed at BARGE_IN_MIN_MS"


def test_the_lines_noise_is_added_so_echo_and_noise_together_stay_under_it():
    from twisted_agent.sim.line import LineNoise

    agent = QUESTION  # loud speech: its echo part is held at the ceiling
    threshold = TalkThreshold()
    threshold.played(agent, 8000)
    assert threshold.value == CEILING
    noise = LineNoise(dbfs=-40, seed=3)
    raised = [threshold.heard_line(np.clip(noise.take(160), -32768, 32767).astype("<i2").tobytes())
              for _ in range(100)]  # two seconds of the caller's line while it is their turn
    assert any(raised) and CEILING + 400 < threshold.value < CEILING + 700, "about twice the noise's magnitude"
    echo = LineEcho(delay_ms=40, gain_db=-10)
    echo.heard(agent, 0.0)
    line = echo.take(0.0, len(agent) // 2 + 400) + noise.take(len(agent) // 2 + 400)
    returned = np.clip(line, -32768, 32767).astype("<i2").tobytes()
    assert frame_magnitudes(returned).max() < threshold.value, "the echo over the noise never starts a talk"
    assert (frame_magnitudes(QUESTION) >= threshold.value).sum() >= 10, "the caller still does"
