"""KeyPresses: one press reported by ARI and on the media leg counts once; two presses count twice."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_agent.calls.keys import KeyPresses


def test_the_other_report_of_a_press_is_not_a_press():
    clock = Clock()
    keys = KeyPresses(clock, window=0.5)
    assert keys.press("5", "ari")
    clock.advance(0.02)
    assert not keys.press("5", "media"), "the same press, on the media leg"
    assert keys.press("5", "ari"), "pressed again"
    assert keys.press("7", "media") and not keys.press("7", "ari")
    clock.advance(1)
    assert keys.press("5", "media"), "too late to be the other report of the second 5"


def test_reports_from_one_source_only_do_not_pile_up():
    clock = Clock()
    keys = KeyPresses(clock)
    for _ in range(1000):
        assert keys.press("1", "ari")
        clock.advance(1)
    assert sum(len(reports) for reports in keys._unmatched.values()) <= 1
