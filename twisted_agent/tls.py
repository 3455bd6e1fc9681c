"""TLS for connections to Asterisk (https:// for REST and wss:// for events) and to Redis (rediss://).

Asterisk and a private Redis often run with a self-signed or private-CA certificate;
``ARI_TLS_CA_FILE`` and ``REDIS_TLS_CA_FILE`` name the PEM file to trust instead of the system
store. Verification is never switched off.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from treq.client import HTTPClient
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twisted_agent.config import ARIConfig

if TYPE_CHECKING:  # the interface is public in use, private in where it lives
    from twisted.internet._sslverify import IOpenSSLTrustRoot


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def tls_failure(e: BaseException) -> str:
    """What went wrong in a TLS handshake, in words: "certificate verify failed" rather than
    pyOpenSSL's ``Error: [('SSL routines', '', 'certificate verify failed')]``."""
    errors = e.args[0] if e.args else None
    if isinstance(errors, list) and errors and all(isinstance(x, tuple) and len(x) == 3 for x in errors):
        reasons = [str(x[2]) for x in errors if x[2]]
        if reasons:
            return "; ".join(reasons)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """Every certificate in the PEM file (a chain or a bundle), trusted together."""
    with open(ca_file, "rb") as stream:
        blocks = _PEM_BLOCK.findall(stream.read())
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


@implementer(IPolicyForHTTPS)
class TrustFilePolicy:
    """Verify servers against the certificate in one PEM file (host names are still checked)."""

    def __init__(self, ca_file: str) -> None:
        self._root = load_trust_root(ca_file)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def client_tls_options(config: ARIConfig, hostname: str) -> IOpenSSLClientConnectionCreator:
    """TLS options for a connection to Asterisk (e.g. the wss:// events socket)."""
    if config.tls_ca_file:
        return optionsForClientTLS(hostname, trustRoot=load_trust_root(config.tls_ca_file))
    return optionsForClientTLS(hostname)


def https_policy(config: ARIConfig) -> IPolicyForHTTPS:
    return TrustFilePolicy(config.tls_ca_file) if config.tls_ca_file else BrowserLikePolicyForHTTPS()


def ari_http_client(reactor: Any, config: ARIConfig, persistent: bool = True) -> HTTPClient:
    """A treq client for ARI REST with the configured trust and a connection pool."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    return HTTPClient(Agent(reactor, contextFactory=https_policy(config), pool=pool))
