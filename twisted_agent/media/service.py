"""The media plane as a service: the listener Asterisk reaches, the shared pacer, and the factory
of per-call media sessions the call engine uses.

Only the configured transport's listener is bound, so nothing listens beyond what Asterisk needs.
"""

from __future__ import annotations

import socket
import uuid
from collections import Counter
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorUDP
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import MediaConfig
from twisted_agent.listening import ListenFailed, address, explain, listen_now, stop_listening, tcp_endpoint
from twisted_agent.media.audiosocket import AudioSocketFactory, AudioSocketSession
from twisted_agent.media.interfaces import IMediaSession
from twisted_agent.media.pacer import LatenessHistogram, Pacer
from twisted_agent.media.rtp_endpoint import RTPEndpoint, RTPRouter, RTPSession
from twisted_agent.media.session import MediaSession
from twisted_agent.media.vad import FrameVAD, SileroPool, SpeechDetector, new_silero_model
from twisted_agent.status import ComponentStatus, IStatusSource

#: larger than any RTP packet Asterisk sends (a 20 ms slin16 frame is 652 bytes): nothing is truncated
MAX_DATAGRAM = 8192
AUDIOSOCKET_RATES = {"slin": 8000, "slin16": 16000}
#: Silero models kept ready: building one blocks for ~35 ms, too long for the reactor thread
SILERO_SPARE = 4
#: ask the kernel for this much receive buffer on the RTP socket: at 500 calls a 20 ms stall of
#: the reactor queues 500 datagrams, more than the usual 208 KiB default holds
RTP_RECEIVE_BUFFER = 4 * 1024 * 1024


