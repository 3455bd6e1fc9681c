"""What every reconnecting client (a ``ClientService`` with a ``prepareConnection`` handshake) needs.

Why this exists: ``ClientService`` wraps each protocol so that its ``connectionLost`` notifies the
service's state machine, which expects that notification only for a connection that
``prepareConnection`` accepted. A connection that ends while the handshake is still running (AUTH
and SELECT for Redis, the WebSocket upgrade for ARI) arrives in the ``Connecting`` state, where
the machine has no such transition: it raises ``automat.NoTransition`` and the service stops
reconnecting. That connection is a failed attempt, which the failed prepare Deferred already
reports; so :class:`GuardedEndpoint` puts a :class:`PreparedGuard` between the transport and
ClientService's wrapper, and until the handshake succeeds a lost connection goes to the protocol
alone (its ``lost_unprepared``).

ClientService also logs every scheduled retry at info; the clients log an outage once themselves,
so :class:`QuietClientService` logs ClientService's own messages at debug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer


class Preparable(Protocol):
    """A protocol that says whether its connection's handshake (``prepareConnection``) succeeded."""

    @property
    def prepared(self) -> bool:
        """True once the handshake succeeded: from then on a lost connection is ClientService's news."""

    def lost_unprepared(self, reason: Failure) -> None:
        """The connection ended during the handshake (called instead of ``connectionLost``)."""

    def makeConnection(self, transport: ITransport) -> None: ...

    def dataReceived(self, data: bytes) -> None: ...

    def connectionLost(self, reason: Failure = connectionDone) -> None: ...


@implementer(IProtocol)
class PreparedGuard:
    """Stands between the transport and ClientService's protocol wrapper (see the module docstring)."""

    def __init__(self, wrapped: Preparable) -> None:
        self.wrapped = wrapped

    def makeConnection(self, transport: ITransport) -> None:
        self.wrapped.makeConnection(transport)

    def connectionMade(self) -> None:
        """Part of IProtocol; makeConnection already told the wrapped protocol."""

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.wrapped.prepared:
            self.wrapped.connectionLost(reason)
        else:
            self.wrapped.lost_unprepared(reason)


@implementer(IProtocolFactory)
class _GuardFactory:
    def __init__(self, wrapped: IProtocolFactory) -> None:
        self._wrapped = wrapped

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        built = self._wrapped.buildProtocol(addr)
        # GuardedEndpoint is only given factories of Preparable protocols
        return None if built is None else PreparedGuard(cast(Preparable, built))

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """Connects through ``inner``, guarding each connection; reports failed connection attempts to
    ``failed`` (ClientService itself only logs them).

    The factory given to ``connect`` must build :class:`Preparable` protocols.
    """

    def __init__(self, inner: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self._inner = inner
        self._failed = failed

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def unguard(guard: Any) -> Any:
            return guard.wrapped

        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        return self._inner.connect(_GuardFactory(protocolFactory)).addCallbacks(unguard, failed)


@implementer(ILogObserver)
class AsDebug:
    """Passes events on to the global log publisher at debug level."""

    def __call__(self, event: LogEvent) -> None:
        globalLogPublisher({**event, "log_level": LogLevel.debug})


class QuietClientService(ClientService):
    """A ClientService whose own messages (every scheduled retry, at info) are logged at debug: its
    users log an outage once, with what to fix, instead."""

    _log = Logger(observer=AsDebug())
