"""Whether each provider could take a call now, and what to do if not.

Each provider reports readiness with a one-line fix, shown in /health and by ``ai-agent check``.
A provider whose adapter is not built yet says so: it is never reported ready.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from zope.interface import implementer

from twisted_agent.config import PROVIDER_NAMES, AgentConfig
from twisted_agent.status import ComponentStatus, IStatusSource


@dataclass(frozen=True)
class ProviderReadiness:
    name: str
    ready: bool
    detail: str
    fix: str = ""
    implemented: bool = True

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _local(config: AgentConfig) -> ProviderReadiness:
    local = config.providers.local
    return ProviderReadiness(
        "local", False,
        f"local pipeline (Whisper {local.stt_model} -> {local.llm_backend} {local.llm_model} -> Piper "
        f"{local.tts_voice}) is not built yet",
        "use it once the local pipeline lands; `make install-local` already installs its libraries",
        implemented=False)


def _cloud(name: str, title: str, key_env: str, api_key: str) -> ProviderReadiness:
    if not api_key:
        return ProviderReadiness(name, False, f"{key_env} is not set",
                                 f"set {key_env} in the service's EnvironmentFile", implemented=False)
    return ProviderReadiness(name, False, f"{title} adapter is not built yet",
                             "API key present; nothing to do until the adapter lands", implemented=False)


def _deepgram(config: AgentConfig) -> ProviderReadiness:
    return _cloud("deepgram", "Deepgram Voice Agent", "DEEPGRAM_API_KEY", config.providers.deepgram.api_key)


def _openai_realtime(config: AgentConfig) -> ProviderReadiness:
    return _cloud("openai_realtime", "OpenAI Realtime", "OPENAI_API_KEY", config.providers.openai_realtime.api_key)


CHECKS: dict[str, Callable[[AgentConfig], ProviderReadiness]] = {
    "local": _local,
    "deepgram": _deepgram,
    "openai_realtime": _openai_realtime,
}
assert tuple(CHECKS) == PROVIDER_NAMES


@implementer(IStatusSource)
class ProviderCatalog:
    """Readiness of every provider, and of the default one."""

    component = "providers"

    def __init__(self, config: AgentConfig) -> None:
        self._config = config

    def readiness(self) -> dict[str, ProviderReadiness]:
        return {name: check(self._config) for name, check in CHECKS.items()}

    def status(self) -> ComponentStatus:
        default = self._config.calls.default_provider
        state = self.readiness()[default]
        return ComponentStatus("ready" if state.ready else "not ready", state.ready,
                               f"default provider {default}: {state.detail}", implemented=state.implemented)
