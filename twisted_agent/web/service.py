"""The web site's listener (localhost by default)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from twisted_agent.config import WebConfig
from twisted_agent.listening import address, listen_now, stop_listening, tcp_endpoint


class QuietSite(Site):
    """A site that does not log probe requests: /health every few seconds would bury real events."""

    noisy = False
    quiet_paths = (b"/health", b"/live", b"/ready", b"/metrics")

    def log(self, request: Any) -> None:
        if request.path in self.quiet_paths and request.code < 400:
            return
        super().log(request)


class WebService(Service):
    log = Logger()

    def __init__(self, reactor: Any, config: WebConfig, resource: Any) -> None:
        self._reactor = reactor
        self.config = config
        self.site = QuietSite(resource)
        self.site.displayTracebacks = False
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        endpoint = serverFromString(self._reactor, tcp_endpoint(self.config.port, self.config.host))
        self.port = listen_now(endpoint, self.site, "the web site on tcp", "HEALTH_HOST/HEALTH_PORT")
        host, port = address(self.port)
        self.log.info("web site on http://{host}:{port}/health", host=host, port=port)
        Service.privilegedStartService(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        return stop_listening(port)
