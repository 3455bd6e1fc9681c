"""The store's place in /health until the store itself is built."""

from __future__ import annotations

from zope.interface import implementer

from twisted_agent.config import StoreConfig
from twisted_agent.config_display import mask_url_password
from twisted_agent.status import ComponentStatus, IStatusSource


@implementer(IStatusSource)
class StorePlaceholder:
    component = "store"

    def __init__(self, config: StoreConfig) -> None:
        self._config = config

    def status(self) -> ComponentStatus:
        if self._config.redis_url:
            detail = (f"REDIS_URL={mask_url_password(self._config.redis_url)} is set, but the Redis store is not "
                      "built yet; call records are not kept")
        else:
            detail = "in-memory store not built yet; call records are not kept"
        # Calls do not depend on the store, so it never makes the engine unready.
        return ComponentStatus("placeholder", True, detail, implemented=False)
