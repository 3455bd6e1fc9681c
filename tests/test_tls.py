"""https:// and wss:// to Asterisk work, with verification, including private CAs."""

from __future__ import annotations

from typing import Any, cast

import pytest
import pytest_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.interfaces import IReactorSSL
from twisted.web.server import Site

from tests.pki import make_pki
from tests.test_check import FakeARI
from twisted_agent import check
from twisted_agent.config import load_config
from twisted_agent.listening import address, stop_listening
from twisted_agent.tls import client_tls_options


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, Any]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def listen_tls(factory: Any, pki: dict[str, Any]) -> Any:
    ssl: IReactorSSL = cast(IReactorSSL, reactor)
    return ssl.listenSSL(0, factory, pki["server_options"], interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_https_ari_with_private_ca(pki):
    port = listen_tls(Site(FakeARI().app.resource()), pki)
    try:
        url = f"https://127.0.0.1:{address(port)[1]}/ari"
        trusted = load_config(None, {"ARI_URL": url, "ARI_PASSWORD": "pw", "ARI_TLS_CA_FILE": pki["ca_file"]})
        results = await check.check_ari(trusted, reactor)
        assert [r.status for r in results] == ["ok", "ok"], results
        bundled = load_config(None, {"ARI_URL": url, "ARI_PASSWORD": "pw", "ARI_TLS_CA_FILE": pki["bundle"]})
        assert [r.status for r in await check.check_ari(bundled, reactor)] == ["ok", "ok"]

        untrusted = load_config(None, {"ARI_URL": url, "ARI_PASSWORD": "pw"})
        results = await check.check_ari(untrusted, reactor)
        assert results[0].status == "FAIL"
        assert "is not trusted" in results[0].summary, results[0].summary
        assert "ARI_TLS_CA_FILE" in results[0].fix
    finally:
        await stop_listening(port)


def test_ca_file_must_be_readable(tmp_path):
    from twisted_agent.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, {"ARI_TLS_CA_FILE": str(tmp_path / "missing.pem")})
    assert str(info.value).startswith("config error: ARI_TLS_CA_FILE (environment)")


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class Once(WebSocketClientProtocol):
    factory: OnceFactory

    def onOpen(self) -> None:
        self.sendMessage(b'{"type":"ping"}')

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.callback(payload)
        self.sendClose()


class OnceFactory(WebSocketClientFactory):
    protocol = Once  # type: ignore[assignment]

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.received: Deferred[bytes] = Deferred()


@pytest_twisted.ensureDeferred
async def test_wss_with_private_ca(pki):
    server = WebSocketServerFactory()
    server.protocol = Echo
    port = listen_tls(server, pki)
    try:
        number = address(port)[1]
        config = load_config(None, {"ARI_TLS_CA_FILE": pki["ca_file"]}).ari
        client = OnceFactory(f"wss://127.0.0.1:{number}/ari/events")
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", number, client_tls_options(config, "127.0.0.1"))
        await endpoint.connect(client)
        assert await client.received.addTimeout(5, reactor) == b'{"type":"ping"}'
    finally:
        await stop_listening(port)
