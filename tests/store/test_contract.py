"""What every call store does, checked against each implementation (memory, and Redis on a real server).

The engine and the admin UI rely on exactly this; an implementation that differs fails here.
"""

from __future__ import annotations

import copy

import pytest_twisted
from zope.interface.verify import verifyObject

from tests.calls.simstack import until
from tests.store.records import DAY, ENGINE, finished, live, now, stored, the_call
from twisted_agent.status import ComponentStatus
from twisted_agent.store.interfaces import ICallStore


def test_provides_the_interface(store: ICallStore) -> None:
    assert verifyObject(ICallStore, store)
    assert store.component == "store"
    assert store.engine_id == ENGINE


@pytest_twisted.ensureDeferred
async def test_a_live_call_is_listed_and_found(store: ICallStore) -> None:
    record = live("1700000000.1", now())
    store.call_updated(record)
    assert await store.live_calls() == [stored(record)]
    assert await store.get_call("1700000000.1") == stored(record)
    assert await store.get_call("1700000000.99") is None


@pytest_twisted.ensureDeferred
async def test_an_update_replaces_the_live_record(store: ICallStore) -> None:
    record = live("c1", now())
    store.call_updated(record)
    updated = {**record, "state": "speaking", "updated_at": record["started_at"] + 2,
               "transcript": [*record["transcript"], {"speaker": "caller", "text": "Hi"}]}
    store.call_updated(updated)
    assert await store.live_calls() == [stored(updated)]
    assert await store.get_call("c1") == stored(updated)


@pytest_twisted.ensureDeferred
async def test_live_calls_are_listed_oldest_first(store: ICallStore) -> None:
    t = now()
    for call_id, started in [("b", t - 5), ("c", t - 1), ("a", t - 9)]:
        store.call_updated(live(call_id, started))
    assert [r["call_id"] for r in await store.live_calls()] == ["a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_a_finished_call_leaves_the_live_list_for_the_history_with_every_field(store: ICallStore) -> None:
    t = now()
    record = live("c1", t - 60)
    store.call_updated(record)
    store.call_updated(live("c2", t - 30))
    done = finished(record, t - 1)
    store.call_finished(done)
    assert [r["call_id"] for r in await store.live_calls()] == ["c2"]
    assert await store.history() == [stored(done)]
    assert await store.get_call("c1") == stored(done)


@pytest_twisted.ensureDeferred
async def test_a_call_finished_without_a_live_record_is_kept(store: ICallStore) -> None:
    done = finished(live("c1", now() - 10), now())
    store.call_finished(done)
    assert await store.history() == [stored(done)]


@pytest_twisted.ensureDeferred
async def test_history_is_newest_first_and_limited(store: ICallStore) -> None:
    t = now() - 1000
    for n in range(6):
        store.call_finished(finished(live(f"c{n}", t + n * 10), t + n * 10 + 5))
    assert [r["call_id"] for r in await store.history()] == ["c5", "c4", "c3", "c2", "c1", "c0"]
    assert [r["call_id"] for r in await store.history(limit=2)] == ["c5", "c4"]


@pytest_twisted.ensureDeferred
async def test_history_search_matches_part_of_the_callers_number(store: ICallStore) -> None:
    t = now() - 1000
    numbers = ["+441632960001", "+15550100", "+441632960777", "0800123"]
    for n, number in enumerate(numbers):
        store.call_finished(finished(live(f"c{n}", t + n, number), t + n + 1))
    assert [r["call_id"] for r in await store.history("1632960")] == ["c2", "c0"]
    assert [r["call_id"] for r in await store.history("0777")] == ["c2"]
    assert [r["call_id"] for r in await store.history("+1555")] == ["c1"]
    assert await store.history("999") == []
    assert [r["call_id"] for r in await store.history("1632960", limit=1)] == ["c2"]


@pytest_twisted.ensureDeferred
async def test_history_search_bounds_the_start_time_inclusively(store: ICallStore) -> None:
    t = now() - 5000
    for n in range(5):  # started t, t+100, ... t+400; each lasted 50 s
        store.call_finished(finished(live(f"c{n}", t + n * 100), t + n * 100 + 50))
    assert [r["call_id"] for r in await store.history(since=t + 100, until=t + 300)] == ["c3", "c2", "c1"]
    assert [r["call_id"] for r in await store.history(since=t + 101)] == ["c4", "c3", "c2"]
    assert [r["call_id"] for r in await store.history(until=t + 99)] == ["c0"]
    # a call that started before `since` but ended after it is not in the window
    assert [r["call_id"] for r in await store.history(since=t + 20, until=t + 120)] == ["c1"]


@pytest_twisted.ensureDeferred
async def test_history_keeps_the_newest_history_max_calls(store: ICallStore) -> None:
    t = now() - 1000
    for n in range(13):  # history_max is 10
        store.call_finished(finished(live(f"c{n:02d}", t + n), t + n + 1))
    kept = [r["call_id"] for r in await store.history(limit=100)]
    assert kept == [f"c{n:02d}" for n in range(12, 2, -1)]
    assert await store.get_call("c00") is None
    assert (await the_call(store, "c03"))["call_id"] == "c03"


@pytest_twisted.ensureDeferred
async def test_history_drops_calls_older_than_history_days(store: ICallStore) -> None:
    t = now()
    old = finished(live("old", t - 2 * DAY - 60), t - 2 * DAY)  # history_days is 1
    recent = finished(live("recent", t - DAY / 2 - 60), t - DAY / 2)
    store.call_finished(old)
    store.call_finished(recent)
    assert [r["call_id"] for r in await store.history()] == ["recent"]
    assert await store.get_call("old") is None


@pytest_twisted.ensureDeferred
async def test_records_are_copies(store: ICallStore) -> None:
    record = live("c1", now())
    original = copy.deepcopy(record)
    store.call_updated(record)
    record["state"] = "thinking"
    record["transcript"].append({"speaker": "caller", "text": "changed after the update"})
    listed = await store.live_calls()
    assert listed == [stored(original)]
    listed[0]["transcript"].clear()
    (await the_call(store, "c1"))["state"] = "mangled"
    assert await store.get_call("c1") == stored(original)

    done = finished(original, now() + 1)
    kept = copy.deepcopy(done)
    store.call_finished(done)
    done["media"]["lost"] = 999
    done["turns"].clear()
    history = await store.history()
    assert history == [stored(kept)]
    history[0]["media"]["lost"] = 1
    assert await store.history() == [stored(kept)]


@pytest_twisted.ensureDeferred
async def test_cluster_active_counts_live_calls(store: ICallStore) -> None:
    t = now()
    store.call_updated(live("c1", t))
    store.call_updated(live("c2", t))
    await until(lambda: store.cluster_active() == 2, 5, "two live calls counted")
    store.call_finished(finished(live("c1", t), t + 1))
    await until(lambda: store.cluster_active() == 1, 5, "one live call counted")


@pytest_twisted.ensureDeferred
async def test_status_and_stats(store: ICallStore) -> None:
    store.call_updated(live("c1", now()))
    status = store.status()
    assert isinstance(status, ComponentStatus)
    assert status.ready, "calls never depend on the store"
    assert status.state in ("running", "connected")
    assert status.detail
    await until(lambda: store.stats()["buffered"] == 0, 5, "nothing waiting")
    stats = store.stats()
    assert stats["errors"] == 0 == store.errors
    assert all(isinstance(v, int | bool) for v in stats.values())
