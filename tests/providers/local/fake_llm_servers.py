"""Faithful fakes of the language-model servers, as twisted.web resources served on 127.0.0.1.

:class:`FakeOllama` speaks Ollama's API as PROTOCOLS.md §4 describes it: ``POST /api/chat``
streams ``application/x-ndjson``, one ``{model, created_at, message, done}`` object per line and a
final ``done: true`` object with durations in nanoseconds; the response headers go out with the
first line (as Ollama's streaming handler does); an empty ``messages`` loads the model
(``done_reason: "load"``); an unknown model is a 404 ``{"error": "model \\"x\\" not found, try
pulling it first"}``; an error mid-reply is a last ``{"error": ...}`` line with HTTP 200;
``GET /api/tags`` lists the pulled models.

:class:`FakeOpenAI` speaks the OpenAI-compatible API of ``python -m llama_cpp.server``:
``POST /v1/chat/completions`` with ``stream: true`` answers ``text/event-stream``, one
``data: {chat.completion.chunk}`` event per token (the first carries the role, the last an empty
delta and ``finish_reason``), then ``data: [DONE]``; ``GET /v1/models`` lists the model.

What a reply looks like comes from a :class:`Script` (tokens, delays, where to fail), set per test.
Delays run on the ``clock`` given (a ``task.Clock`` makes them step with the test) or the reactor.
Each request is recorded with its JSON body and whether the client went away before the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


@dataclass
class Script:
    """One reply: ``tokens`` in order, ``first_delay`` before the first and ``delay`` between them."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", "!", " How", " can", " I", " help", "?"])
    delay: float = 0.0
    first_delay: float = 0.0
    #: send the response headers at once, before the first token (llama.cpp's server does; Ollama does not)
    headers_first: bool = False
    #: after this many tokens: an ``{"error": ...}`` line (Ollama) / error event (OpenAI), HTTP 200
    error_after: int | None = None
    error_message: str = "an error was encountered while running the model: unexpected EOF"
    #: after this many tokens: end the body cleanly without ``done`` / ``[DONE]``
    eof_after: int | None = None
    #: after this many tokens: drop the TCP connection
    abort_after: int | None = None
    #: split each line into writes of this many bytes (0: one write per line)
    write_size: int = 0
    #: an HTTP error answer instead of a stream: (status, JSON body)
    http_error: tuple[int, Any] | None = None


@dataclass
class Seen:
    """One request as the fake saw it."""

    path: str
    body: Any
    started: float
    tokens_sent: int = 0
    finished: bool = False
    #: the client closed the connection before the reply was over
    disconnected: bool = False
    disconnected_at: float | None = None
    gone: Deferred[None] = field(default_factory=Deferred)


class _FakeServer:
    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock: Any = clock if clock is not None else global_reactor
        self.script = Script()
        self.requests: list[Seen] = []
        self.port: IListeningPort | None = None
        self._arrivals: list[tuple[int, Deferred[Seen]]] = []

    # --- serving --------------------------------------------------------------------------------

    def resource(self) -> Resource:
        raise NotImplementedError

    async def listen(self) -> str:
        """Serve on a free loopback port; the base URL (``http://127.0.0.1:PORT``)."""
        endpoint = TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(Site(self.resource()))
        address: Any = self.port.getHost()
        return f"http://127.0.0.1:{address.port}"

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()  # type: ignore[misc]
            self.port = None

    def request_arrived(self, count: int = 1) -> Deferred[Seen]:
        """Fires with the ``count``-th request (1-based) once it has arrived."""
        d: Deferred[Seen] = Deferred()
        if len(self.requests) >= count:
            d.callback(self.requests[count - 1])
        else:
            self._arrivals.append((count, d))
        return d

    def _record(self, request: Request, body: Any) -> Seen:
        seen = Seen(request.path.decode(), body, time.monotonic())
        self.requests.append(seen)
        for count, d in list(self._arrivals):
            if len(self.requests) >= count:
                self._arrivals.remove((count, d))
                # after this render call has set up the reply (and scheduled its tokens)
                self._later(d, self.requests[count - 1])
        return seen

    @staticmethod
    def _later(d: Deferred[Seen], seen: Seen) -> None:
        real: Any = global_reactor
        real.callLater(0, d.callback, seen)

    # --- a streamed reply -----------------------------------------------------------------------

    def _stream(self, request: Request, seen: Seen, lines: list[bytes], final: list[bytes], error: bytes,
                content_type: bytes, preamble: bytes = b"") -> Any:
        """Write ``lines`` (one per token) on the script's schedule, then ``final``; NOT_DONE_YET."""
        script = self.script
        request.setHeader(b"Content-Type", content_type)
        pending: list[IDelayedCall] = []

        def gone(_: Any) -> None:
            for call in pending:
                if call.active():
                    call.cancel()
            if not seen.finished:
                seen.disconnected = True
                seen.disconnected_at = time.monotonic()
            if not seen.gone.called:
                seen.gone.callback(None)

        request.notifyFinish().addBoth(gone)

        def write(data: bytes) -> None:
            if seen.disconnected:
                return
            size = script.write_size or len(data) or 1
            for i in range(0, max(len(data), 1), size):
                request.write(data[i:i + size])

        def end() -> None:
            seen.finished = True
            request.finish()

        def step(i: int) -> None:
            if seen.disconnected:
                return
            if script.error_after is not None and i == script.error_after:
                write(error)
                return end()
            if script.eof_after is not None and i == script.eof_after:
                return end()
            if script.abort_after is not None and i == script.abort_after:
                seen.finished = True  # the server's doing, not the client's
                assert request.channel is not None
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
                return None
            if i == len(lines):
                for line in final:
                    write(line)
                return end()
            write(lines[i])
            seen.tokens_sent += 1
            pending.append(self.clock.callLater(script.delay, step, i + 1))
            return None

        if script.headers_first:
            request.write(preamble)  # the headers go out now (with a comment or nothing)
        pending.append(self.clock.callLater(script.first_delay, step, 0))
        return NOT_DONE_YET


