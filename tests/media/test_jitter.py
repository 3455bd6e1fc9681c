from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twisted_agent.media.jitter import JitterEstimator, ReorderBuffer


def feed(buffer: ReorderBuffer[int], seqs: list[int], now: float = 0.0) -> list[int]:
    out: list[int] = []
    for seq in seqs:
        out.extend(buffer.push(seq, seq, now))
    return out


def test_in_order_stream_is_released_at_once():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    for seq in range(100, 110):
        assert buffer.push(seq, seq, 0.0) == [seq]
    assert (buffer.lost, buffer.reordered, buffer.held) == (0, 0, 0)


def test_swap_is_fixed_without_waiting_longer_than_the_gap():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    assert buffer.push(1, 1, 0) == [1]
    assert buffer.push(3, 3, 0) == []  # held: 2 is missing
    assert buffer.push(2, 2, 0) == [2, 3]
    assert buffer.push(4, 4, 0) == [4]
    assert buffer.reordered == 1 and buffer.lost == 0


def test_loss_is_skipped_when_depth_exceeded_and_counted():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    assert feed(buffer, [1, 2, 5, 6]) == [1, 2]
    assert buffer.push(7, 7, 0) == [5, 6, 7]
    assert buffer.lost == 2


def test_gap_given_up_on_a_clock_when_the_stream_stops():
    buffer: ReorderBuffer[int] = ReorderBuffer(2, frame_seconds=0.02)
    assert feed(buffer, [1, 3], now=1.0) == [1]
    assert buffer.tick(1.02) == []
    assert buffer.tick(1.04) == [3]
    assert buffer.lost == 1


def test_late_and_duplicate_packets_are_dropped():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    feed(buffer, [1, 2, 3])
    assert buffer.push(2, 2, 0) == []
    assert buffer.late == 1
    buffer.push(5, 5, 0)
    assert buffer.push(5, 5, 0) == []
    assert buffer.duplicates == 1


def test_sequence_wraps():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    assert feed(buffer, [65534, 65535, 0, 1]) == [65534, 65535, 0, 1]
    assert feed(buffer, [3, 2]) == [2, 3]


def test_a_big_jump_is_a_restart_not_a_loss():
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    feed(buffer, [10, 11])
    assert buffer.push(40000, 40000, 0) == [40000]
    assert buffer.restarts == 1 and buffer.lost == 0


def test_depth_zero_never_holds():
    buffer: ReorderBuffer[int] = ReorderBuffer(0)
    assert feed(buffer, [1, 3, 2, 4]) == [1, 3, 4]
    assert buffer.lost == 1 and buffer.late == 1


@given(st.integers(0, 65535), st.lists(st.floats(0, 1), min_size=1, max_size=200), st.integers(0, 4))
def test_bounded_reordering_is_undone_exactly(start, offsets, depth):
    """Packets displaced by fewer than `depth` places come out in order: none lost, late or repeated."""
    count = len(offsets)
    offsets[0] = 0.0  # the first packet to arrive starts the stream: nothing can be earlier than it
    seqs = [(start + i) & 0xFFFF for i in range(count)]
    # each packet arrives as if sent at i + r (r < depth): it can overtake only packets < depth before it
    arrival = sorted(range(count), key=lambda i: (i + offsets[i] * max(depth - 1, 0), i))
    buffer: ReorderBuffer[int] = ReorderBuffer(depth)
    out = feed(buffer, [seqs[i] for i in arrival]) + buffer.drain()
    assert out == seqs
    assert (buffer.lost, buffer.late, buffer.duplicates) == (0, 0, 0)


@given(st.lists(st.integers(0, 65535), max_size=60), st.integers(0, 5))
def test_any_input_gives_unique_output_without_error(seqs, depth):
    buffer: ReorderBuffer[int] = ReorderBuffer(depth)
    out = feed(buffer, seqs) + buffer.drain()
    assert len(out) <= len(seqs)


def test_jitter_is_zero_for_a_steady_stream_and_grows_with_variation():
    steady = JitterEstimator(8000)
    for i in range(100):
        steady.update(160 * i, 10.0 + 0.02 * i)
    assert steady.jitter_ms < 1e-6
    bumpy = JitterEstimator(8000)
    for i in range(200):
        bumpy.update(160 * i, 10.0 + 0.02 * i + (0.005 if i % 2 else 0.0))
    # alternating ±5 ms transit: RFC 3550's estimator converges to 5 ms
    assert 4.5 < bumpy.jitter_ms < 5.5


def test_jitter_survives_timestamp_wrap():
    estimator = JitterEstimator(8000)
    base = 2**32 - 800
    for i in range(20):
        estimator.update((base + 160 * i) & 0xFFFFFFFF, 0.02 * i)
    assert estimator.jitter_ms < 1e-6
