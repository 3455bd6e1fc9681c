"""Whether each provider could take a call now, and what to do if not.

Each provider reports readiness with a one-line fix, shown in /health and by ``ai-agent check``.
Without a running engine (``ai-agent check``) the local pipeline reports whether its libraries and
models are installed; the engine replaces that with the pipeline's own factory, which reports the
loaded models. The cloud providers are ready when their API key is set; whether the service
answers is found out per call (a call whose provider cannot connect goes back to the dialplan).
A provider that is still starting says so (``starting``): a call that arrives then is held, hearing
ringback, until it is ready (READY_TIMEOUT), instead of being refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from zope.interface import implementer

from twisted_agent.config import PROVIDER_NAMES, AgentConfig
from twisted_agent.providers.base import IProviderFactory, ProviderError, ProviderReadiness
from twisted_agent.providers.echo import EchoFactory
from twisted_agent.status import ComponentStatus, IStatusSource


def _local(config: AgentConfig) -> ProviderReadiness:
    from twisted_agent.providers.local.pipeline import installed_readiness

    return installed_readiness(config)


def _deepgram(config: AgentConfig) -> ProviderReadiness:
    from twisted_agent.providers.deepgram import DeepgramFactory

    return DeepgramFactory(None, config).readiness()


def _openai_realtime(config: AgentConfig) -> ProviderReadiness:
    from twisted_agent.providers.openai_realtime import RealtimeFactory

    return RealtimeFactory(None, config).readiness()


CHECKS: dict[str, Callable[[AgentConfig], ProviderReadiness]] = {
    "local": _local,
    "deepgram": _deepgram,
    "openai_realtime": _openai_realtime,
}


@implementer(IProviderFactory)
class UnbuiltFactory:
    """A provider without a running adapter here: its readiness from ``check``; a call that picks it
    is refused (the engine replaces the factories of the providers it runs)."""

    def __init__(self, name: str, check: Callable[[AgentConfig], ProviderReadiness], config: AgentConfig) -> None:
        self.name = name
        self._check = check
        self._config = config

    def readiness(self) -> ProviderReadiness:
        return self._check(self._config)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)  # never starting here: nothing to wait for

    def create(self) -> Any:
        raise ProviderError(f"provider {self.name} is not available: {self.readiness().detail}")


@implementer(IStatusSource)
class ProviderCatalog:
    """The providers a call can choose, their readiness, and the default one's."""

    component = "providers"

    def __init__(self, config: AgentConfig, factories: dict[str, Any] | None = None, clock: Any = None) -> None:
        self._config = config
        self.factories: dict[str, Any] = {name: UnbuiltFactory(name, check, config) for name, check in CHECKS.items()}
        self.factories["echo"] = EchoFactory(clock)
        self.factories.update(factories or {})
        missing = set(PROVIDER_NAMES) - set(self.factories)
        assert not missing, f"no factory for providers {missing}"

    def readiness(self) -> dict[str, ProviderReadiness]:
        return {name: factory.readiness() for name, factory in self.factories.items()}

    def create(self, name: str) -> Any:
        return self.factories[name].create()

    def starting(self, name: str) -> bool:
        """The provider is not ready yet but still starting (loading its models): a call that wants
        it may wait (:meth:`when_ready`) instead of being refused."""
        return self.factories[name].readiness().starting

    def when_ready(self, name: str) -> Deferred[None]:
        """Fires once the provider is no longer starting (IProviderFactory.when_ready)."""
        return self.factories[name].when_ready()

    def in_use(self) -> list[str]:
        """The default provider and those the contexts name: their models load at start-up."""
        names = [self._config.calls.default_provider]
        names += [c.provider for c in self._config.contexts.values() if c.provider and c.provider not in names]
        return names

    def start(self) -> Deferred[Any]:
        """Start (load the models of) the providers in use; a provider that fails stays not ready."""
        starting = [self.factories[name].start() for name in self.in_use() if hasattr(self.factories[name], "start")]
        return DeferredList(starting, consumeErrors=True)

    def stop(self) -> Deferred[Any]:
        stopping = [f.stop() for f in self.factories.values() if hasattr(f, "stop")]
        return DeferredList(stopping, consumeErrors=True)

    def status(self) -> ComponentStatus:
        default = self._config.calls.default_provider
        state = self.factories[default].readiness()
        return ComponentStatus("ready" if state.ready else "not ready", state.ready,
                               f"default provider {default}: {state.detail}", implemented=state.implemented)
