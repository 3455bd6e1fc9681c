from __future__ import annotations

from typing import Any, cast

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.calls.test_registry import FakeCall
from twisted_agent.calls.registry import CallRegistry
from twisted_agent.config import load_config
from twisted_agent.health import EngineHealth
from twisted_agent.providers.readiness import ProviderCatalog
from twisted_agent.status import ComponentStatus, IStatusSource
from twisted_agent.store.memory import MemoryStore
from twisted_agent.web.app import AgentWebApp


@implementer(IStatusSource)
class FakeARI:
    component = "ari"

    def __init__(self) -> None:
        self.connected = False

    def status(self) -> ComponentStatus:
        if self.connected:
            return ComponentStatus("connected", True, "connected")
        return ComponentStatus("disconnected", False, "not connected to ARI")


@implementer(IStatusSource)
class FakeMedia:
    component = "media"
    rtp_running = True
    audiosocket_running = False

    def status(self) -> ComponentStatus:
        return ComponentStatus("listening", True, "udp 0.0.0.0:18080")


class ReadyProviders(ProviderCatalog):
    def status(self) -> ComponentStatus:
        return ComponentStatus("ready", True, "ok")


def make(env=None, providers_ready=True):
    config = load_config(None, env or {}, lambda h, p: "127.0.0.1")
    clock = Clock()
    clock.advance(1000)
    ari, media = FakeARI(), FakeMedia()
    registry = CallRegistry(clock)
    providers = (ReadyProviders if providers_ready else ProviderCatalog)(config)
    health = EngineHealth(config, clock, ari, media, registry, providers, [MemoryStore(clock, config.store)])
    app = AgentWebApp(health)
    return StubTreq(app.resource()), ari, registry, clock


@pytest.fixture
def site():
    return make()


case = SynchronousTestCase()


def test_fakes_match_the_interface():
    assert verifyObject(IStatusSource, FakeARI())
    assert verifyObject(IStatusSource, FakeMedia())


def get(stub: StubTreq, path: str):
    d: Deferred = cast(Any, stub).get(f"http://127.0.0.1{path}")
    response = case.successResultOf(d)
    data = case.successResultOf(response.json())
    return response, data


def test_health_reports_the_required_fields(site):
    stub, ari, registry, clock = site
    registry.admit(FakeCall("c1"))
    clock.advance(5)
    response, data = get(stub, "/health")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert data["ari_connected"] is False
    assert data["rtp_server_running"] is True
    assert data["audiosocket_server_running"] is False
    assert data["active_calls"] == 1
    assert data["audio_transport"] == "externalmedia"
    assert set(data["providers"]) == {"local", "deepgram", "openai_realtime", "echo"}
    assert data["providers"]["echo"]["ready"] is True
    assert data["providers"]["deepgram"]["ready"] is False
    assert data["providers"]["deepgram"]["detail"] == "DEEPGRAM_API_KEY is not set"
    assert data["uptime_s"] == 5
    assert data["status"] == "degraded"
    assert data["components"]["ari"] == {"state": "disconnected", "ready": False,
                                         "detail": "not connected to ARI", "implemented": True}
    assert data["components"]["store"]["state"] == "running"
    assert "in memory" in data["components"]["store"]["detail"]
    assert "cluster_active_calls" not in data, "only a shared store knows other engines' calls"


def test_health_follows_the_ari_connection(site):
    stub, ari, registry, clock = site
    ari.connected = True
    _, data = get(stub, "/health")
    assert data["ari_connected"] is True
    assert data["status"] == "ok"


def test_health_shows_transport_from_config():
    stub, *_ = make({"AUDIO_TRANSPORT": "audiosocket"})
    _, data = get(stub, "/health")
    assert data["audio_transport"] == "audiosocket"


def test_live_always_answers(site):
    stub, *_ = site
    response, data = get(stub, "/live")
    assert (response.code, data) == (200, {"live": True})


def test_ready_is_503_while_ari_is_disconnected(site):
    stub, ari, registry, clock = site
    response, data = get(stub, "/ready")
    assert response.code == 503
    assert data == {"ready": False, "reasons": ["ari: not connected to ARI"]}
    ari.connected = True
    response, data = get(stub, "/ready")
    assert (response.code, data) == (200, {"ready": True})


def test_ready_is_503_while_draining(site):
    stub, ari, registry, clock = site
    ari.connected = True
    registry.admit(FakeCall("c1"))
    registry.drain(30)
    response, data = get(stub, "/ready")
    assert response.code == 503
    assert data["reasons"] == ["calls: 1 active call(s); not taking new calls"]
    _, health = get(stub, "/health")
    assert health["status"] == "draining" and health["draining"] is True


def test_ready_is_503_when_the_default_provider_cannot_take_calls(tmp_path):
    stub, ari, *_ = make({"MODELS_DIR": str(tmp_path)}, providers_ready=False)  # no models there
    ari.connected = True
    response, data = get(stub, "/ready")
    assert response.code == 503
    assert data["reasons"][0].startswith("providers: default provider local: ")


def test_unknown_path_and_method(site):
    stub, *_ = site
    assert case.successResultOf(stub.get("http://127.0.0.1/nothing")).code == 404
    assert case.successResultOf(stub.post("http://127.0.0.1/health")).code == 405


def test_health_never_leaks_secrets():
    stub, *_ = make({"ARI_PASSWORD": "pw-in-health?", "OPENAI_API_KEY": "sk-secret-key",
                     "REDIS_URL": "redis://:redispw@127.0.0.1:6379/0"})
    raw = case.successResultOf(case.successResultOf(stub.get("http://127.0.0.1/health")).content())
    for secret in (b"pw-in-health?", b"sk-secret-key", b"redispw"):
        assert secret not in raw