def _json_body(request: Request) -> Any:
    assert request.content is not None
    raw = request.content.read()
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _answer(request: Request, status: int, document: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(document).encode()


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


# --- Ollama ---------------------------------------------------------------------------------------


class FakeOllama(_FakeServer):
    """An Ollama server with ``models`` pulled."""

    def __init__(self, clock: IReactorTime | None = None, models: tuple[str, ...] = ("qwen2.5:0.5b",)) -> None:
        super().__init__(clock)
        self.models = list(models)
        self.loaded: list[str] = []

    def resource(self) -> Resource:
        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"chat", _Leaf(post=self._chat))
        api.putChild(b"tags", _Leaf(get=self._tags))
        return root

    def _has(self, model: str) -> bool:
        tag = model if ":" in model else f"{model}:latest"
        return tag in self.models

    def _tags(self, request: Request) -> bytes:
        self._record(request, None)
        return _answer(request, 200, {"models": [
            {"name": m, "model": m, "modified_at": "2026-07-01T12:00:00Z", "size": 397821319,
             "digest": "a8b0c5157701" + "0" * 52,
             "details": {"format": "gguf", "family": "qwen2", "families": ["qwen2"], "parameter_size": "494.03M",
                         "quantization_level": "Q4_K_M"}} for m in self.models]})

    def _chat(self, request: Request) -> Any:
        body = _json_body(request)
        seen = self._record(request, body)
        script = self.script
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _answer(request, 400, {"error": "invalid request: model is required"})
        model = body["model"]
        if script.http_error is not None:
            status, document = script.http_error
            return _answer(request, status, document)
        if not self._has(model):
            return _answer(request, 404, {"error": f'model "{model}" not found, try pulling it first'})
        if not body.get("messages"):
            self.loaded.append(model)
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            seen.finished = True
            return json.dumps({"model": model, "created_at": _iso_now(),
                               "message": {"role": "assistant", "content": ""},
                               "done_reason": "load", "done": True}).encode()

        def chunk(content: str) -> bytes:
            return json.dumps({"model": model, "created_at": _iso_now(),
                               "message": {"role": "assistant", "content": content}, "done": False}).encode() + b"\n"

        final = json.dumps({
            "model": model, "created_at": _iso_now(), "message": {"role": "assistant", "content": ""},
            "done_reason": "stop", "done": True, "total_duration": 940_000_000, "load_duration": 12_000_000,
            "prompt_eval_count": 67, "prompt_eval_duration": 300_000_000,
            "eval_count": len(script.tokens), "eval_duration": 600_000_000}).encode() + b"\n"
        error = json.dumps({"error": script.error_message}).encode() + b"\n"
        return self._stream(request, seen, [chunk(t) for t in script.tokens], [final], error,
                            b"application/x-ndjson")


# --- OpenAI-compatible (llama_cpp.server) ----------------------------------------------------------


class FakeOpenAI(_FakeServer):
    """``python -m llama_cpp.server --model_alias MODEL``: serves one model under ``/v1``.

    ``strict`` answers 404 for another model name, as OpenAI and vLLM do (llama.cpp's server does not).
    """

    def __init__(self, clock: IReactorTime | None = None, model: str = "qwen0.5b", strict: bool = False) -> None:
        super().__init__(clock)
        self.model = model
        self.strict = strict

    def resource(self) -> Resource:
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        chat = Resource()
        v1.putChild(b"chat", chat)
        chat.putChild(b"completions", _Leaf(post=self._completions))
        v1.putChild(b"models", _Leaf(get=self._models))
        return root

    def _models(self, request: Request) -> bytes:
        self._record(request, None)
        return _answer(request, 200, {"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "me", "permissions": []}]})

    def _completions(self, request: Request) -> Any:
        body = _json_body(request)
        seen = self._record(request, body)
        script = self.script
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _answer(request, 422, {"detail": [{"loc": ["body", "messages"], "msg": "field required",
                                                      "type": "value_error.missing"}]})
        if script.http_error is not None:
            status, document = script.http_error
            return _answer(request, status, document)
        model = body.get("model") or self.model
        if self.strict and model != self.model:
            return _answer(request, 404, {"error": {
                "message": f"The model `{model}` does not exist", "type": "invalid_request_error",
                "param": None, "code": "model_not_found"}})
        ident = "chatcmpl-0b1e8f5c"
        created = int(time.time())

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"

        tokens = [event({"role": "assistant", "content": script.tokens[0]})] if script.tokens else []
        tokens += [event({"content": t}) for t in script.tokens[1:]]
        final = [event({}, "stop"), b"data: [DONE]\r\n\r\n"]
        error = b"event: error\r\ndata: " + json.dumps({"error": {"message": script.error_message,
                                                                   "type": "server_error"}}).encode() + b"\r\n\r\n"
        return self._stream(request, seen, tokens, final, error, b"text/event-stream; charset=utf-8",
                            preamble=b": ping - 2026-07-01 12:00:00\r\n\r\n")


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, get: Any = None, post: Any = None) -> None:
        super().__init__()
        self._get = get
        self._post = post

    def render_GET(self, request: Request) -> Any:
        if self._get is None:
            return _answer(request, 405, {"error": "method not allowed"})
        return self._get(request)

    def render_POST(self, request: Request) -> Any:
        if self._post is None:
            return _answer(request, 405, {"error": "method not allowed"})
        return self._post(request)
