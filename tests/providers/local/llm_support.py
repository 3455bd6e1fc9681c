"""Helpers shared by the test_llm_* modules: the conversation, a token collector, waits, a scripted llama.cpp model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.llm import EmbeddedLLM

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


def ollama_config(url: str, model: str = "qwen2.5:0.5b", **kwargs: Any) -> LocalProviderConfig:
    return LocalProviderConfig(ollama_host=url, llm_model=model, **kwargs)


class Collector:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.times: list[float] = []

    def __call__(self, token: str) -> None:
        self.tokens.append(token)
        self.times.append(time.monotonic())


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
