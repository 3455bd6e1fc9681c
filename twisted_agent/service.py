"""The engine as one ``MultiService``: what ``twistd ai-agent`` runs.

Shutdown is graceful: stopping (SIGTERM under twistd or systemd) first drains the engine (/ready
turns 503, new calls go back to the dialplan, active calls get ``DRAIN_TIMEOUT`` seconds to end),
and only then are the listeners and connections closed. The web site keeps answering while the
engine drains, so an operator can watch the calls go.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_agent import __version__
from twisted_agent.ari.service import ARIService
from twisted_agent.calls.engine import CallEngine
from twisted_agent.calls.registry import CallRegistry
from twisted_agent.config import AgentConfig
from twisted_agent.health import EngineHealth
from twisted_agent.listening import ListenFailed
from twisted_agent.media.service import MediaService
from twisted_agent.media.vad import VADUnavailable
from twisted_agent.metrics import EngineMetrics
from twisted_agent.providers.readiness import ProviderCatalog
from twisted_agent.store.service import StoreService, make_store
from twisted_agent.web.admin import AdminApp
from twisted_agent.web.app import AgentWebApp
from twisted_agent.web.service import WebService


class StartupError(Exception):
    """The engine cannot start; the text is the one line to show the operator."""


class AgentService(MultiService):
    log = Logger()

    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.registry = CallRegistry(reactor, max_calls=config.calls.max_calls)
        from twisted_agent.providers.deepgram import DeepgramFactory
        from twisted_agent.providers.local.pipeline import make_local_factory
        from twisted_agent.providers.openai_realtime import RealtimeFactory

        self.providers = ProviderCatalog(config, {
            "local": make_local_factory(reactor, config),
            "deepgram": DeepgramFactory(reactor, config),
            "openai_realtime": RealtimeFactory(reactor, config),
        }, clock=reactor)
        self.store = make_store(reactor, config.store)
        # first child: stopped last, after the drain's call records are handed to it
        store_service = StoreService(self.store)
        store_service.setName("store")
        store_service.setServiceParent(self)

        self.ari = ARIService(config.ari, reactor)
        self.ari.setName("ari")
        self.ari.setServiceParent(self)

        self.media = MediaService(reactor, config.media)
        self.media.setName("media")
        self.media.setServiceParent(self)

        self.engine = CallEngine(reactor, config, self.ari, self.media, self.registry, self.providers, self.store)
        self.engine.setName("calls")
        self.engine.setServiceParent(self)

        self.health = EngineHealth(config, reactor, self.ari, self.media, self.registry, self.providers,
                                   [self.store], store=self.store)
        self.metrics = EngineMetrics(self)
        self.admin = AdminApp(config, self.store, self.engine, reactor)
        self.web_app = AgentWebApp(self.health, self.metrics, self.admin)
        self.web = WebService(reactor, config.web, self.web_app.resource())
        self.web.setName("web")
        self.web.setServiceParent(self)
        self._stopping: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        bound = []
        try:
            for child in self:
                child.privilegedStartService()
                bound.append(child)
        except (ListenFailed, VADUnavailable) as e:
            for child in reversed(bound):
                child.stopService()
            raise StartupError(str(e)) from None

    def startService(self) -> None:
        super().startService()
        media = self.config.media
        self.log.info(
            "twisted-agent {version} started: ARI {ari_url} app {app}, transport {transport}, "
            "media to {advertise}, replies by {mode}",
            version=__version__, ari_url=self.config.ari.url, app=self.config.ari.app,
            transport=media.transport, advertise=media.advertise_host, mode=media.downstream_mode)

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        timeout = self.config.calls.drain_timeout
        self.log.info("shutting down: draining ({count} active call(s), up to {timeout}s)",
                      count=len(self.registry), timeout=timeout)
        await self.registry.drain(timeout)
        await MultiService.stopService(self)
        self.log.info("stopped")
