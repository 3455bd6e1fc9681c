"""Choosing the store (memory, or Redis when REDIS_URL is set) and running it as a service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from twisted_agent.config import StoreConfig
from twisted_agent.store.interfaces import ICallStore
from twisted_agent.store.memory import MemoryStore


def make_store(reactor: Any, config: StoreConfig) -> ICallStore:
    if config.redis_url:
        from twisted_agent.store.redis import RedisStore

        return RedisStore(reactor, config)
    return MemoryStore(reactor, config)


class StoreService(Service):
    """Starts the store with the engine; stops it last, so the records of calls ended by the
    drain are still written."""

    def __init__(self, store: ICallStore) -> None:
        self.store = store

    def startService(self) -> None:
        Service.startService(self)
        self.store.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.store.stop()
