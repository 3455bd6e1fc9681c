"""Language models behind HTTP: an Ollama server, or any OpenAI-compatible ``/chat/completions`` server.

Both stream the reply (PROTOCOLS.md §4): treq with ``unbuffered=True``, the body read as it
arrives by :func:`~.streams.stream_body`, decoded by a parser that turns chunks into text pieces
and knows when the reply is complete. Three deadlines, all on the injected clock, all counted
from sending the request: response headers, the first piece of text, the whole reply. Cancelling
the ``chat`` Deferred drops the connection; both Ollama and llama.cpp's server stop generating
when their client goes away.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.ari.errors import summary, wrapped_exceptions
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ILanguageModel, ModelStatus
from twisted_agent.providers.local.llm.errors import (
    LLMError,
    LLMModelMissing,
    LLMStreamError,
    LLMTimeout,
    LLMUnavailable,
)
from twisted_agent.providers.local.llm.streams import NDJSONDecoder, SSEDecoder, StreamFormatError, stream_body

T = TypeVar("T")

#: error answers and model lists are small; a bigger body is not the server we expect
MAX_SMALL_BODY = 1024 * 1024


@dataclass(frozen=True)
class LLMTimeouts:
    """Deadlines of one reply, counted from sending the request.

    Ollama sends its response headers with the first token, so loading a cold model counts
    against ``headers_s`` too (``start()`` loads it ahead of the first call).
    """

    headers_s: float = 20.0
    first_token_s: float = 20.0
    total_s: float = 60.0
    #: the status probe (GET /api/tags or /models); auto-selection waits this long for Ollama
    probe_s: float = 1.0
    #: loading the model at start (Ollama: a chat with no messages)
    load_s: float = 120.0


class ReplyParser(Protocol):
    complete: bool

    def feed(self, data: bytes) -> list[str]:
        """The text pieces in ``data``; raises LLMError on an error in the stream."""

    def finish(self) -> None:
        """End of the body; raises LLMStreamError if the reply did not end properly."""


def default_http(reactor: Any) -> tuple[Any, Any]:
    """A treq HTTPClient on its own connection pool (closed by ``stop()``)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return HTTPClient(Agent(reactor, pool=pool)), pool


