"""AudioSocket over TCP: Asterisk connects to us, says which call with a UUID, then streams slin.

The engine registers a session under the UUID it passes as externalMedia ``data`` before asking
Asterisk for the channel; Asterisk connects during that request and the first frame names the
UUID, which binds the connection to the session. Audio is signed 16-bit little-endian at the
rate of the frame kind (slin 8 kHz by default). μ-law over AudioSocket is broken on Asterisk's side
(PROTOCOLS.md §6), so only slin kinds are used.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.media import audiosocket_framing as framing
from twisted_agent.media.pacer import Pacer
from twisted_agent.media.session import MediaSession, VADFactory

#: a connection that has not named its call within this many seconds is closed
UUID_TIMEOUT = 5.0
#: unsent bytes the transport may hold (beyond the kernel's send buffer) before it pauses us: ~0.2 s
#: of slin16, 0.4 s of slin
SEND_BUFFER_BYTES = 6400
#: the kernel's send buffer for an AudioSocket connection (Linux doubles it): about a second of slin
KERNEL_SEND_BUFFER_BYTES = 8192


class AudioSocketSession(MediaSession):
    transport = "audiosocket"

    def __init__(self, call_id: str, session_uuid: uuid.UUID, pacer: Pacer, detector_factory: VADFactory,
                 factory: AudioSocketFactory, rate: int = 8000) -> None:
        super().__init__(call_id, pacer, detector_factory, leg_rate=rate)
        self.uuid = session_uuid
        self._factory = factory
        self._kind = framing.AUDIO_KINDS[rate]
        self.connection: AudioSocketProtocol | None = None
        self.frames_in_bytes = 0
        self.bytes_out = 0
        self.dtmf = 0
        self.hangup_reason = ""

    def bind_peer(self, host: str, port: int) -> None:
        """Asterisk connects to us and names this session's UUID: there is no peer to set."""

    def attach(self, connection: AudioSocketProtocol) -> None:
        self.connection = connection
        self.bound = True

    def frame_received(self, kind: int, payload: bytes, now: float) -> None:
        if kind in framing.AUDIO_RATES:
            self.frames_in_bytes += len(payload)
            self._deliver_pcm(payload, framing.AUDIO_RATES[kind], now)
        elif kind == framing.DTMF:
            self.dtmf += 1
            self._notify("dtmf_received", framing.parse_dtmf(payload))

    def detached(self, reason: str) -> None:
        """The far side hung up or the connection dropped."""
        self.connection = None
        self.bound = False
        self.hangup_reason = reason
        if not self.closed:
            self._notify("media_closed", reason)

    def _send_frame(self, frame: bytes, marker: bool, index: int) -> bool:
        connection = self.connection
        if connection is None or connection.transport is None or connection.paused or \
                getattr(connection.transport, "disconnecting", False):
            return False  # kept: it goes when Asterisk reads again, or to a file if it never does
        data = framing.encode_frame(self._kind, frame)
        connection.transport.write(data)
        self.bytes_out += len(data)
        return True

    def _release(self) -> None:
        self._factory.unregister(self)
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.hang_up()

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        stats.update({"uuid": str(self.uuid), "bytes_in": self.frames_in_bytes, "bytes_out": self.bytes_out,
                      "dtmf": self.dtmf, "connected": self.connection is not None})
        return stats


