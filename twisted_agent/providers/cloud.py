"""One call's WebSocket to a cloud voice agent (Deepgram Voice Agent, OpenAI Realtime).

Not a reconnecting client: a cloud agent's conversation lives in its connection, so a dropped
connection cannot be resumed; it ends the provider's part of the call (the engine apologises and
hands the caller back). :func:`connect` opens the socket, bounded in time and cancellable, and
hands every frame to a :class:`ICloudListener`, a plain object that holds the protocol logic.
"""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import Interface

from twisted_agent.providers.base import ProviderError


class ICloudListener(Interface):
    """What a cloud provider's logic gets from its socket; called on the reactor thread."""

    def message(body: dict[str, Any]) -> None:
        """A JSON text frame (every text frame of these APIs is a JSON object with a ``type``)."""

    def audio(data: bytes) -> None:
        """A binary frame."""

    def lost(reason: str) -> None:
        """The connection ended without :meth:`CloudSocket.close` having been called."""


class CloudSocket(WebSocketClientProtocol):
    """Thin: frames to the listener; ``send_json``/``send_audio``/``close`` for the logic."""

    factory: _CloudFactory
    log = Logger()

    def onOpen(self) -> None:
        self.factory.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        listener = self.factory.listener
        if isBinary:
            listener.audio(payload)
            return
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self.log.warn("{service}: ignoring a frame that is not JSON ({error}): {frame!r}",
                          service=self.factory.service, error=str(e), frame=payload[:200])
            return
        if not isinstance(body, dict):
            self.log.warn("{service}: ignoring a JSON frame that is not an object: {frame!r}",
                          service=self.factory.service, frame=payload[:200])
            return
        listener.message(body)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(self, wasClean, code, reason)

    def send_json(self, body: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(body, separators=(",", ":")).encode("utf-8"), isBinary=False)

    def send_audio(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def close(self) -> None:
        self.factory.closing = True
        self.sendClose(1000)


class _CloudFactory(WebSocketClientFactory):
    protocol = CloudSocket  # type: ignore[assignment]
    noisy = False  # no "Starting factory" per call at info: the call's own events say what happened

    def __init__(self, service: str, url: str, headers: dict[str, str], listener: Any) -> None:
        super().__init__(url, headers=headers)
        self.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=2, autoPingInterval=10,
                                autoPingTimeout=10)
        self.service = service
        self.listener = listener
        self.opening: Deferred[CloudSocket] = Deferred()
        self.closing = False
        self.socket: CloudSocket | None = None

    def opened(self, socket: CloudSocket) -> None:
        self.socket = socket
        if not self.opening.called:
            self.opening.callback(socket)

    def closed(self, socket: CloudSocket, clean: bool, code: int | None, reason: str | None) -> None:
        why = reason or (f"WebSocket close code {code}" if code else "the connection was lost")
        if not self.opening.called:
            # refused during the upgrade: autobahn gives the HTTP status in the reason (401: bad key)
            self.opening.errback(ProviderError(f"{self.service} refused the connection: {why}"))
            return
        if not self.closing:
            self.listener.lost(f"{self.service} closed the connection: {why}" if clean
                               else f"the connection to {self.service} was lost: {why}")


def cloud_endpoint(reactor: Any, url: str, timeout: float) -> IStreamClientEndpoint:
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, parts.port or (443 if secure else 80),
                                                       timeout=timeout)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


def connect(reactor: IReactorTime, service: str, url: str, headers: dict[str, str], listener: Any,
            timeout: float, endpoint: IStreamClientEndpoint | None = None) -> Deferred[CloudSocket]:
    """Open the WebSocket; fires with the socket once the upgrade succeeded, or fails with a
    :class:`ProviderError` that says why (refused, unreachable, no answer within ``timeout``).
    Cancelling abandons the attempt."""
    return Deferred.fromCoroutine(_connect(reactor, service, url, headers, listener, timeout, endpoint))


async def _connect(reactor: Any, service: str, url: str, headers: dict[str, str], listener: Any, timeout: float,
                   endpoint: IStreamClientEndpoint | None) -> CloudSocket:
    factory = _CloudFactory(service, url, headers, listener)
    deadline = reactor.seconds() + timeout
    try:
        # the endpoint's own timeout bounds the TCP (and TLS) connection
        socket = cast(CloudSocket, await (endpoint or cloud_endpoint(reactor, url, timeout)).connect(factory))
    except CancelledError:
        raise
    except Exception as e:
        raise ProviderError(f"cannot reach {service} at {_where(url)}: {e}") from None
    opening = factory.opening
    opening.addTimeout(max(0.0, deadline - reactor.seconds()), reactor)
    try:
        return await opening
    except BaseException as e:
        factory.closing = True
        socket.dropConnection(abort=True)
        if isinstance(e, TimeoutError):
            raise ProviderError(f"{service} did not answer within {timeout:g}s ({_where(url)})") from None
        raise


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class ContinuousAudio:
    """Keeps the caller's audio to a cloud agent continuous, filling gaps with silence.

    Asterisk forwards nothing while a Local channel's caller is quiet (PROTOCOLS §6), and a phone
    may use silence suppression; but a cloud agent finds the end of the caller's turn in the audio
    it receives (Deepgram's endpointing, OpenAI's server VAD count silence in audio time). Without
    audio the turn would never end and the caller would wait in silence. So when no frame came for
    ``gap`` seconds, the silence that should have come is sent, a check every ``gap`` seconds.
    """

    def __init__(self, clock: IReactorTime, send: Any, frame_bytes: int = 320, frame_seconds: float = 0.02,
                 gap: float = 0.1) -> None:
        self._clock = clock
        self._send = send
        self._silence = b"\x00" * frame_bytes
        self._frame_seconds = frame_seconds
        self._gap = gap
        #: the time up to which the far end has been sent audio
        self._until = 0.0
        self._timer: Any = None
        self.filled_frames = 0

    def start(self) -> None:
        self._until = self._clock.seconds()
        self._schedule()

    def _schedule(self) -> None:
        self._timer = self._clock.callLater(self._gap, self._check)

    def push(self, frame: bytes) -> None:
        now = self._clock.seconds()
        if self._timer is not None:
            self._fill(now - self._frame_seconds)
        self._until = max(self._until, now - self._frame_seconds) + self._frame_seconds
        self._send(frame)

    def _check(self) -> None:
        self._fill(self._clock.seconds())
        self._schedule()

    def _fill(self, up_to: float) -> None:
        missing = int((up_to - self._until) / self._frame_seconds)
        if missing < 2:  # a late frame or two is jitter, not a gap
            return
        for _ in range(missing):
            self._send(self._silence)
        self.filled_frames += missing
        self._until += missing * self._frame_seconds

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
