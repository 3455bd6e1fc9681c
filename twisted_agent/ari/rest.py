"""ARI REST over treq: the operations the call engine uses (PROTOCOLS.md §1.5-1.7).

Each method returns a cancellable ``Deferred`` (the work is an ``async def`` inside). Parameters go
in the query string, ``variables`` in a JSON body, and every request carries HTTP Basic auth.
A request is bounded by ``ARI_REQUEST_TIMEOUT`` from sending to the last byte of the answer.
Errors are :mod:`twisted_agent.ari.errors` exceptions: an HTTP error becomes the class for its
status with Asterisk's ``message``; no answer at all is :class:`ARIUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from twisted_agent.ari.errors import (
    ARIError,
    ARINotFound,
    ARIServerError,
    ARIUnavailable,
    describe_unreachable,
    error_for_status,
    wrapped_exceptions,
)
from twisted_agent.ari.interfaces import IARIClient
from twisted_agent.config import ARIConfig
from twisted_agent.tls import ari_http_client

T = TypeVar("T")

#: ARI answers are small JSON documents; anything bigger is not Asterisk
MAX_BODY_BYTES = 8 * 1024 * 1024


def gone_ok(d: Deferred[T], *also: type[ARIError]) -> Deferred[T | None]:
    """``d``, with "not found" (and any of ``also``) turned into None: during teardown it means already gone."""
    kinds = (ARINotFound, *also)

    def gone(failure: Failure) -> None:
        failure.trap(*kinds)
        return None

    return d.addErrback(gone)


async def ignore_gone(operation: Awaitable[T], *also: type[ARIError]) -> T | None:
    """Await ``operation`` (a Deferred or coroutine); None if what it acts on is already gone."""
    kinds: tuple[type[ARIError], ...] = (ARINotFound, *also)
    try:
        return await operation
    except kinds:
        return None


def _segment(value: str) -> str:
    """One path segment: ids may hold any character (channel ids hold dots, Local channels ';')."""
    return quote(value, safe="")


@implementer(IARIClient)
class ARIClient:
    log = Logger()

    def __init__(self, reactor: Any, config: ARIConfig, http: Any = None) -> None:
        self._clock: IReactorTime = reactor
        self._config = config
        self._http = http if http is not None else ari_http_client(reactor, config)
        self._base = config.url.rstrip("/")
        self._auth = (config.username, config.password)
        parts = urlsplit(config.url)
        self._where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    # --- asterisk -------------------------------------------------------------------------------

    def get_info(self) -> Deferred[dict[str, Any]]:
        return self._object("GET", "/asterisk/info")

    # --- channels -------------------------------------------------------------------------------

    def answer(self, channel_id: str) -> Deferred[None]:
        return self._void("POST", f"/channels/{_segment(channel_id)}/answer")

    def hangup(self, channel_id: str, reason: str = "normal") -> Deferred[None]:
        return self._void("DELETE", f"/channels/{_segment(channel_id)}", {"reason": reason})

    def get_channel(self, channel_id: str) -> Deferred[dict[str, Any]]:
        return self._object("GET", f"/channels/{_segment(channel_id)}")

    def list_channels(self) -> Deferred[list[dict[str, Any]]]:
        return self._list("GET", "/channels")

    def get_variable(self, channel_id: str, variable: str) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._get_variable(channel_id, variable))

    async def _get_variable(self, channel_id: str, variable: str) -> str | None:
        path = f"/channels/{_segment(channel_id)}/variable"
        try:
            result = await self._request("GET", path, {"variable": variable})
        except ARINotFound as e:
            # 404 means "channel not found" or "variable not found" (reason "Variable Not Found",
            # message "Provided variable was not found"); only the second is an answer.
            if "variable" in f"{e.message} {e.reason}".lower():
                return None
            raise
        if not isinstance(result, dict) or not isinstance(result.get("value", ""), str):
            raise ARIServerError(200, "GET", path, "expected {\"value\": string} in the answer")
        value: str = result.get("value", "")
        return value

    def set_variable(self, channel_id: str, variable: str, value: str, report: bool = False) -> Deferred[None]:
        return self._void("POST", f"/channels/{_segment(channel_id)}/variable",
                          {"variable": variable, "value": value, "report_events": "true" if report else None})

    def external_media(
        self,
        *,
        app: str,
        channel_id: str,
        external_host: str,
        format: str,
        encapsulation: str = "rtp",
        transport: str = "udp",
        connection_type: str = "client",
        direction: str = "both",
        data: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        params = {
            "app": app, "channelId": channel_id, "external_host": external_host, "format": format,
            "encapsulation": encapsulation, "transport": transport, "connection_type": connection_type,
            "direction": direction, "data": data,
        }
        body = {"variables": dict(variables)} if variables else None
        return self._object("POST", "/channels/externalMedia", params, body)

    def continue_in_dialplan(
        self,
        channel_id: str,
        context: str | None = None,
        extension: str | None = None,
        priority: int | None = None,
        label: str | None = None,
    ) -> Deferred[None]:
        params = {"context": context, "extension": extension,
                  "priority": None if priority is None else str(priority), "label": label}
        return self._void("POST", f"/channels/{_segment(channel_id)}/continue", params)

    def redirect(self, channel_id: str, endpoint: str) -> Deferred[None]:
        return self._void("POST", f"/channels/{_segment(channel_id)}/redirect", {"endpoint": endpoint})

    def play(
        self, channel_id: str, media: str | Sequence[str], playback_id: str | None = None, lang: str | None = None,
        offset_ms: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        path = f"/channels/{_segment(channel_id)}/play"
        if playback_id is not None:
            path += f"/{_segment(playback_id)}"
        uris = media if isinstance(media, str) else ",".join(media)
        return self._object("POST", path, {"media": uris, "lang": lang,
                                           "offsetms": None if offset_ms is None else str(offset_ms)})

    def send_dtmf(self, channel_id: str, dtmf: str) -> Deferred[None]:
        return self._void("POST", f"/channels/{_segment(channel_id)}/dtmf", {"dtmf": dtmf})

    # --- bridges --------------------------------------------------------------------------------

    def create_bridge(
        self, bridge_id: str, bridge_type: str = "mixing", name: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._object("POST", "/bridges", {"type": bridge_type, "bridgeId": bridge_id, "name": name})

    def add_channel(self, bridge_id: str, channel_ids: str | Sequence[str],
                    absorb_dtmf: bool = False) -> Deferred[None]:
        channels = channel_ids if isinstance(channel_ids, str) else ",".join(channel_ids)
        params = {"channel": channels}
        if absorb_dtmf:
            params["absorbDTMF"] = "true"
        return self._void("POST", f"/bridges/{_segment(bridge_id)}/addChannel", params)

    def remove_channel(self, bridge_id: str, channel_id: str) -> Deferred[None]:
        return self._void("POST", f"/bridges/{_segment(bridge_id)}/removeChannel", {"channel": channel_id})

    def destroy_bridge(self, bridge_id: str) -> Deferred[None]:
        return self._void("DELETE", f"/bridges/{_segment(bridge_id)}")

    def list_bridges(self) -> Deferred[list[dict[str, Any]]]:
        return self._list("GET", "/bridges")

    # --- playbacks ------------------------------------------------------------------------------

    def stop_playback(self, playback_id: str) -> Deferred[None]:
        return self._void("DELETE", f"/playbacks/{_segment(playback_id)}")

    def get_playback(self, playback_id: str) -> Deferred[dict[str, Any]]:
        return self._object("GET", f"/playbacks/{_segment(playback_id)}")

    # --- the request ----------------------------------------------------------------------------

    def _void(self, method: str, path: str, params: Mapping[str, str | None] | None = None) -> Deferred[None]:
        async def call() -> None:
            await self._request(method, path, params)

        return Deferred.fromCoroutine(call())

    def _object(
        self, method: str, path: str, params: Mapping[str, str | None] | None = None, body: Any = None
    ) -> Deferred[dict[str, Any]]:
        async def call() -> dict[str, Any]:
            result = await self._request(method, path, params, body)
            if not isinstance(result, dict):
                raise ARIServerError(200, method, path, "expected a JSON object in the answer")
            return result

        return Deferred.fromCoroutine(call())

    def _list(self, method: str, path: str) -> Deferred[list[dict[str, Any]]]:
        async def call() -> list[dict[str, Any]]:
            result = await self._request(method, path)
            if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
                raise ARIServerError(200, method, path, "expected a JSON list of objects in the answer")
            return result

        return Deferred.fromCoroutine(call())

    async def _request(
        self, method: str, path: str, params: Mapping[str, str | None] | None = None, body: Any = None
    ) -> Any:
        """Send one request; the decoded JSON answer (None when empty), or an ARIError."""
        timeout = self._config.request_timeout
        started = self._clock.seconds()
        query = [(name, value) for name, value in (params or {}).items() if value is not None]
        kwargs: dict[str, Any] = {"params": query, "auth": self._auth, "unbuffered": True}
        if body is not None:
            kwargs["json"] = body
        try:
            response = await self._bounded(self._http.request(method, self._base + path, **kwargs), started)
            payload = await self._bounded(_read_body(response), started)
        except CancelledError:
            raise  # the caller cancelled: not an error of ARI's
        except Exception as e:
            if any(isinstance(inner, CancelledError) for inner in wrapped_exceptions(e)):
                raise CancelledError() from None
            problem = (f"no complete answer from {self._where} within {timeout:g}s"
                       if isinstance(e, defer.TimeoutError) else describe_unreachable(e, self._where))
            self.log.debug("ARI {method} {path} failed after {elapsed_ms}ms: {problem}", method=method, path=path,
                           elapsed_ms=self._elapsed_ms(started), problem=problem)
            raise ARIUnavailable(method, path, problem) from None

        status: int = response.code
        self.log.debug("ARI {method} {path} -> {status} in {elapsed_ms}ms", method=method, path=path,
                       status=status, elapsed_ms=self._elapsed_ms(started))
        reason = _text(response.phrase)
        if 200 <= status < 300:
            if not payload.strip():
                return None
            try:
                return json.loads(payload)
            except ValueError:
                raise ARIServerError(status, method, path, "the answer is not JSON", reason) from None
        raise error_for_status(status, method, path, _message(payload) or reason or f"HTTP {status}", reason)

    def _bounded(self, d: Deferred[T], started: float) -> Deferred[T]:
        """``d``, cancelled when the request's overall deadline passes."""
        remaining = max(0.0, started + self._config.request_timeout - self._clock.seconds())
        return d.addTimeout(remaining, self._clock, onTimeoutCancel=_to_timeout)

    def _elapsed_ms(self, started: float) -> float:
        return round((self._clock.seconds() - started) * 1000, 1)