class _HTTPChatModel:
    """The request/stream/deadline machinery shared by the HTTP backends."""

    log = Logger()
    name = ""

    def __init__(
        self, reactor: Any, config: LocalProviderConfig, http: Any = None, timeouts: LLMTimeouts | None = None
    ) -> None:
        self._clock = reactor
        self.config = config
        self.timeouts = timeouts or LLMTimeouts()
        self._pool: Any = None
        if http is None:
            http, self._pool = default_http(reactor)
        self._http = http
        self.in_flight = 0
        self.replies = 0
        self.failures = 0
        self._status = ModelStatus(self.name, False, f"{self.describe()}: not checked yet",
                                   extra=self._extra())

    # --- for subclasses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _chat_request(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _parser(self) -> ReplyParser:
        raise NotImplementedError

    def _error_for(self, status: int, body: bytes) -> LLMError:
        raise NotImplementedError

    async def _probe(self) -> ModelStatus:
        raise NotImplementedError

    def unreachable_fix(self) -> str:
        return ""

    # --- ILanguageModel -------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> Deferred[str]:
        return Deferred.fromCoroutine(self._chat(list(messages), on_token))

    def yield_to(self, busy: Deferred[Any]) -> None:
        pass  # the server schedules its own work (and is often another machine)

    def status(self) -> ModelStatus:
        return replace(self._status, extra=self._extra())

    def refresh(self) -> Deferred[ModelStatus]:
        """Ask the server now (the status probe); fires with the new status, never fails."""
        async def probe() -> ModelStatus:
            try:
                self._status = await self._probe()
            except CancelledError:
                raise
            except LLMError as e:
                self._status = self._not_ready(e)
            return self.status()

        return Deferred.fromCoroutine(probe())

    def start(self) -> Deferred[None]:
        async def start() -> None:
            status = await self.refresh()
            if not status.ready:
                raise LLMError(f"{self.name}: {status.detail}", fatal=True, fix=status.fix)
            await self._warm_up()

        return Deferred.fromCoroutine(start())

    async def _warm_up(self) -> None:
        """Load the model ahead of the first call, where the server allows it."""

    def stop(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    # --- the request ----------------------------------------------------------------------------

    async def _chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> str:
        self.in_flight += 1
        try:
            reply = await self._stream(messages, on_token)
        except LLMError as e:
            self.failures += 1
            if e.fatal:
                self._status = self._not_ready(e)
            self.log.warn("{backend}: reply failed: {error}", backend=self.name, error=str(e))
            raise
        finally:
            self.in_flight -= 1
        self.replies += 1
        if not self._status.ready:
            self._status = replace(self._status, ready=True, detail=f"{self.describe()}: answering", fix="")
        return reply

    async def _stream(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> str:
        t = self.timeouts
        clock = self._clock
        started = clock.seconds()
        url, body = self._chat_request(messages)
        # Ollama sends its headers with the first token: waiting for them is waiting for it too
        stage, limit = min((t.first_token_s, "first token"), (t.headers_s, "response headers"),
                           (t.total_s, "complete reply"))[::-1]
        response = await self._send("POST", url, limit, stage, json=body)
        if response.code != 200:
            raise self._error_for(response.code, await self._small_body(response, started + t.total_s))

        parser = self._parser()
        parts: list[str] = []
        expired: list[LLMTimeout] = []
        reading: Deferred[None] | None = None

        consumer_errors: list[Exception] = []

        def on_data(data: bytes) -> None:
            for piece in parser.feed(data):
                if reading is not None and reading.called:
                    return  # cancelled (by on_token, say): not one more token
                if not parts and first_token.active():
                    first_token.cancel()
                parts.append(piece)
                try:
                    on_token(piece)
                except Exception as e:
                    consumer_errors.append(e)
                    raise

        def first_token_expired() -> None:
            expired.append(LLMTimeout("first token", t.first_token_s, self.name))
            if reading is not None:
                reading.cancel()

        first_token = clock.callLater(max(0.0, started + t.first_token_s - clock.seconds()), first_token_expired)
        try:
            reading = stream_body(response, on_data)
            await bounded(reading, clock, started + t.total_s, LLMTimeout("complete reply", t.total_s, self.name))
        except CancelledError:
            if expired:
                raise expired[0] from None
            raise
        except LLMError:
            raise
        except Exception as e:
            if consumer_errors and e is consumer_errors[0]:
                raise  # on_token's own failure, not the server's
            raise self._stream_failure(e) from None
        finally:
            if first_token.active():
                first_token.cancel()
        parser.finish()
        return "".join(parts)

    def _stream_failure(self, e: Exception) -> Exception:
        if isinstance(e, StreamFormatError):
            return LLMStreamError(f"{self.name}: malformed stream: {e}")
        inner = wrapped_exceptions(e)
        if any(isinstance(x, CancelledError) for x in inner):
            return CancelledError()
        return LLMStreamError(f"{self.name}: the connection broke mid-reply ({summary(inner[-1])})")

    async def _send(self, method: str, url: str, timeout: float, stage: str, **kwargs: Any) -> Any:
        """The response (headers only: the body is still to be read) or an LLMError."""
        clock = self._clock
        try:
            request = self._http.request(method, url, unbuffered=True, **kwargs)
            return await bounded(request, clock, clock.seconds() + timeout, LLMTimeout(stage, timeout, self.name))
        except (CancelledError, LLMError):
            raise
        except Exception as e:
            inner = wrapped_exceptions(e)
            if any(isinstance(x, CancelledError) for x in inner):
                raise CancelledError() from None
            raise LLMUnavailable(f"{self.describe()}: {_unreachable(inner, self.base_url)}",
                                 fix=self.unreachable_fix()) from None

    async def _small_body(self, response: Any, deadline: float) -> bytes:
        parts: list[bytes] = []
        size = 0

        def keep(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_SMALL_BODY:
                raise LLMError(f"{self.name}: answer larger than {MAX_SMALL_BODY} bytes")
            parts.append(data)

        try:
            await bounded(stream_body(response, keep), self._clock, deadline,
                           LLMTimeout("complete answer", max(0.0, deadline - self._clock.seconds()), self.name))
        except (CancelledError, LLMError):
            raise
        except Exception as e:
            raise LLMUnavailable(f"{self.describe()}: {_unreachable(wrapped_exceptions(e), self.base_url)}",
                                 fix=self.unreachable_fix()) from None
        return b"".join(parts)

    async def _get_json(self, path: str) -> Any:
        timeout = self.timeouts.probe_s
        response = await self._send("GET", self.base_url + path, timeout, "answer to GET " + path)
        body = await self._small_body(response, self._clock.seconds() + timeout)
        if response.code != 200:
            raise self._error_for(response.code, body)
        try:
            return json.loads(body)
        except ValueError:
            raise LLMError(f"{self.describe()}: GET {path} did not answer JSON", fatal=True,
                           fix="check that the URL points at the right server") from None

    def _not_ready(self, e: LLMError) -> ModelStatus:
        return ModelStatus(self.name, False, e.message, e.fix, extra=self._extra())

    def _extra(self) -> dict[str, Any]:
        return {"backend": self.name, "url": self.base_url, "model": self.config.llm_model,
                "in_flight": getattr(self, "in_flight", 0), "replies": getattr(self, "replies", 0),
                "failures": getattr(self, "failures", 0)}


def bounded(d: Deferred[T], clock: Any, deadline: float, error: LLMTimeout) -> Deferred[T]:
    """``d``, cancelled at ``deadline``; then it fails with ``error`` whatever the cancellation gave."""
    def expired(value: Any, timeout: float) -> Any:
        if isinstance(value, Failure):
            raise error
        return value

    return d.addTimeout(max(0.0, deadline - clock.seconds()), clock, onTimeoutCancel=expired)


def _unreachable(inner: list[BaseException], url: str) -> str:
    """Why the server at ``url`` gave no answer (the message already names the URL)."""
    from twisted.internet import error as net_error

    if any(isinstance(x, net_error.ConnectionRefusedError) for x in inner):
        return "connection refused"
    if any(isinstance(x, net_error.DNSLookupError) for x in inner):
        return f"cannot resolve the host name {urlsplit(url).hostname}"
    if any(isinstance(x, net_error.TimeoutError | net_error.TCPTimedOutError | DeferredTimeout) for x in inner):
        return "connecting timed out"
    return f"no answer ({summary(inner[-1])})"


def _error_text(body: bytes) -> str:
    """The error message of a JSON error body: Ollama's ``{"error": "..."}``, OpenAI's
    ``{"error": {"message": ...}}``, FastAPI's ``{"detail": ...}``; else the body's start."""
    try:
        document = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200]
    if isinstance(document, dict):
        error = document.get("error", document.get("detail"))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return error if isinstance(error, str) else json.dumps(error)[:200]
    return json.dumps(document)[:200]


# --- Ollama --------------------------------------------------------------------------------------


class OllamaReplyParser:
    """Ollama's ``/api/chat`` NDJSON: ``message.content`` deltas until ``done: true``.

    An ``error`` key can come on any line, with HTTP 200 (PROTOCOLS.md §4); EOF without ``done``
    is a failure. ``final`` keeps the last object (durations, token counts).
    """

    def __init__(self, backend: str = "ollama") -> None:
        self._decoder = NDJSONDecoder()
        self._backend = backend
        self.complete = False
        self.final: dict[str, Any] = {}

    def feed(self, data: bytes) -> list[str]:
        if self.complete:
            return []
        return self._pieces(self._decoder.feed(data))

    def finish(self) -> None:
        if not self.complete:
            self._pieces(self._decoder.finish())
        if not self.complete:
            raise LLMStreamError(f"{self._backend}: the stream ended before the reply was complete (no done)")

    def _pieces(self, objects: list[dict[str, Any]]) -> list[str]:
        pieces: list[str] = []
        for obj in objects:
            if self.complete:
                break
            if "error" in obj:
                raise LLMStreamError(f"{self._backend}: error mid-reply: {_error_text(json.dumps(obj).encode())}")
            message = obj.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and content:
                pieces.append(content)
            if obj.get("done") is True:
                self.complete = True
                self.final = obj
        return pieces


def _keep_alive(value: str) -> str | int | float:
    """Ollama takes a duration string ("30m") or a number of seconds (-1: forever); "-1" as a string fails."""
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() else number


def _ollama_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@implementer(ILanguageModel)
class OllamaLLM(_HTTPChatModel):
    """``POST {OLLAMA_HOST}/api/chat``, streamed; ``GET /api/tags`` says whether the model is pulled."""

    name = "ollama"

    @property
    def base_url(self) -> str:
        return self.config.ollama_host.rstrip("/")

    def unreachable_fix(self) -> str:
        return f"start Ollama (`ollama serve`) or set OLLAMA_HOST (now {self.config.ollama_host})"

    def describe(self) -> str:
        return f"Ollama {self.config.llm_model} at {self.base_url}"

    def _chat_request(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        config = self.config
        return self.base_url + "/api/chat", {
            "model": config.llm_model,
            "messages": messages,
            "stream": True,
            "keep_alive": _keep_alive(config.llm_keep_alive),
            "options": {"temperature": config.llm_temperature, "num_predict": config.llm_max_tokens},
        }

    def _parser(self) -> OllamaReplyParser:
        return OllamaReplyParser(self.name)

    def _error_for(self, status: int, body: bytes) -> LLMError:
        text = _error_text(body) or f"HTTP {status}"
        model = self.config.llm_model
        if status == 404 and "not found" in text:
            return LLMModelMissing(f"Ollama at {self.base_url} has no model {model}: {text}",
                                   fix=f"ollama pull {model}", status=status)
        if status in (401, 403):
            return LLMError(f"{self.describe()}: {status} {text}", fatal=True, status=status,
                            fix="this Ollama wants authentication: point OLLAMA_HOST at a local server")
        if status == 400:
            return LLMError(f"{self.describe()}: bad request: {text}", fatal=True, status=status,
                            fix="check LLM_MODEL and the LLM_* settings")
        return LLMError(f"{self.describe()}: {status} {text}", fatal=False, status=status)

    async def _probe(self) -> ModelStatus:
        document = await self._get_json("/api/tags")
        models = document.get("models") if isinstance(document, dict) else None
        if not isinstance(models, list):
            raise LLMError(f"{self.base_url}/api/tags is not Ollama's model list", fatal=True,
                           fix="check that OLLAMA_HOST points at an Ollama server")
        names = {str(m.get(key)) for m in models if isinstance(m, dict) for key in ("name", "model") if m.get(key)}
        model = self.config.llm_model
        if _ollama_tag(model) not in {_ollama_tag(n) for n in names}:
            have = ", ".join(sorted(names)) or "none"
            return ModelStatus(self.name, False, f"Ollama at {self.base_url} has no model {model} (has: {have})",
                               fix=f"ollama pull {model}", extra=self._extra())
        return ModelStatus(self.name, True, f"{self.describe()}: pulled", extra=self._extra())

    async def _warm_up(self) -> None:
        """An empty chat loads the model and keeps it for keep_alive (PROTOCOLS.md §4)."""
        keep_alive = _keep_alive(self.config.llm_keep_alive)
        body: dict[str, Any] = {"model": self.config.llm_model, "messages": [], "keep_alive": keep_alive}
        load_s = self.timeouts.load_s
        try:
            response = await self._send("POST", self.base_url + "/api/chat", load_s, "model load", json=body)
            answer = await self._small_body(response, self._clock.seconds() + load_s)
        except LLMError as e:
            self.log.warn("{backend}: could not load {model} ahead of calls: {error}", backend=self.name,
                          model=self.config.llm_model, error=str(e))
            return
        if response.code != 200:
            raise self._error_for(response.code, answer)
        self._status = replace(self._status, loaded=True, detail=f"{self.describe()}: loaded")


# --- OpenAI-compatible ---------------------------------------------------------------------------


class OpenAIReplyParser:
    """``chat.completion.chunk`` events over SSE: ``choices[0].delta.content`` until ``data: [DONE]``.

    A ``finish_reason`` followed by EOF is accepted (some servers omit ``[DONE]``); EOF before either
    is a failure, as is an ``error`` object (or ``event: error``) in the stream.
    """

    def __init__(self, backend: str = "openai-compatible") -> None:
        self._decoder = SSEDecoder()
        self._backend = backend
        self.complete = False
        self.finish_reason: str | None = None

    def feed(self, data: bytes) -> list[str]:
        if self.complete:
            return []
        return self._pieces(self._decoder.feed(data))

    def finish(self) -> None:
        if not self.complete:
            self._pieces(self._decoder.finish())
        if not self.complete and self.finish_reason is None:
            raise LLMStreamError(f"{self._backend}: the stream ended before the reply was complete (no [DONE])")
        self.complete = True

    def _pieces(self, events: list[Any]) -> list[str]:
        pieces: list[str] = []
        for event in events:
            if self.complete:
                break
            if event.data.strip() == "[DONE]":
                self.complete = True
                break
            try:
                chunk = json.loads(event.data)
            except ValueError:
                raise LLMStreamError(f"{self._backend}: malformed event: {event.data[:80]}") from None
            if event.event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                raise LLMStreamError(f"{self._backend}: error mid-reply: {_error_text(event.data.encode())}")
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                continue  # e.g. a usage-only chunk
            delta = choices[0].get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                pieces.append(content)
            if choices[0].get("finish_reason"):
                self.finish_reason = str(choices[0]["finish_reason"])
        return pieces


@implementer(ILanguageModel)
class OpenAICompatibleLLM(_HTTPChatModel):
    """``POST {OPENAI_COMPATIBLE_URL}/chat/completions`` with ``stream: true`` (llama.cpp's server, vLLM …)."""

    name = "openai-compatible"

    @property
    def base_url(self) -> str:
        return self.config.openai_compatible_url.rstrip("/")

    def unreachable_fix(self) -> str:
        return f"start the server or set OPENAI_COMPATIBLE_URL (now {self.config.openai_compatible_url})"

    def describe(self) -> str:
        return f"{self.config.llm_model} at {self.base_url}"

    def _chat_request(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        config = self.config
        return self.base_url + "/chat/completions", {
            "model": config.llm_model,
            "messages": messages,
            "stream": True,
            "max_tokens": config.llm_max_tokens,
            "temperature": config.llm_temperature,
        }

    def _parser(self) -> OpenAIReplyParser:
        return OpenAIReplyParser(self.name)

    def _error_for(self, status: int, body: bytes) -> LLMError:
        text = _error_text(body) or f"HTTP {status}"
        if status == 404:
            return LLMModelMissing(f"{self.describe()}: {text}", status=status,
                                   fix=f"check LLM_MODEL against GET {self.base_url}/models and OPENAI_COMPATIBLE_URL")
        if status in (401, 403):
            return LLMError(f"{self.describe()}: {status} {text}", fatal=True, status=status,
                            fix="the server wants an API key: use a local server")
        if status in (400, 422):
            return LLMError(f"{self.describe()}: bad request: {text}", fatal=True, status=status,
                            fix="check LLM_MODEL and the LLM_* settings")
        return LLMError(f"{self.describe()}: {status} {text}", fatal=False, status=status)

    async def _probe(self) -> ModelStatus:
        document = await self._get_json("/models")
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise LLMError(f"{self.base_url}/models is not an OpenAI model list", fatal=True,
                           fix="OPENAI_COMPATIBLE_URL must end in /v1 (the base of /chat/completions)")
        ids = [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]
        model = self.config.llm_model
        if model in ids:
            return ModelStatus(self.name, True, f"{self.describe()}: served", extra=self._extra())
        if len(ids) == 1:
            # llama.cpp's server answers with its one model whatever the request names
            return ModelStatus(self.name, True, f"{self.base_url} serves only {ids[0]} (LLM_MODEL={model} is sent)",
                               extra=self._extra())
        return ModelStatus(self.name, False, f"{self.base_url} does not serve {model} (serves: {', '.join(ids)})",
                           fix=f"set LLM_MODEL to one of: {', '.join(ids)}" if ids else "load a model into the server",
                           extra=self._extra())
