"""The engine's services on a real reactor, with real loopback sockets."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.calls.test_registry import FakeCall
from twisted_agent.config import AgentConfig, load_config
from twisted_agent.listening import address
from twisted_agent.service import AgentService, StartupError


def loopback_config(**media: Any) -> AgentConfig:
    config = load_config(None, {"ARI_URL": "http://127.0.0.1:1/ari"})
    media_config = dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=0,
                                       audiosocket_host="127.0.0.1", audiosocket_port=0, **media)
    return dataclasses.replace(config, media=media_config,
                               web=dataclasses.replace(config.web, host="127.0.0.1", port=0))


def start(config: AgentConfig) -> AgentService:
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    return service


def base_url(service: AgentService) -> str:
    assert service.web.port is not None
    return f"http://127.0.0.1:{address(service.web.port)[1]}"


def test_children():
    service = AgentService(loopback_config(), reactor)
    assert [child.name for child in service] == ["store", "ari", "media", "calls", "web"]


@pytest_twisted.ensureDeferred
async def test_starts_serves_and_stops_on_loopback():
    service = start(loopback_config())
    try:
        assert service.running
        rtp = service.media.rtp_port
        assert rtp is not None and address(rtp)[0] == "127.0.0.1"
        assert service.media.audiosocket_port is None, "only the configured transport listens"
        response = await treq.get(base_url(service) + "/health")
        health = await response.json()
        assert response.code == 200
        assert health["rtp_server_running"] is True
        assert health["ari_connected"] is False
        ari = health["components"]["ari"]
        assert ari["implemented"] is True and ari["ready"] is False, "nothing listens on port 1"
        assert ari["state"] in ("connecting", "disconnected")
        assert health["components"]["media"]["implemented"] is True
        # The RTP listener really receives datagrams: this one matches no call, so it is counted.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x80" + bytes(171), address(rtp))
        for _ in range(100):
            if service.media.rtp.router.packets:
                break
            await deferLater(0.01)
        assert service.media.rtp.router.foreign == 1
        health = await (await treq.get(base_url(service) + "/health")).json()
        assert "1 RTP packet(s) matched no call" in health["components"]["media"]["detail"]
    finally:
        await service.stopService()
    assert not service.running
    assert service.web.port is None and service.media.rtp_port is None


@pytest_twisted.ensureDeferred
async def test_audiosocket_transport_binds_tcp_only():
    service = start(loopback_config(transport="audiosocket"))
    try:
        assert service.media.rtp_port is None
        assert service.media.audiosocket_port is not None
        response = await treq.get(base_url(service) + "/health")
        health = await response.json()
        assert health["audiosocket_server_running"] is True and health["rtp_server_running"] is False
    finally:
        await service.stopService()


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_draining_keeps_the_site_up_until_calls_end():
    config = loopback_config()
    config = dataclasses.replace(config, calls=dataclasses.replace(config.calls, drain_timeout=30))
    service = start(config)
    url = base_url(service)
    call = FakeCall("caller-1")
    service.registry.admit(call)

    stopped = service.stopService()  # what SIGTERM does under twistd
    assert service.stopService() is stopped, "a second stop request joins the first"
    assert not stopped.called
    response = await treq.get(url + "/ready")
    ready = await response.json()
    assert response.code == 503
    assert "calls: 1 active call(s); not taking new calls" in ready["reasons"]
    health = await (await treq.get(url + "/health")).json()
    assert health["status"] == "draining" and health["active_calls"] == 1

    service.registry.discard(call.call_id)  # the caller hangs up
    await stopped
    assert call.released == [], "a call that ended by itself is not cut off"
    assert service.web.port is None


@pytest_twisted.ensureDeferred
async def test_drain_timeout_releases_remaining_calls():
    config = loopback_config()
    config = dataclasses.replace(config, calls=dataclasses.replace(config.calls, drain_timeout=0.2))
    service = start(config)
    call = FakeCall("caller-2")
    service.registry.admit(call)
    await service.stopService()
    assert call.released == ["shutdown"]
    assert len(service.registry) == 0


def test_port_in_use_is_one_clear_error_and_leaves_nothing_bound():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = loopback_config()
        config = dataclasses.replace(config, web=dataclasses.replace(config.web, port=port))
        service = AgentService(config, reactor)
        with pytest.raises(StartupError) as info:
            service.privilegedStartService()
        message = str(info.value)
        assert message.startswith(f"cannot listen for the web site on tcp (HEALTH_HOST/HEALTH_PORT): 127.0.0.1:{port}:")
        assert "Address already in use" in message
        # The RTP listener bound before the failure was released again.
        assert service.media.rtp_port is None
