"""BargeInDetector: when caller speech over the agent interrupts it, and which frames start the new turn."""

from __future__ import annotations

import pytest

from twisted_agent.calls.bargein import BargeInDetector


def feed(detector: BargeInDetector, start: float, count: int) -> None:
    for n in range(count):
        detector.frame(bytes([n]) * 320, start + 0.02 * (n + 1))


def test_speech_interrupts_after_the_minimum_from_its_onset_and_keeps_the_onset_frames() -> None:
    detector = BargeInDetector(min_ms=120)
    feed(detector, 10.0, 10)  # 10.02 .. 10.20: frame n holds the 20 ms before its arrival
    detector.speech_started(onset=10.06)  # the VAD places the onset at the start of frame 3
    assert not detector.due(10.16)
    assert detector.due(10.18)
    frames = detector.take()
    assert [f[0] for f in frames] == [3, 4, 5, 6, 7, 8, 9], "from the onset on, nothing earlier"
    assert not detector.armed and detector.take() == []


def test_short_speech_is_a_backchannel() -> None:
    detector = BargeInDetector(min_ms=120)
    detector.speech_started(onset=5.0)
    assert detector.speech_ended() is True and detector.backchannels == 1
    assert detector.speech_ended() is False, "only armed speech counts"
    assert not detector.due(9.0)


def test_keeps_a_bounded_history() -> None:
    detector = BargeInDetector(min_ms=100, keep_ms=200)
    feed(detector, 0.0, 50)
    detector.speech_started(onset=0.0)
    assert len(detector.take()) == 10
    with pytest.raises(ValueError):
        BargeInDetector(min_ms=-1)