def _to_timeout(value: T, timeout: float) -> T:
    # Agent reports its own cancellation wrapped (ResponseNeverReceived([CancelledError])): any
    # failure after the deadline cancelled the request is the deadline's doing.
    if isinstance(value, Failure):
        raise defer.TimeoutError(timeout, "ARI request")
    return value


class _BodyReader(Protocol):
    def __init__(self, done: Deferred[bytes]) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_BODY_BYTES and not self._done.called:
            self._done.errback(ValueError(f"answer larger than {MAX_BODY_BYTES} bytes"))
            _stop_transfer(self.transport)
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def _stop_transfer(transport: Any) -> None:
    # a response body's transport is a producer: stopping it drops the connection
    if transport is not None:
        transport.stopProducing()


def _read_body(response: Any) -> Deferred[bytes]:
    """The whole body; cancelling stops the transfer (the connection is dropped, not reused)."""
    reader: _BodyReader | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if reader is not None:
            _stop_transfer(reader.transport)

    done: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(done)
    response.deliverBody(reader)
    return done


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def _message(payload: bytes) -> str:
    """Asterisk's ``{"message": ...}`` error text, if the body is that."""
    try:
        document = json.loads(payload)
    except ValueError:
        return ""
    if isinstance(document, dict) and isinstance(document.get("message"), str):
        return str(document["message"])
    return ""