@implementer(IPushProducer)
class AudioSocketProtocol(Protocol):
    """One TCP connection from Asterisk: decode frames, hand them to the session it names.

    It is also the producer of what it writes: when Asterisk stops reading, the kernel's send buffer
    fills, then the transport's own buffer passes ``SEND_BUFFER_BYTES`` and pauses us; the session
    holds its frames back meanwhile, and a pause longer than STREAM_STALL_MS moves the call to file
    playback (a stalled leg would otherwise queue the agent's voice for minutes). Back-pressure
    only comes once Asterisk's receive buffer is full too: on one machine Linux let it take over
    3 MB (minutes of slin) before this side saw any."""

    log = Logger()
    factory: AudioSocketFactory

    def __init__(self) -> None:
        self._decoder = framing.AudioSocketDecoder()
        self.session: AudioSocketSession | None = None
        self._timeout: Any = None
        self._closing = False
        self.paused = False
        self.pauses = 0

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self._timeout = self.factory.clock.callLater(UUID_TIMEOUT, self._no_uuid)
        transport: Any = self.transport
        transport.bufferSize = SEND_BUFFER_BYTES
        transport.registerProducer(self, True)
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            # audio is real time: a send buffer autotuned to megabytes would hide a stalled Asterisk
            # for minutes, and hold agent speech that a barge-in can no longer take back
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER_BYTES)

    # --- IPushProducer: the transport tells us when Asterisk stops (and resumes) reading ----------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def _no_uuid(self) -> None:
        self._timeout = None
        self.factory.errors += 1
        self.log.warn("AudioSocket connection from {peer} named no call within {timeout}s; closing",
                      peer=self._peer(), timeout=UUID_TIMEOUT)
        self._abort()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except framing.AudioSocketError as e:
            self.factory.errors += 1
            self.log.warn("AudioSocket protocol error from {peer}: {error}", peer=self._peer(), error=str(e))
            self._abort()
            return
        now = self.factory.clock.seconds()
        for kind, payload in frames:
            session = self.session
            if session is not None:
                if kind == framing.HANGUP:
                    self._end("hangup frame")
                    return
                if kind == framing.ERROR:
                    self.log.warn("AudioSocket error frame for call {call_id}: {payload!r}",
                                  call_id=session.call_id, payload=payload)
                    continue
                session.frame_received(kind, payload, now)
            elif kind == framing.UUID:
                if not self._bind(framing.parse_uuid(payload)):
                    return
            else:
                self.factory.errors += 1
                self.log.warn("AudioSocket from {peer} sent kind 0x{kind:02x} before its UUID; closing",
                              peer=self._peer(), kind=kind)
                self._abort()
                return

    def _bind(self, session_uuid: uuid.UUID) -> bool:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        session = self.factory.sessions.get(session_uuid)
        if session is None or session.closed or session.connection is not None:
            self.factory.unknown += 1
            self.log.warn("AudioSocket UUID {uuid} from {peer} matches no waiting call; hanging up",
                          uuid=str(session_uuid), peer=self._peer())
            self.hang_up()
            return False
        self.session = session
        session.attach(self)
        return True

    def hang_up(self) -> None:
        """End the call's media from our side: a 0x00 frame makes Asterisk hang the channel up."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.write(framing.hangup_frame())
        self._close()

    def _abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self._close()

    def _close(self) -> None:
        transport: Any = self.transport
        # a registered producer that is paused would keep the connection open after loseConnection
        if getattr(transport, "producer", None) is self:
            transport.unregisterProducer()
        transport.loseConnection()

    def _end(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.detached(reason)
        self._abort()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        session, self.session = self.session, None
        if session is not None:
            # Asterisk closes TCP on hang-up without a 0x00 frame
            session.detached("connection closed")

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        if isinstance(peer, (IPv4Address, IPv6Address)):
            return f"{peer.host}:{peer.port}"
        return "?"


class AudioSocketFactory(Factory):
    noisy = False
    protocol = AudioSocketProtocol  # type: ignore[assignment]

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.sessions: dict[uuid.UUID, AudioSocketSession] = {}
        self.connections = 0
        self.unknown = 0
        self.errors = 0

    def register(self, session: AudioSocketSession) -> None:
        if session.uuid in self.sessions:
            raise ValueError(f"AudioSocket UUID {session.uuid} is already registered")
        self.sessions[session.uuid] = session

    def unregister(self, session: AudioSocketSession) -> None:
        if self.sessions.get(session.uuid) is session:
            del self.sessions[session.uuid]

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.sessions), "connections": self.connections, "unknown_uuid": self.unknown,
                "errors": self.errors}
