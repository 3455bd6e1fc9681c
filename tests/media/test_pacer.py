from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_agent.media.pacer import LatenessHistogram, OutboundAudio, Pacer


class Ticks:
    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def tick(self, index: int, deadline: float, now: float) -> None:
        self.seen.append((index, deadline, now))


def test_ticks_on_deadlines_from_the_start_not_from_the_last_tick():
    clock = Clock()
    clock.advance(100)
    pacer = Pacer(clock)
    client = Ticks()
    pacer.add(client)
    pacer.start()
    clock.advance(0)
    for _ in range(50):
        clock.advance(0.0203)  # a slow clock step: wake-ups drift, deadlines must not
    deadlines = [deadline for _, deadline, _ in client.seen]
    assert [index for index, _, _ in client.seen] == list(range(len(client.seen)))
    assert deadlines == pytest.approx([100 + 0.02 * i for i in range(len(deadlines))])
    # 50 steps of 20.3 ms = 1.015 s: 51 ticks are due (0 .. 50), none lost to drift
    assert len(client.seen) == 51


def one_client(**options: int) -> tuple[Clock, Pacer, Ticks]:
    clock = Clock()
    pacer = Pacer(clock, **options)
    client = Ticks()
    pacer.add(client)
    pacer.start()
    clock.advance(0)
    return clock, pacer, client


def test_overdue_ticks_are_caught_up_with_their_lateness():
    clock, pacer, client = one_client()
    clock.advance(0.065)  # the reactor was busy for 65 ms
    assert [i for i, _, _ in client.seen] == [0, 1, 2, 3]
    assert [round(now - deadline, 3) for _, deadline, now in client.seen[1:]] == [0.045, 0.025, 0.005]


def test_too_far_behind_skips_ahead_and_counts():
    clock, pacer, client = one_client(max_catch_up=5)
    clock.advance(1.0)
    assert pacer.skipped == 45  # ticks 1..45; 46..50 still run
    assert [i for i, _, _ in client.seen][-5:] == [46, 47, 48, 49, 50]


def test_remove_and_stop():
    clock, pacer, client = one_client()
    clock.advance(0.02)
    pacer.remove(client)
    clock.advance(0.1)
    assert len(client.seen) == 2
    pacer.stop()
    assert not clock.getDelayedCalls()


def test_outbound_frames_padding_and_ms():
    queue = OutboundAudio(320)
    queue.enqueue(bytes(range(256)) * 3, "a")  # 768 bytes = 48 ms
    frames = [queue.next_frame() for _ in range(3)]
    assert [f[2] for f in frames if f] == [-1, -1, 48]
    last = frames[2]
    assert last is not None and last[0][:128] == (bytes(range(256)) * 3)[640:] and last[0][128:] == bytes(192)
    assert queue.next_frame() is None


def test_outbound_same_id_appends_and_flush_reports_sent_ms():
    queue = OutboundAudio(320)
    queue.enqueue(bytes(3200), "reply")  # 200 ms
    queue.enqueue(bytes(1600), "reply")  # +100 ms, same utterance
    queue.enqueue(bytes(1600), "next")
    for _ in range(4):
        queue.next_frame()
    assert queue.pending_ms() == 300 - 80 + 100
    assert queue.flush() == {"reply": 80, "next": 0}
    assert not queue


def test_utterance_ms_accumulate_across_stretches():
    queue = OutboundAudio(320)
    queue.enqueue(bytes(320), "u")
    assert queue.next_frame() == (bytes(320), "u", 20)
    queue.enqueue(bytes(640), "u")
    queue.next_frame()
    assert queue.next_frame() == (bytes(320), "u", 60)


def test_lateness_percentiles():
    histogram = LatenessHistogram()
    for _ in range(98):
        histogram.add(0.0001)
    histogram.add(0.004)
    histogram.add(0.2)
    assert histogram.percentile_ms(0.5) == pytest.approx(0.25)
    assert histogram.percentile_ms(0.99) == pytest.approx(4.25)
    assert histogram.summary()["max_ms"] == 200.0


def test_calls_are_spread_over_phase_slots():
    clock = Clock()
    pacer = Pacer(clock, phases=4)
    clients = [Ticks() for _ in range(8)]
    for client in clients:
        pacer.add(client)
    pacer.start()
    clock.advance(0)
    for _ in range(20):
        clock.advance(0.005)
    offsets = sorted({round(c.seen[0][1], 4) for c in clients})
    assert offsets == [0.0, 0.005, 0.01, 0.015], "two calls per 5 ms slot"
    for client in clients:
        assert [i for i, _, _ in client.seen][:5] == [0, 1, 2, 3, 4]
        gaps = {round(b[1] - a[1], 6) for a, b in zip(client.seen, client.seen[1:], strict=False)}
        assert gaps == {0.02}, "each call keeps its own 20 ms rhythm"
    pacer.remove(clients[0])
    pacer.add(Ticks())  # refills the emptied slot
    assert len(pacer) == 8
