"""Every backend against ILanguageModel, make_llm, and AutoLLM choosing between Ollama and the embedded model."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.helpers import free_port
from tests.providers.local.fake_llm_servers import FakeOllama, Script
from tests.providers.local.llm_support import MESSAGES, Collector, FakeLlama, embedded, ollama_config
from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ILanguageModel
from twisted_agent.providers.local.llm import (
    AutoLLM,
    EmbeddedLLM,
    LLMTimeouts,
    OllamaLLM,
    OpenAICompatibleLLM,
    make_llm,
)


def test_backends_implement_the_interface() -> None:
    config = LocalProviderConfig()
    for llm in (OllamaLLM(Clock(), config, http=object()), OpenAICompatibleLLM(Clock(), config, http=object()),
                EmbeddedLLM(Clock(), config), AutoLLM(Clock(), config, http=object())):
        verifyObject(ILanguageModel, llm)


@pytest.mark.parametrize(("backend", "kind"), [
    ("ollama", OllamaLLM), ("openai-compatible", OpenAICompatibleLLM), ("embedded", EmbeddedLLM), ("auto", AutoLLM)])
def test_make_llm_builds_the_configured_backend(backend: str, kind: type) -> None:
    assert isinstance(make_llm(Clock(), LocalProviderConfig(llm_backend=backend), http=object()), kind)


# --- auto -----------------------------------------------------------------------------------------------


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
