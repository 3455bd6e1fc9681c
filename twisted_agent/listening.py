"""Binding listeners synchronously at start-up, so a port in use stops the service with one clear line."""

from __future__ import annotations

import errno

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure


class ListenFailed(Exception):
    """A listener could not be bound; the text names the settings to change."""


def tcp_endpoint(port: int, host: str) -> str:
    """A ``serverFromString`` description; IPv6 colons must be escaped there."""
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def listen_now(endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str, settings: str) -> IListeningPort:
    """``endpoint.listen(factory)`` for endpoints that bind at once (TCP, UNIX), raising on failure."""
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise ListenFailed(f"cannot listen for {what}: the endpoint did not bind synchronously")
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(CannotListenError):
            error = result.value
            assert isinstance(error, CannotListenError)
            raise ListenFailed(f"cannot listen for {what} ({settings}): {explain(error)}")
        result.raiseException()
    assert not isinstance(result, Failure)
    return result


def explain(error: CannotListenError) -> str:
    socket_error = error.socketError
    code = getattr(socket_error, "errno", None)
    text = getattr(socket_error, "strerror", None) or str(socket_error)
    where = f"{error.interface or '*'}:{error.port}"
    if code == errno.EADDRINUSE:
        return f"{where}: {text} (another process holds the port: `ss -lntup | grep :{error.port}`)"
    if code == errno.EACCES:
        return f"{where}: {text} (ports below 1024 need privileges; pick a higher port)"
    if code == errno.EADDRNOTAVAIL:
        return f"{where}: {text} (no interface of this machine has that address)"
    return f"{where}: {text}"


def stop_listening(port: IListeningPort | None) -> Deferred[None]:
    """Close a listener, if any; fires when the port is released."""
    result = port.stopListening() if port is not None else None
    return result if isinstance(result, Deferred) else succeed(None)


def address(port: IListeningPort) -> tuple[str, int]:
    """(host, port) a TCP or UDP listener is bound to."""
    host = port.getHost()
    assert isinstance(host, (IPv4Address, IPv6Address)), host
    return host.host, host.port
