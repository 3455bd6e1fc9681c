"""The Ollama and OpenAI-compatible backends: stream parsers, streamed replies, mid-stream errors, barge-in, deadlines.

HTTP backends are tested over real loopback sockets against the fakes in fake_llm_servers.py
(treq must really stream, and a cancelled reply must really drop the connection). Where a test is
about a deadline, the backend's clock and the fake's delays share one ``task.Clock`` and the test
steps it, so the outcome does not depend on how fast the machine is.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool

from tests.helpers import free_port
from tests.providers.local.fake_llm_servers import FakeOllama, FakeOpenAI, Script
from tests.providers.local.llm_support import MESSAGES, Collector, ollama_config, sleep, until
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.llm import (
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
)
from twisted_agent.providers.local.llm.streams import NDJSONDecoder, SSEDecoder, StreamFormatError


def real_http() -> HTTPClient:
    """A treq client on the real reactor whose connections close with each reply."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def openai_config(url: str, model: str = "qwen0.5b", **kwargs: Any) -> LocalProviderConfig:
    return LocalProviderConfig(openai_compatible_url=url + "/v1", llm_model=model, **kwargs)


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
