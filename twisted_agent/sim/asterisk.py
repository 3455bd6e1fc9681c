"""``AsteriskSimulator``: a faithful stand-in for Asterisk 22.10.1 as an ARI application sees it.

One TCP port serves ARI REST under ``/ari`` and the events WebSocket at ``/ari/events`` (clients
derive the WebSocket URL from ``ARI_URL``). Calls come from :meth:`AsteriskSimulator.originate`,
which gives back the :class:`~twisted_agent.sim.caller.SimulatedCaller` a test talks and
listens through. Behaviour follows ``../shared/reference/PROTOCOLS.md`` §1 and the measurements
of §6; where the simulator departs from Asterisk on purpose, the module that does it says so.
"""

from __future__ import annotations

import random
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twisted_agent.sim.caller import IDLE_MODES, SimulatedCaller
from twisted_agent.sim.control import Timers
from twisted_agent.sim.core import Pbx
from twisted_agent.sim.events import EventHub, events_factory, parse_apps
from twisted_agent.sim.model import AriError, Ids
from twisted_agent.sim.rest import AriResource, Credentials
from twisted_agent.sim.routes import ROUTES, AriRoutes

__all__ = ["AsteriskSimulator"]


class _JsonNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return AriResource.write_error(request, AriError(404, "Not found"))


class _Root(Resource):
    def __init__(self, ari: Resource) -> None:
        super().__init__()
        self._ari = ari

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._ari if path == b"ari" else _JsonNotFound()


class _TrackingSite(Site):
    """A Site that remembers its connections, so ``stop()`` can close the ones clients keep alive."""

    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: set[Any] = set()

    def log(self, request: Any) -> None:
        """No access log: ``requests`` records every request, and the demo's log stays readable."""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.connections.add(protocol)
            lost = protocol.connectionLost

            def forget(reason: Any) -> None:
                self.connections.discard(protocol)
                lost(reason)

            protocol.connectionLost = forget
        return protocol


class AsteriskSimulator:
    """ARI over HTTP and WebSocket, RTP and AudioSocket media, and simulated callers, on loopback."""

    log = Logger()

    def __init__(self, reactor: Any, *, username: str = "ai-agent", password: str = "secret",
                 media_root: str | None = None, rng: random.Random | None = None, host: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.host = host
        self.rng = rng if rng is not None else random.Random()
        self.timers = Timers(reactor)
        self.ids = Ids(self.rng)
        self.hub = EventHub(self.timers, self.ids.entity_id)
        self.pbx = Pbx(reactor, self.timers, self.rng, self.ids, self.hub, host=host, media_root=media_root)
        #: every REST request received: (method, path, query and body parameters)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self._credentials = Credentials(username, password)
        self._refuse_events = False
        self._ws = WebSocketResource(events_factory(self.hub))
        self._ari = AriResource(AriRoutes(self.pbx, self.hub, reactor.seconds()), ROUTES, self._credentials,
                                self._events, self.requests)
        self._site = _TrackingSite(_Root(self._ari))
        self._site.displayTracebacks = False
        self._port: IListeningPort | None = None
        self.ari_url = ""

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``host:0``; :attr:`ari_url` is ``http://HOST:PORT/ari`` afterwards."""
        self._port = self.reactor.listenTCP(0, self._site, interface=self.host)
        port = self._port.getHost().port  # type: ignore[union-attr]
        self.ari_url = f"http://{self.host}:{port}/ari"
        self.log.info("simulated Asterisk listening at {url}", url=self.ari_url)

    async def stop(self) -> None:
        """Close every socket and cancel every timer."""
        if self._port is not None:
            port, self._port = self._port, None
            await maybeDeferred(port.stopListening)
        closing = self.pbx.close()
        self.timers.cancel_all()
        for released in closing:
            await released
        await self.hub.drop_all()
        connections = list(self._site.connections)
        for protocol in connections:
            abort = getattr(getattr(protocol, "transport", None), "abortConnection", None)
            if abort is not None:
                abort()
        if connections:
            # one reactor turn, so the aborted connections report connectionLost before we return
            await deferLater(self.reactor, 0, lambda: None)

    # -- calls ---------------------------------------------------------------------------------------

    def originate(self, app: str, *, caller_number: str = "+15551230000", caller_name: str = "Sim Caller",
                  variables: dict[str, str] | None = None, idle: str = "silent",
                  args: tuple[str, ...] = ()) -> SimulatedCaller:
        """A call arrives and the dialplan runs ``Stasis(app[,args])``.

        The caller's PJSIP channel is in state ``Ring`` with ``variables`` set; the app's WebSocket
        gets ``StasisStart``. If no WebSocket owns ``app``, Stasis fails and the call continues in
        the dialplan at once (``caller.dialplan_continued``; ``caller.ended`` fires).
        """
        if idle not in IDLE_MODES:
            raise ValueError(f"idle must be one of {IDLE_MODES}, got {idle!r}")
        return self.pbx.new_caller(app, number=caller_number, name=caller_name, variables=dict(variables or {}),
                                   args=tuple(args), idle=idle)

    @property
    def callers(self) -> list[SimulatedCaller]:
        return list(self.pbx.callers)

    def live_channels(self) -> list[dict[str, Any]]:
        """What ``GET /channels`` returns."""
        return [channel.to_json() for channel in self.pbx.channels.values()]

    def live_bridges(self) -> list[dict[str, Any]]:
        """What ``GET /bridges`` returns."""
        return [bridge.to_json() for bridge in self.pbx.bridges.values()]

    def events_sent(self) -> list[dict[str, Any]]:
        """Every event sent to an events WebSocket, in order."""
        return list(self.hub.sent)

    # -- the events WebSocket ----------------------------------------------------------------------------

    async def drop_event_connections(self) -> None:
        """Abruptly close every events WebSocket (no close handshake), as a crash or network cut would."""
        await self.hub.drop_all()

    def refuse_event_connections(self, refuse: bool) -> None:
        """While ``refuse`` is true, new events WebSocket upgrades are answered 503."""
        self._refuse_events = refuse

    def _events(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return AriResource.write_error(request, AriError(405, "Invalid method", "Method Not Allowed"))
        if not self._ari.authorized(request):
            return AriResource.write_error(request, AriError(401, "Authentication required", "Unauthorized"))
        apps = parse_apps([value.decode("utf-8", "replace") for value in request.args.get(b"app", [])])
        if not apps:
            return AriResource.write_error(request, AriError(400, "HTTP request is missing param: [app]"))
        if self._refuse_events:
            return AriResource.write_error(request, AriError(503, "Service Unavailable"))
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            return AriResource.write_error(request, AriError(426, "Upgrade Required", "Upgrade Required"))
        return self._ws.render(request)
