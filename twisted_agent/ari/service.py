"""The ARI connection as the rest of the engine sees it: REST client plus the events WebSocket.

``ARIService`` is a ``MultiService`` whose child is the reconnecting events client; ``/health`` and
``/ready`` read its status, and the engine is ready only while the events socket is upgraded.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from zope.interface import implementer

from twisted_agent.ari.rest import ARIClient
from twisted_agent.ari.websocket import ARIEventsService
from twisted_agent.config import ARIConfig
from twisted_agent.status import ComponentStatus, IStatusSource


@implementer(IStatusSource)
class ARIService(MultiService):
    component = "ari"

    def __init__(self, config: ARIConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            # Only until AgentService passes its reactor; resolved here, not at import, so that
            # .rest and .events exist before start for the call engine to attach to.
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.rest = ARIClient(reactor, config)
        self.events = ARIEventsService(reactor, config)
        self.events.setName("events")
        self.events.setServiceParent(self)

    @property
    def connected(self) -> bool:
        return self.events.connected

    def status(self) -> ComponentStatus:
        return self.events.status()


#: the name AgentService still imports; the same class
ARIPlaceholderService = ARIService
