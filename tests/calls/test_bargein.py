"""BargeInDetector: when the caller's voice over the agent interrupts it, and which frames start the new turn."""

from __future__ import annotations

import numpy as np
import pytest

from tests.media.test_echo import CLIP, over_a_line
from twisted_agent.calls.bargein import BargeInDetector


def feed(detector: BargeInDetector, voiced: list[bool], start: float = 10.0) -> list[bool]:
    """Frame n (1-based) arrives at start + 0.02 n; the list says which frames hold the caller's voice."""
    return [detector.frame(bytes([n]) * 320, start + 0.02 * n, v) for n, v in enumerate(voiced, 1)]


def test_interrupts_after_the_minimum_of_voice_and_keeps_the_frames_from_the_onset() -> None:
    detector = BargeInDetector(min_ms=120)
    feed(detector, [False, False, True, True, True, True, True])
    assert not detector.due(), "five voiced frames: 100 ms"
    detector.frame(b"\x08" * 320, 10.16, True)  # the sixth voiced frame: 120 ms
    assert detector.due()
    frames = detector.take()
    assert [f[0] for f in frames] == [3, 4, 5, 6, 7, 8], "from the onset on, nothing earlier"
    assert not detector.armed and detector.take() == []


def test_voice_must_be_dense_and_still_going() -> None:
    detector = BargeInDetector(min_ms=120)  # 6 of the last 8 frames
    feed(detector, [True, True, True, False, True, True, True])
    assert detector.due(), "six of the last eight, with a dip"
    detector.frame(bytes(320), 10.16, False)
    assert not detector.due(), "the caller must still be voicing"
    sparse = BargeInDetector(min_ms=120)
    feed(sparse, [True, False, True, False, True, False, True, False, True, False, True, False, True])
    assert not sparse.due(), "scattered frames (the echo check's mistakes) never add up to an interruption"


def test_speech_that_stops_early_is_a_backchannel() -> None:
    detector = BargeInDetector(min_ms=120, gap_ms=100)
    ends = feed(detector, [True, True, True, False, False, False, False, False])
    assert ends.count(True) == 1 and detector.backchannels == 1 and not detector.armed


def test_keeps_a_bounded_history_and_checks_its_settings() -> None:
    detector = BargeInDetector(min_ms=100, keep_ms=200)
    feed(detector, [True] * 50)
    assert len(detector.take()) == 10
    assert len(BargeInDetector(min_ms=20).recent(3)) == 0
    with pytest.raises(ValueError):
        BargeInDetector(min_ms=-1)


def barge_ins(judged: list[tuple[float, bool, bool]]) -> list[float]:
    """Feed the echo check's verdicts to a detector as the call does; when each barge-in fell due."""
    detector, due = BargeInDetector(min_ms=120), []
    for at, _, caller_voice in judged:
        detector.frame(b"", at, caller_voice)
        if detector.due():
            due.append(at)
            detector.reset()
    return due


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_agents_echo_never_interrupts_it_whatever_the_senders_jitter(seed: int) -> None:
    """The bench's false barge-in: the pacer stamps frames a millisecond or two late, and the echo
    check used to take that for gaps in the agent's audio, so a fifth of the echo frames looked like
    the caller and now and then six of eight did (seed 0)."""
    agent = np.tile(CLIP[::-1], 8)  # the bench's voice: the clip backwards, 25 s
    assert barge_ins(over_a_line(agent, jitter_ms=2.0, seed=seed)) == []


def test_the_caller_talking_over_the_echo_still_interrupts_soon() -> None:
    agent = np.tile(CLIP[::-1], 4)
    phrase = CLIP[2080:2080 + 4480].astype(np.float64)  # the bench's interruption: 0.56 s from the first syllable
    onsets = [2.0, 4.3, 7.1, 9.7]
    caller = np.zeros(len(agent) + 8000)
    for onset in onsets:
        caller[round(onset * 8000):round(onset * 8000) + len(phrase)] = phrase
    due = barge_ins(over_a_line(agent, jitter_ms=2.0, caller=caller))
    assert all(any(0 < at - onset < 0.7 for onset in onsets) for at in due), "only the caller interrupts"
    for onset in onsets:
        first = min(at for at in due if at > onset)
        # the phone sends the onset's frame ~27 ms after it; six frames of voice: 120 ms and a frame or two
        assert first - onset <= 0.2, (onset, first)


def test_when_no_frame_comes_the_clock_ends_a_backchannel_and_it_never_adds_up_with_later_speech() -> None:
    detector = BargeInDetector(min_ms=120, gap_ms=100)
    feed(detector, [True, True, True, True, True])  # "mm-hm", then Asterisk sends nothing (a Local channel)
    assert detector.armed and not detector.expire(10.15), "not yet: 100 ms after the last voiced frame"
    assert detector.expire(10.2) and not detector.armed and detector.backchannels == 1
    late = BargeInDetector(min_ms=120, gap_ms=100)
    feed(late, [True, True, True, True, True])
    # two seconds later the caller speaks: without the gap the old five frames and one new one made six
    assert late.frame(b"\x01" * 320, 12.0, True), "the first frame after the gap ends the old backchannel"
    assert not late.due(), "the new speech starts afresh"
    for n in range(1, 6):
        late.frame(bytes([n]) * 320, 12.0 + 0.02 * n, True)
    assert late.due() and len(late.take()) == 6, "six frames of the new speech, none of the old"
