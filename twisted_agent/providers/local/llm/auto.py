"""``LLM_BACKEND``: which language model a pipeline talks to, and ``auto``'s choice between two.

``auto`` asks Ollama at ``OLLAMA_HOST`` (``GET /api/tags``, a one-second deadline) when the
pipeline starts: if it answers and has ``LLM_MODEL`` pulled, replies come from Ollama; otherwise
from the embedded llama.cpp model. The choice holds until :meth:`AutoLLM.refresh` (or a restart);
``status()`` says which backend is active and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import LocalProviderConfig
from twisted_agent.providers.local.interfaces import ILanguageModel, ModelStatus
from twisted_agent.providers.local.llm.embedded import EmbeddedLLM
from twisted_agent.providers.local.llm.remote import LLMTimeouts, OllamaLLM, OpenAICompatibleLLM


@implementer(ILanguageModel)
class AutoLLM:
    """Ollama when it is there with the model, else the embedded model; decided by ``start()``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: LocalProviderConfig,
        http: Any = None,
        *,
        ollama: OllamaLLM | None = None,
        embedded: Callable[[], Any] | None = None,
        timeouts: LLMTimeouts | None = None,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self.ollama = ollama or OllamaLLM(reactor, config, http, timeouts)
        self._make_embedded = embedded or (lambda: EmbeddedLLM(reactor, config, timeouts=timeouts))
        self.embedded: Any = None
        self.active: Any = None
        #: why the active backend was chosen
        self.reason = ""
        self._choosing: Deferred[Any] | None = None

    @property
    def name(self) -> str:
        return self.active.name if self.active is not None else "auto"

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        backend = await self._choose()
        await backend.start()

    def _choose(self) -> Deferred[Any]:
        if self.active is not None:
            return succeed(self.active)
        if self._choosing is None:
            self._choosing = Deferred.fromCoroutine(self._probe())
        d: Deferred[Any] = Deferred()

        def chosen(result: Any) -> Any:
            if d.called:
                pass  # the chat that asked was cancelled
            elif isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
            return result

        self._choosing.addBoth(chosen)
        return d

    async def _probe(self) -> Any:
        ollama = await self.ollama.refresh()
        if ollama.ready:
            self.active = self.ollama
            self.reason = ollama.detail
        else:
            if self.embedded is None:
                self.embedded = self._make_embedded()
            self.active = self.embedded
            self.reason = ollama.detail
        self.log.info("language model: {backend} ({reason})", backend=self.active.name, reason=self.reason)
        self._choosing = None
        return self.active

    def refresh(self) -> Deferred[None]:
        """Decide again (Ollama may have been started or stopped); the embedded model stays loaded."""
        self.active = None
        return self.start()

    def chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None]) -> Deferred[str]:
        async def chat() -> str:
            backend = await self._choose()
            reply: str = await backend.chat(messages, on_token)
            return reply

        return Deferred.fromCoroutine(chat())

    def yield_to(self, busy: Deferred[Any]) -> None:
        if self.active is not None:
            self.active.yield_to(busy)

    def status(self) -> ModelStatus:
        if self.active is None:
            return ModelStatus("auto", False, "auto: not decided yet (Ollama, else the embedded model)",
                               extra={"backend": "auto", "active": None})
        inner = self.active.status()
        detail = f"auto: {inner.detail}" if self.active is self.ollama else f"auto: {inner.detail} ({self.reason})"
        return replace(inner, detail=detail, extra={**inner.extra, "active": self.active.name, "auto": True})

    def stop(self) -> Deferred[None]:
        async def stop() -> None:
            await self.ollama.stop()
            if self.embedded is not None:
                await self.embedded.stop()

        return Deferred.fromCoroutine(stop())


def make_llm(reactor: Any, config: LocalProviderConfig, http: Any = None) -> ILanguageModel:
    """The language model ``LLM_BACKEND`` names (``auto``: see :class:`AutoLLM`)."""
    backend = config.llm_backend
    if backend == "ollama":
        return OllamaLLM(reactor, config, http)
    if backend == "openai-compatible":
        return OpenAICompatibleLLM(reactor, config, http)
    if backend == "embedded":
        return EmbeddedLLM(reactor, config)
    if backend == "auto":
        return AutoLLM(reactor, config, http)
    raise ValueError(f"LLM_BACKEND={backend!r}: expected auto, ollama, openai-compatible or embedded")
