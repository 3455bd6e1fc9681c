"""The queue of writes waiting for Redis, without Redis: order, coalescing, the bound, requeue, waiting."""

from __future__ import annotations

from twisted_agent.store.write_queue import Write, WriteQueue


def make(limit: int = 100) -> tuple[WriteQueue, list[Write]]:
    dropped: list[Write] = []
    return WriteQueue(limit, dropped.append), dropped


def order(queue: WriteQueue) -> list[tuple[str, str, str]]:
    return [(w.kind, w.call_id, w.text) for w in queue.writes()]


def test_updates_of_a_live_call_coalesce_and_move_to_the_end() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a1", 1.0)
    queue.enqueue("live", "b", "b1", 2.0)
    queue.enqueue("live", "a", "a2", 1.0)
    assert order(queue) == [("live", "b", "b1"), ("live", "a", "a2")]
    assert queue.buffered == queue.queued == 2


def test_a_finish_supersedes_the_queued_live_update() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a-live", 1.0)
    queue.enqueue("live", "b", "b-live", 2.0)
    queue.enqueue("finished", "a", "a-done", 9.0)
    assert order(queue) == [("live", "b", "b-live"), ("finished", "a", "a-done")]
    assert queue.finishing() == {"a"}
    assert queue.finished_text("a") == "a-done"
    assert queue.finished_text("b") is None


def test_the_bound_drops_live_updates_first_and_finished_records_last() -> None:
    queue, dropped = make(limit=3)
    queue.enqueue("finished", "f1", "f1", 1.0)
    queue.enqueue("live", "l1", "l1", 1.0)
    queue.enqueue("live", "l2", "l2", 1.0)
    queue.enqueue("finished", "f2", "f2", 2.0)
    assert [w.call_id for w in dropped] == ["l1"], "the oldest live update goes first"
    queue.enqueue("finished", "f3", "f3", 3.0)
    assert [w.call_id for w in dropped] == ["l1", "l2"]
    queue.enqueue("finished", "f4", "f4", 4.0)
    assert [w.call_id for w in dropped] == ["l1", "l2", "f1"], "then the oldest finished record"
    assert order(queue) == [("finished", c, c) for c in ("f2", "f3", "f4")]


def test_a_batch_not_written_goes_back_in_order_without_what_was_superseded() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a1", 1.0)
    queue.enqueue("live", "b", "b1", 2.0)
    queue.enqueue("finished", "c", "c-done", 3.0)
    queue.enqueue("live", "d", "d1", 4.0)
    batch = queue.take(3)
    assert [w.call_id for w in batch] == ["a", "b", "c"]
    assert queue.queued == 1 and queue.buffered == 4
    assert queue.finished_text("c") == "c-done", "a finish being written is still this engine's to answer for"
    queue.enqueue("live", "b", "b2", 2.0)  # newer than the b1 in flight
    queue.enqueue("finished", "a", "a-done", 5.0)  # supersedes the a1 in flight
    queue.not_written()
    assert order(queue) == [("finished", "c", "c-done"), ("live", "d", "d1"), ("live", "b", "b2"),
                            ("finished", "a", "a-done")]
    assert [w.seq for w in queue.writes()] == sorted(w.seq for w in queue.writes())


def test_a_batch_put_back_over_the_bound_drops_live_updates() -> None:
    queue, dropped = make(limit=2)
    queue.enqueue("live", "a", "a1", 1.0)
    queue.enqueue("finished", "b", "b-done", 2.0)
    queue.take(2)
    queue.enqueue("finished", "c", "c-done", 3.0)
    queue.not_written()
    assert [w.call_id for w in dropped] == ["a"]
    assert order(queue) == [("finished", "b", "b-done"), ("finished", "c", "c-done")]


def test_dropping_live_updates_keeps_finishes() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a1", 1.0)
    queue.enqueue("finished", "b", "b-done", 2.0)
    queue.enqueue("live", "c", "c1", 3.0)
    queue.drop_live()
    assert order(queue) == [("finished", "b", "b-done")]


def test_a_reader_waits_for_what_was_queued_before_it_only() -> None:
    queue, _ = make()
    assert queue.flushed() is None, "nothing to wait for"
    queue.enqueue("live", "a", "a1", 1.0)
    waiting = queue.flushed()
    assert waiting is not None
    queue.enqueue("live", "b", "b1", 2.0)
    queue.take(1)
    queue.check_flushed()
    assert not waiting.called, "a is being written, not written"
    queue.written()
    queue.check_flushed()
    assert waiting.called, "b, queued after the reader came, does not hold it back"
    assert queue.pending_floor() == 2


def test_a_superseded_write_does_not_hold_a_reader_back() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a1", 1.0)
    waiting = queue.flushed()
    assert waiting is not None and not waiting.called
    queue.enqueue("live", "a", "a2", 1.0)
    assert waiting.called, "a1 will never be written: a2 replaced it"


def test_every_reader_is_released_when_nothing_more_can_be_written() -> None:
    queue, _ = make()
    queue.enqueue("live", "a", "a1", 1.0)
    waiting = queue.flushed()
    assert waiting is not None
    queue.check_flushed(everything=True)
    assert waiting.called
    assert queue.buffered == 1, "the write itself stays queued"
