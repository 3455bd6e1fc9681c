"""The engine's health and readiness, computed from what each part reports."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_agent import __version__
from twisted_agent.calls.registry import CallRegistry
from twisted_agent.config import AgentConfig
from twisted_agent.providers.readiness import ProviderCatalog
from twisted_agent.status import IStatusSource


class EngineHealth:
    def __init__(
        self,
        config: AgentConfig,
        clock: IReactorTime,
        ari: Any,
        media: Any,
        registry: CallRegistry,
        providers: ProviderCatalog,
        others: list[Any],
    ) -> None:
        self._config = config
        self._clock = clock
        self._started = clock.seconds()
        self.ari = ari
        self.media = media
        self.registry = registry
        self.providers = providers
        self._sources = [ari, media, registry, providers, *others]

    def components(self) -> dict[str, dict[str, Any]]:
        return {IStatusSource(source).component: source.status().as_json() for source in self._sources}

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        for source in self._sources:
            status = source.status()
            if not status.ready:
                reasons.append(f"{source.component}: {status.detail or status.state}")
        return reasons

    def snapshot(self) -> dict[str, Any]:
        components = self.components()
        if self.registry.draining:
            overall = "draining"
        elif all(c["ready"] for c in components.values()):
            overall = "ok"
        else:
            overall = "degraded"
        return {
            "status": overall,
            "version": __version__,
            "uptime_s": round(self._clock.seconds() - self._started, 3),
            "ari_connected": bool(self.ari.connected),
            "rtp_server_running": bool(self.media.rtp_running),
            "audiosocket_server_running": bool(self.media.audiosocket_running),
            "active_calls": len(self.registry),
            "draining": self.registry.draining,
            "audio_transport": self._config.media.transport,
            "downstream_mode": self._config.media.downstream_mode,
            "providers": {name: r.as_json() for name, r in self.providers.readiness().items()},
            "default_provider": self._config.calls.default_provider,
            "components": components,
        }
