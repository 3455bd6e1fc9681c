"""What only the Redis store does: engines sharing one Redis, expiry of a dead engine's calls, and
riding out a Redis that dies and comes back — on a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.calls.simstack import sleep, until
from tests.helpers import free_port
from tests.pki import make_pki
from tests.redis_server import RedisServer
from tests.store.conftest import PREFIX, SETTINGS, MakeRedisStore, connected, fast_retry
from tests.store.records import finished, ids, live, now, the_call
from twisted_agent.config import StoreConfig
from twisted_agent.store.interfaces import StoreUnavailable
from twisted_agent.store.redis import RedisStore, parse_redis_url


@pytest_twisted.ensureDeferred
async def test_engines_sharing_redis_see_each_others_calls(make_redis_store: MakeRedisStore) -> None:
    a, b = make_redis_store("engine-a"), make_redis_store("engine-b")
    await connected(a, b)
    t = now()
    a.call_updated(live("a1", t - 2))
    b.call_updated(live("b1", t - 1))
    await until(lambda: a.stats()["buffered"] == b.stats()["buffered"] == 0, 5, "both written")
    for store in (a, b):
        listed = await store.live_calls()
        assert [(r["call_id"], r["engine_id"]) for r in listed] == [("a1", "engine-a"), ("b1", "engine-b")]
    assert (await the_call(a, "b1"))["engine_id"] == "engine-b"
    await until(lambda: a.cluster_active() == b.cluster_active() == 2, 5, "both engines count two calls")

    b.call_finished(finished(live("b1", t - 1), t))
    assert ids(await b.history()) == ["b1"]
    assert ids(await a.history()) == ["b1"], "one engine's finished calls are in the shared history"
    assert ids(await a.live_calls()) == ["a1"]
    assert (await the_call(a, "b1"))["outcome"] == "completed"


@pytest_twisted.ensureDeferred
async def test_a_dead_engines_calls_expire(make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    alive = make_redis_store("engine-alive", live_ttl=1.0)
    dead = make_redis_store("engine-dead", live_ttl=1.0)
    await connected(alive, dead)
    alive.call_updated(live("mine", now()))
    dead.call_updated(live("theirs", now()))
    await until(lambda: alive.cluster_active() == 2, 5, "both calls seen")
    ttl = redis_server.command("PTTL", f"{PREFIX}:live:theirs")
    assert 0 < ttl <= 1000

    dead._heartbeat.stop()  # the engine dies without a word: nothing refreshes its records any more
    await sleep(1.6)
    assert ids(await alive.live_calls()) == ["mine"], "the dead engine's call is gone"
    assert redis_server.command("EXISTS", f"{PREFIX}:live:mine") == 1, "the living engine's call is refreshed"
    await until(lambda: alive.cluster_active() == 1, 3, "the dead engine's call no longer counted")
    assert redis_server.command("ZCARD", f"{PREFIX}:live") == 1, "the expired call left the index"


@pytest_twisted.ensureDeferred
async def test_records_wait_while_redis_is_down_and_all_arrive_when_it_is_back(
        make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    store = make_redis_store("engine-a")
    await connected(store)
    t = now()
    staying, ending = live("staying", t - 30), live("ending", t - 20)
    store.call_updated(staying)
    store.call_updated(ending)
    await until(lambda: store.stats()["buffered"] == 0, 5, "written")

    redis_server.kill()
    await until(lambda: store.status().state == "disconnected", 5, "the loss noticed")
    store.call_finished(finished(ending, t))
    staying = {**staying, "state": "speaking", "updated_at": t}
    store.call_updated(staying)
    store.call_updated(live("new", t - 5))
    for n in range(3):
        store.call_finished(finished(live(f"short{n}", t - 10), t - 9 + n))
    assert store.stats()["buffered"] == 6
    assert store.stats()["connected"] is False
    status = store.status()
    assert status.ready and "6 record(s) waiting" in status.detail and "closed the connection" in status.detail
    assert ids(await store.live_calls()) == ["staying", "new"], "this engine's own calls are still listed"
    assert (await the_call(store, "ending"))["outcome"] == "completed", "answered from the waiting records"
    with pytest.raises(StoreUnavailable, match=rf"Redis at 127\.0\.0\.1:{redis_server.port} is unreachable"):
        await store.history()
    with pytest.raises(StoreUnavailable):
        await store.get_call("someone-elses")

    redis_server.restart()
    await until(lambda: store.stats()["connected"] and store.stats()["buffered"] == 0, 10, "reconnected, written")
    assert store.status().state == "connected"
    assert ids(await store.history()) == ["ending", "short2", "short1", "short0"]
    reader = make_redis_store("engine-reader")
    await connected(reader)
    listed = await reader.live_calls()
    assert ids(listed) == ["staying", "new"]
    assert listed[0]["state"] == "speaking", "the update made during the outage reached Redis"
    assert store.errors == 0


@pytest_twisted.ensureDeferred
async def test_a_redis_that_stops_answering_is_dropped_and_rejoined(
        make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    store = make_redis_store("engine-a")
    await connected(store)
    store.call_updated(live("c1", now()))
    await until(lambda: store.stats()["buffered"] == 0, 5, "written")
    redis_server.pause()
    try:
        started = now()
        with pytest.raises(StoreUnavailable, match=r"did not answer within 3s"):
            await store.history()
        assert now() - started < 4, "a read is bounded in time"
        await until(lambda: store.status().state == "disconnected", 1, "the silent connection dropped")
        assert "did not answer within 3s" in store.status().detail
        store.call_finished(finished(live("c1", now() - 5), now()))
        assert store.stats()["buffered"] == 1
    finally:
        redis_server.resume()
    await until(lambda: store.stats()["connected"] and store.stats()["buffered"] == 0, 10, "rejoined, written")
    assert ids(await store.history()) == ["c1"]


@pytest_twisted.ensureDeferred
async def test_a_full_buffer_drops_live_updates_before_finished_calls(
        make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    store = make_redis_store("engine-a", buffer_max=4)
    await connected(store)
    redis_server.kill()
    await until(lambda: not store.stats()["connected"], 5, "the loss noticed")
    t = now()

    def finish(n: int) -> None:
        store.call_finished(finished(live(f"done{n}", t - 40 + n), t - 30 + n))

    finish(0)
    finish(1)
    for n in range(3):
        store.call_updated(live(f"live{n}", t - 50 + n))
    assert store.stats()["buffered"] == 4
    assert store.errors == 1, "the oldest live update went, not the older finished calls"
    finish(2)
    finish(3)
    assert store.errors == 3, "then the other live updates"
    finish(4)  # only finished calls wait now: the oldest of them goes, as a last resort
    assert store.stats()["buffered"] == 4
    assert store.errors == store.stats()["dropped"] == 4

    redis_server.restart()
    await until(lambda: store.stats()["connected"] and store.stats()["buffered"] == 0, 10, "written")
    assert ids(await store.history()) == ["done4", "done3", "done2", "done1"]
    reader = make_redis_store("engine-reader")
    await connected(reader)
    assert ids(await reader.live_calls()) == ["live0", "live1", "live2"], "live calls are rewritten on reconnection"


@pytest_twisted.ensureDeferred
async def test_every_key_is_below_the_prefix(make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    store = make_redis_store("engine-a")
    other = make_redis_store("engine-b", prefix="other-agent")
    await connected(store, other)
    t = now()
    store.call_updated(live("c1", t))
    store.call_finished(finished(live("c2", t - 10), t))
    other.call_updated(live("x1", t))
    assert ids(await store.history()) == ["c2"]
    assert ids(await store.live_calls()) == ["c1"]
    assert ids(await other.live_calls()) == ["x1"], "another prefix is another store"
    assert await other.history() == []
    keys = redis_server.keys()
    assert keys == sorted([f"{PREFIX}:live", f"{PREFIX}:live:c1", f"{PREFIX}:history", f"{PREFIX}:call:c2",
                           "other-agent:live", "other-agent:live:x1"])
    raw = json.loads(redis_server.command("GET", f"{PREFIX}:live:c1"))
    assert raw == {**live("c1", t), "engine_id": "engine-a"}, "plain JSON that other tools can read"
    call_ttl = redis_server.command("PTTL", f"{PREFIX}:call:c2")
    assert 0.99 * 86400_000 < call_ttl <= 86400_000, "history records expire history_days after they ended"


@pytest_twisted.ensureDeferred
async def test_a_restarted_engine_removes_its_predecessors_live_calls(
        make_redis_store: MakeRedisStore, redis_server: RedisServer) -> None:
    crashed = make_redis_store("engine-a")
    neighbour = make_redis_store("engine-b")
    await connected(crashed, neighbour)
    t = now()
    crashed.call_updated(live("orphan1", t))
    crashed.call_updated(live("orphan2", t))
    neighbour.call_updated(live("b1", t))
    await until(lambda: crashed.stats()["buffered"] == neighbour.stats()["buffered"] == 0, 5, "written")
    await crashed.stop()  # as if it crashed: its records stay behind, with their TTL

    successor = make_redis_store("engine-a")
    await connected(successor)
    assert ids(await successor.live_calls()) == ["b1"]
    assert redis_server.command("EXISTS", f"{PREFIX}:live:orphan1", f"{PREFIX}:live:orphan2") == 0
    assert redis_server.command("EXISTS", f"{PREFIX}:live:b1") == 1
    assert ids(await neighbour.live_calls()) == ["b1"]


@pytest_twisted.ensureDeferred
async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret/pw").start()
    store = RedisStore(reactor, StoreConfig(redis_url=f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/3", **SETTINGS),
                       "engine-a", retry_policy=fast_retry)
    try:
        store.start()
        await until(lambda: store.stats()["connected"], 5, "connected with AUTH")
        store.call_finished(finished(live("c1", now() - 5), now()))
        assert ids(await store.history()) == ["c1"]
        assert server.keys(db=3) == [f"{PREFIX}:call:c1", f"{PREFIX}:history"]
        assert server.keys(db=0) == []
        detail = store.status().detail
        assert "****" in detail and "s3cret" not in detail
    finally:
        await store.stop()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_reported(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right").start()
    store = RedisStore(reactor, StoreConfig(redis_url=f"redis://:wrong@127.0.0.1:{server.port}", **SETTINGS),
                       "engine-a", retry_policy=fast_retry)
    try:
        store.start()
        store.call_updated(live("c1", now()))
        await until(lambda: "credentials" in store.status().detail, 5, "the refusal reported")
        status = store.status()
        assert status.state == "disconnected" and status.ready
        assert "wrong" not in status.detail
        assert ids(await store.live_calls()) == ["c1"]
    finally:
        await store.stop()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = RedisServer(tmp_path, password="pw", tls=pki).start()
    url = server.url
    assert url.startswith("rediss://:pw@127.0.0.1:")
    trusting = RedisStore(reactor, StoreConfig(redis_url=url, tls_ca_file=pki["bundle"], **SETTINGS), "engine-a",
                          retry_policy=fast_retry)
    untrusting = RedisStore(reactor, StoreConfig(redis_url=url, **SETTINGS), "engine-b", retry_policy=fast_retry)
    try:
        trusting.start()
        untrusting.start()
        await until(lambda: trusting.stats()["connected"], 5, "connected over TLS")
        trusting.call_finished(finished(live("c1", now() - 5), now()))
        assert ids(await trusting.history()) == ["c1"]
        assert server.keys() == [f"{PREFIX}:call:c1", f"{PREFIX}:history"], "written through TLS"

        # the system's trust store does not know the private CA: refused, said so, and calls go on
        await until(lambda: "TLS" in untrusting.status().detail, 5, "the TLS failure reported")
        status = untrusting.status()
        assert status.state == "disconnected" and status.ready
        assert f"TLS with 127.0.0.1:{server.port} failed" in status.detail and "REDIS_TLS_CA_FILE" in status.detail
        untrusting.call_updated(live("c2", now()))
        assert ids(await untrusting.live_calls()) == ["c2"] and untrusting.stats()["buffered"] == 1
    finally:
        await trusting.stop()
        await untrusting.stop()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_is_explained_and_calls_go_on() -> None:
    port = free_port()
    store = RedisStore(reactor, StoreConfig(redis_url=f"redis://127.0.0.1:{port}/0", **SETTINGS), "engine-a",
                       retry_policy=fast_retry)
    assert store.cluster_active() is None
    store.start()
    try:
        await until(lambda: store.status().state == "disconnected", 5, "the failure noticed")
        store.call_updated(live("c1", now()))
        status = store.status()
        assert status.ready
        assert f"connection refused by 127.0.0.1:{port}" in status.detail
        assert "calls go on, 1 record(s) waiting" in status.detail
        assert ids(await store.live_calls()) == ["c1"]
        with pytest.raises(StoreUnavailable) as raised:
            await store.history()
        assert str(raised.value) == f"Redis at 127.0.0.1:{port} is unreachable: connection refused by 127.0.0.1:{port}"
        assert store.stats() == {"buffered": 1, "errors": 0, "connected": False, "live": 1, "dropped": 0,
                                 "reconnects": 0}
    finally:
        await store.stop()
    assert store.status().state == "stopped"


def test_redis_urls() -> None:
    a = parse_redis_url("redis://:p%40ss@redis.example:6380/2")
    assert (a.scheme, a.host, a.port, a.password, a.db, a.where) == ("redis", "redis.example", 6380, "p@ss", 2,
                                                                      "redis.example:6380")
    b = parse_redis_url("rediss://app:pw@10.0.0.5")
    assert (b.scheme, b.username, b.password, b.port, b.db) == ("rediss", "app", "pw", 6379, 0)
    c = parse_redis_url("unix:/run/redis/redis.sock?db=4")
    assert (c.scheme, c.path, c.db, c.where) == ("unix", "/run/redis/redis.sock", 4, "/run/redis/redis.sock")
    assert parse_redis_url("redis://[::1]:7000").where == "[::1]:7000"

