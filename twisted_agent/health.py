"""The engine's health and readiness, computed from what each part reports."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_agent import __version__
from twisted_agent.calls.registry import CallRegistry
from twisted_agent.config import AgentConfig
from twisted_agent.providers.readiness import ProviderCatalog
from twisted_agent.status import IStatusSource

#: states of a part that still lets calls through but is not as it should be
DEGRADED_STATES = ("disconnected", "connecting", "error")


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
        store: Any = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._started = clock.seconds()
        self.ari = ari
        self.media = media
        self.registry = registry
        self.providers = providers
        self.store = store
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
        elif all(c["ready"] and c["state"] not in DEGRADED_STATES for c in components.values()):
            overall = "ok"
        else:
            # e.g. Redis down: calls go on (ready), but the operator must see something is wrong
            overall = "degraded"
        snapshot: dict[str, Any] = {
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
        if self.store is not None and self._config.store.redis_url:
            # several engines share the store: every engine's live calls
            snapshot["cluster_active_calls"] = self.store.cluster_active()
        return snapshot
