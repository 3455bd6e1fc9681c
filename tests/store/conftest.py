"""Fixtures of the store tests: both stores, and Redis stores on a real redis-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.calls.simstack import until
from tests.redis_server import RedisServer
from twisted_agent.config import StoreConfig
from twisted_agent.store.interfaces import ICallStore
from twisted_agent.store.memory import MemoryStore
from twisted_agent.store.redis import RedisStore

PREFIX = "test-agent"
#: small bounds so that tests reach them; constructed directly, so below the loader's minimums
SETTINGS: dict[str, Any] = {"prefix": PREFIX, "history_max": 10, "history_days": 1.0, "live_ttl": 30.0,
                            "buffer_max": 100}

MakeRedisStore = Callable[..., RedisStore]


def fast_retry(attempt: int) -> float:
    # a restarted redis-server is back within a fraction of a second; production backs off to 10 s
    return 0.1


async def connected(*stores: RedisStore) -> None:
    await until(lambda: all(store.stats()["connected"] for store in stores), 10, "Redis connected")


@pytest.fixture
def make_redis_store(redis_server: RedisServer) -> Iterator[MakeRedisStore]:
    """``make(engine_id, **settings)``: a started RedisStore on the test's redis-server (``await
    connected(store)`` before reading)."""
    started: list[RedisStore] = []

    def make(engine_id: str = "engine-a", **settings: Any) -> RedisStore:
        config = StoreConfig(redis_url=redis_server.url, **{**SETTINGS, **settings})
        store = RedisStore(reactor, config, engine_id, retry_policy=fast_retry)
        store.start()
        started.append(store)
        return store

    yield make
    for store in started:
        pytest_twisted.blockon(store.stop())


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[ICallStore]:
    """Each implementation in turn, configured alike: the contract suite runs against both."""
    if request.param == "memory":
        memory = MemoryStore(reactor, StoreConfig(**SETTINGS), "engine-a")
        memory.start()
        yield memory
        pytest_twisted.blockon(memory.stop())
    else:
        make: MakeRedisStore = request.getfixturevalue("make_redis_store")
        redis = make("engine-a")
        pytest_twisted.blockon(Deferred.fromCoroutine(connected(redis)))
        yield redis
