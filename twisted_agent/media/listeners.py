"""The media listeners Asterisk must reach: RTP over UDP (ExternalMedia) or AudioSocket over TCP.

Only the listener of the configured transport is bound: nothing listens beyond localhost that
Asterisk does not need. Until the media plane lands, what arrives is counted and dropped, and the
status says so.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorUDP
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import MediaConfig
from twisted_agent.listening import ListenFailed, address, explain, listen_now, stop_listening, tcp_endpoint
from twisted_agent.status import ComponentStatus, IStatusSource

#: larger than any RTP packet Asterisk sends (a 20 ms slin16 frame is 652 bytes), so nothing is truncated
MAX_DATAGRAM = 8192


class UnhandledRTP(DatagramProtocol):
    """Counts datagrams until the RTP endpoint replaces it."""

    noisy = False

    def __init__(self) -> None:
        self.packets = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.packets += 1


class UnhandledAudioSocket(Protocol):
    """Closes AudioSocket connections: with no media plane, Asterisk should hang up at once."""

    def connectionMade(self) -> None:
        assert isinstance(self.factory, AudioSocketCounter)
        self.factory.connections += 1
        assert self.transport is not None
        self.transport.loseConnection()


class AudioSocketCounter(Factory):
    noisy = False
    protocol = UnhandledAudioSocket

    def __init__(self) -> None:
        self.connections = 0


@implementer(IStatusSource)
class MediaListenerService(Service):
    component = "media"
    log = Logger()

    def __init__(self, reactor: Any, config: MediaConfig) -> None:
        self._reactor = reactor
        self.config = config
        self.rtp_port: IListeningPort | None = None
        self.audiosocket_port: IListeningPort | None = None
        self.rtp = UnhandledRTP()
        self.audiosocket = AudioSocketCounter()

    @property
    def rtp_running(self) -> bool:
        return self.rtp_port is not None

    @property
    def audiosocket_running(self) -> bool:
        return self.audiosocket_port is not None

    def privilegedStartService(self) -> None:
        # Bound here, synchronously, so a port in use stops start-up with a clear message.
        config = self.config
        if config.transport == "externalmedia":
            udp: IReactorUDP = self._reactor
            try:
                self.rtp_port = udp.listenUDP(config.rtp_port, self.rtp, interface=config.rtp_host,
                                              maxPacketSize=MAX_DATAGRAM)
            except CannotListenError as e:
                raise ListenFailed(f"cannot listen for RTP on udp (RTP_HOST/RTP_PORT): {explain(e)}") from None
            host, port = address(self.rtp_port)
            self.log.info("RTP listener on udp {host}:{port}", host=host, port=port)
        else:
            endpoint = serverFromString(self._reactor, tcp_endpoint(config.audiosocket_port, config.audiosocket_host))
            self.audiosocket_port = listen_now(endpoint, self.audiosocket, "AudioSocket on tcp",
                                               "AUDIOSOCKET_HOST/AUDIOSOCKET_PORT")
            host, port = address(self.audiosocket_port)
            self.log.info("AudioSocket listener on tcp {host}:{port}", host=host, port=port)
        Service.privilegedStartService(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port = self.rtp_port or self.audiosocket_port
        self.rtp_port = self.audiosocket_port = None
        return stop_listening(port)

    def bound_address(self) -> tuple[str, int] | None:
        port = self.rtp_port or self.audiosocket_port
        return address(port) if port is not None else None

    def status(self) -> ComponentStatus:
        bound = self.bound_address()
        if bound is None:
            return ComponentStatus("stopped", False, "media listener not bound", implemented=False)
        kind = "udp RTP" if self.rtp_port else "tcp AudioSocket"
        return ComponentStatus(
            "listening", True,
            f"{kind} on {bound[0]}:{bound[1]}; audio is counted and dropped until the media plane is built "
            f"({self.rtp.packets} packets, {self.audiosocket.connections} connections so far)",
            implemented=False)
