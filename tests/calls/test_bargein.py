"""BargeInDetector: when the caller's voice over the agent interrupts it, and which frames start the new turn."""

from __future__ import annotations

import pytest

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
