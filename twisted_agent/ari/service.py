"""The ARI connection as the rest of the engine sees it.

The events WebSocket client (a reconnecting ``ClientService``) and the REST client are built by
the control-plane work; until then this service reports itself as not connected, and /ready
stays 503 so no load balancer or operator mistakes the engine for one that can take calls.
"""

from __future__ import annotations

from twisted.application.service import Service
from zope.interface import implementer

from twisted_agent.config import ARIConfig
from twisted_agent.status import ComponentStatus, IStatusSource


@implementer(IStatusSource)
class ARIPlaceholderService(Service):
    component = "ari"

    def __init__(self, config: ARIConfig) -> None:
        self.config = config

    @property
    def connected(self) -> bool:
        return False

    def status(self) -> ComponentStatus:
        return ComponentStatus(
            "placeholder", False,
            f"ARI events client not built yet; not connected to {self.config.url} as app {self.config.app!r}",
            implemented=False)