@implementer(IStatusSource)
class MediaService(Service):
    component = "media"
    log = Logger()

    def __init__(self, reactor: Any, config: MediaConfig) -> None:
        self._reactor = reactor
        self.config = config
        self.pacer = Pacer(reactor)
        self.rtp = RTPEndpoint(lambda send: RTPRouter(reactor, send, allowed=config.rtp_allowed_hosts))
        self.audiosocket = AudioSocketFactory(reactor)
        self.rtp_port: IListeningPort | None = None
        self.audiosocket_port: IListeningPort | None = None
        self.sessions: dict[str, MediaSession] = {}
        self.silero = SileroPool() if config.vad_silero else None
        self._refilling = False
        self._closed_lateness = LatenessHistogram()
        #: per-session counters (TOTALLED) of the sessions already closed
        self._closed_totals: Counter[str] = Counter()
        self.sessions_created = 0

    @property
    def rtp_running(self) -> bool:
        return self.rtp_port is not None

    @property
    def audiosocket_running(self) -> bool:
        return self.audiosocket_port is not None

    # --- sessions ---------------------------------------------------------------------------

    def _detector(self, on_start: Any, on_end: Any) -> SpeechDetector:
        config = self.config
        silero: Any = False
        if self.silero is not None:
            silero = self.silero.acquire()
            self._refill_silero()
        return SpeechDetector(FrameVAD(mode=config.vad_mode, silero=silero), on_start=on_start,
                              on_end=on_end, start_ms=config.vad_start_ms, end_ms=config.vad_end_ms)

    def _refill_silero(self) -> None:
        pool = self.silero
        if pool is None or self._refilling or len(pool) >= SILERO_SPARE // 2:
            return
        from twisted.internet.threads import deferToThreadPool

        self._refilling = True
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), new_silero_model)
        d.addCallback(pool.release)
        d.addErrback(lambda f: self.log.failure("could not build a Silero model", f))

        def done(_: object) -> None:
            self._refilling = False

        d.addBoth(done)

    def create_session(self, call_id: str, *, codec: str | None = None,
                       session_uuid: uuid.UUID | None = None) -> IMediaSession:
        """Register a call's media before its peer is known.

        RTP: bind the peer later with ``session.bind_peer(host, port)`` from the externalMedia
        response. AudioSocket: pass the UUID given to Asterisk as externalMedia ``data``; the
        connection that names it binds the session.
        """
        if call_id in self.sessions:
            raise ValueError(f"call {call_id} already has a media session")
        session: MediaSession
        if self.config.transport == "externalmedia":
            router = self.rtp.router
            session = RTPSession(call_id, router, self.pacer, self._detector, codec=codec or self.config.codec,
                                 reorder_depth=self.config.rtp_reorder_frames)
            router.register(session)
        else:
            session = AudioSocketSession(call_id, session_uuid or uuid.uuid4(), self.pacer, self._detector,
                                         self.audiosocket, rate=AUDIOSOCKET_RATES[self.config.audiosocket_format])
            self.audiosocket.register(session)
        self.sessions[call_id] = session
        self.sessions_created += 1
        session.on_close = self._session_closed
        return session

    def _session_closed(self, session: MediaSession) -> None:
        if self.sessions.get(session.call_id) is session:
            del self.sessions[session.call_id]
        self._closed_lateness.merge(session.lateness)
        self._closed_totals.update(_session_counts(session))
        model = getattr(getattr(session.detector, "vad", None), "silero", None)
        if self.silero is not None and model is not None:
            self.silero.release(model)

    # --- lifecycle ------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Bound here, synchronously, so a port in use stops start-up with a clear message.
        config = self.config
        if self.silero is not None:
            self.silero.prewarm(SILERO_SPARE)  # before the reactor runs, so it blocks nobody
        if config.transport == "externalmedia":
            udp: IReactorUDP = self._reactor
            try:
                self.rtp_port = udp.listenUDP(config.rtp_port, self.rtp, interface=config.rtp_host,
                                              maxPacketSize=MAX_DATAGRAM)
            except CannotListenError as e:
                raise ListenFailed(f"cannot listen for RTP on udp (RTP_HOST/RTP_PORT): {explain(e)}") from None
            host, port = address(self.rtp_port)
            self.log.info("RTP listener on udp {host}:{port} (receive buffer {buffer} KiB)", host=host, port=port,
                          buffer=self._grow_receive_buffer() // 1024)
        else:
            endpoint = serverFromString(self._reactor, tcp_endpoint(config.audiosocket_port, config.audiosocket_host))
            self.audiosocket_port = listen_now(endpoint, self.audiosocket, "AudioSocket on tcp",
                                               "AUDIOSOCKET_HOST/AUDIOSOCKET_PORT")
            host, port = address(self.audiosocket_port)
            self.log.info("AudioSocket listener on tcp {host}:{port}", host=host, port=port)
        Service.privilegedStartService(self)

    def _grow_receive_buffer(self) -> int:
        sock = getattr(self.rtp_port, "socket", None)
        if sock is None:
            return 0
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RTP_RECEIVE_BUFFER)
        except OSError:
            pass  # the kernel's limit (net.core.rmem_max) applies; we keep what we got
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def startService(self) -> None:
        Service.startService(self)
        self.pacer.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        for session in list(self.sessions.values()):
            session.close()
        self.pacer.stop()
        port = self.rtp_port or self.audiosocket_port
        self.rtp_port = self.audiosocket_port = None
        return stop_listening(port)

    def bound_address(self) -> tuple[str, int] | None:
        port = self.rtp_port or self.audiosocket_port
        return address(port) if port is not None else None

    def lateness(self) -> LatenessHistogram:
        total = LatenessHistogram()
        total.merge(self._closed_lateness)
        for session in self.sessions.values():
            total.merge(session.lateness)
        return total

    def totals(self) -> dict[str, int]:
        """Media counters since start, over every call (closed and live) and the shared listener:
        frames in/out, RTP packets in/out/lost/malformed, packets matching no call (``foreign``:
        unknown peer, not allowed, or another SSRC on a call's port)."""
        totals = Counter(self._closed_totals)
        for session in self.sessions.values():
            totals.update(_session_counts(session))
        router = self.rtp.router
        totals["foreign"] += router.foreign + router.disallowed
        return {key: totals[key] for key in TOTALLED}

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "sessions_created": self.sessions_created,
            "rtp": self.rtp.router.stats(),
            "audiosocket": self.audiosocket.stats(),
            "pacer": {"ticks": self.pacer.ticks, "skipped": self.pacer.skipped, "clients": len(self.pacer)},
            "send_lateness": self.lateness().summary(),
        }

    def status(self) -> ComponentStatus:
        bound = self.bound_address()
        if bound is None:
            return ComponentStatus("stopped", False, "media listener not bound")
        kind = "udp RTP" if self.rtp_port else "tcp AudioSocket"
        router = self.rtp.router
        detail = f"{kind} on {bound[0]}:{bound[1]}; {len(self.sessions)} session(s)"
        if router.foreign or router.disallowed:
            detail += f"; {router.foreign + router.disallowed} RTP packet(s) matched no call"
        return ComponentStatus("listening", True, detail)


TOTALLED = ("frames_in", "frames_out", "packets_in", "packets_out", "lost", "malformed", "foreign")


def _session_counts(session: MediaSession) -> dict[str, int]:
    stats = session.stats()
    # a packet from another SSRC on a call's own port is foreign too
    stats["foreign"] = stats.get("foreign_ssrc")
    return {key: int(stats.get(key) or 0) for key in TOTALLED}
