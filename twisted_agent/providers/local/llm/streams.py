"""Streamed HTTP bodies: NDJSON (Ollama) and server-sent events (OpenAI-compatible servers).

The decoders are plain objects: bytes in, complete documents out, however the bytes are chunked
(a line may arrive split across any number of TCP reads). :func:`stream_body` delivers a
twisted.web response body to a callback as it arrives and, unlike ``treq.collect``, can be
cancelled: cancelling drops the connection, which is how a server learns to stop generating.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

#: no sane chunk of a chat stream is this long; a server sending one is broken, not chatty
MAX_LINE_BYTES = 1024 * 1024


class StreamFormatError(ValueError):
    """The body is not the streaming format it claims to be."""


class NDJSONDecoder:
    """``\\n``-terminated JSON objects, one per line (blank lines and ``\\r\\n`` endings tolerated)."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buffer = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The objects completed by ``data``; raises :class:`StreamFormatError` on a bad line."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self._max_line:
            raise StreamFormatError(f"a line longer than {self._max_line} bytes")
        return [obj for obj in map(_json_object, lines) if obj is not None]

    def finish(self) -> list[dict[str, Any]]:
        """End of the body: a last line without its newline still counts."""
        rest, self._buffer = self._buffer, b""
        obj = _json_object(rest)
        return [] if obj is None else [obj]

    @property
    def pending(self) -> bytes:
        return self._buffer


def _json_object(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        raise StreamFormatError(f"not JSON: {_preview(line)}") from None
    if not isinstance(obj, dict):
        raise StreamFormatError(f"not a JSON object: {_preview(line)}")
    return obj


def _preview(data: bytes, limit: int = 80) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Server-sent events (the WHATWG ``text/event-stream`` rules that chat servers use).

    Lines end with ``\\r\\n``, ``\\n`` or ``\\r``; a blank line dispatches the event; ``data:`` lines
    are joined with ``\\n``; one space after the colon is dropped; ``:`` lines are comments; an event
    with no data is not dispatched.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buffer = b""
        self._max_line = max_line
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        self._buffer += data
        events: list[ServerSentEvent] = []
        while True:
            end, after = _line_end(self._buffer)
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[after:]
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        if len(self._buffer) > self._max_line:
            raise StreamFormatError(f"a line longer than {self._max_line} bytes")
        return events

    def finish(self) -> list[ServerSentEvent]:
        """End of the body: per the spec an unterminated event is dropped; a lone last line is kept."""
        events: list[ServerSentEvent] = []
        if self._buffer:
            rest, self._buffer = self._buffer, b""
            self._line(rest.decode("utf-8", "replace"))
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


def _line_end(buffer: bytes) -> tuple[int, int]:
    """Where the first line of ``buffer`` ends and the next starts; (-1, -1) if not known yet."""
    cr = buffer.find(b"\r")
    lf = buffer.find(b"\n")
    if cr < 0 and lf < 0:
        return -1, -1
    if cr < 0 or (0 <= lf < cr):
        return lf, lf + 1
    if cr + 1 == len(buffer):
        return -1, -1  # a \r at the end: a \n may follow, and \r\n is one line ending
    return cr, cr + 2 if buffer[cr + 1:cr + 2] == b"\n" else cr + 1


class _Streamer(Protocol):
    def __init__(self, done: Deferred[None], on_data: Callable[[bytes], None]) -> None:
        self.done = done
        self.on_data = on_data
        self.stopped = False

    def dataReceived(self, data: bytes) -> None:
        if self.stopped or self.done.called:
            return
        try:
            self.on_data(data)
        except BaseException:
            failure = Failure()
            self.stop()
            if not self.done.called:
                self.done.errback(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def stop(self) -> None:
        """Drop the connection: the server sees the client go away (and stops generating)."""
        self.stopped = True
        transport: Any = self.transport  # a response body's transport is also a producer
        if transport is not None:
            transport.stopProducing()


def stream_body(response: Any, on_data: Callable[[bytes], None]) -> Deferred[None]:
    """Hand each chunk of ``response``'s body to ``on_data``; fires at the end of the body.

    If ``on_data`` raises, the connection is dropped and the Deferred fails with that error.
    Cancelling drops the connection at once, and ``on_data`` is not called again.
    """
    streamer: _Streamer | None = None

    def cancel(_: Deferred[None]) -> None:
        if streamer is not None:
            streamer.stop()

    done: Deferred[None] = Deferred(cancel)
    streamer = _Streamer(done, on_data)
    response.deliverBody(streamer)
    return done

