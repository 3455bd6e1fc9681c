"""``ai-agent check``: is this machine ready to run the agent, and if not, what to do.

Every line is a result and, when something is wrong, a one-line fix. Nothing here changes the
machine: ports are bound and released at once, ARI is only read.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogPublisher
from twisted.web.client import ResponseNeverReceived

from twisted_agent.config import SETTINGS_BY_KEY, AgentConfig, secret_file_is_private
from twisted_agent.providers.readiness import ProviderCatalog
from twisted_agent.store.redis_link import RedisLink
from twisted_agent.tls import ari_http_client

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    summary: str
    fix: str = ""


def format_results(results: list[CheckResult]) -> str:
    lines = []
    for r in results:
        lines.append(f"[{r.status:^4}] {r.name:<12} {r.summary}")
        if r.fix:
            lines.append(f"{'':19}fix: {r.fix}")
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    lines.append(f"{failed} failed, {warned} warnings" if failed or warned else "all checks passed")
    return "\n".join(lines)


# --- ARI ------------------------------------------------------------------------------------


async def check_ari(config: AgentConfig, reactor: Any, http: Any = None) -> list[CheckResult]:
    ari = config.ari
    if http is None:
        http = ari_http_client(reactor, ari, persistent=False)
    timeout = min(ari.request_timeout, 5.0)
    auth = (ari.username, ari.password)
    url = ari.url
    try:
        response = await _bounded(http.get(f"{url}/asterisk/info", auth=auth, timeout=timeout), timeout, reactor)
    except Exception as e:  # every way of not answering ends up as one line
        return [_unreachable(url, e, timeout)]
    if response.code == 200:
        info = await _bounded(response.json(), timeout, reactor)
        version = (info.get("system") or {}).get("version", "unknown version")
        results = [CheckResult("ari", OK, f"Asterisk {version} answers at {url} as user {ari.username!r}")]
    else:
        await _bounded(response.content(), timeout, reactor)
        return [_ari_http_error(config, response.code)]

    app = ari.app
    response = await _bounded(http.get(f"{url}/applications/{quote(app, safe='')}", auth=auth, timeout=timeout),
                              timeout, reactor)
    await _bounded(response.content(), timeout, reactor)
    if response.code == 200:
        results.append(CheckResult(
            "ari app", INFO, f"Stasis app {app!r} is registered: an ARI client (a running engine?) holds it now",
            "if that is not this engine, another client will lose the app when the engine connects "
            "(ApplicationReplaced)"))
    elif response.code == 404:
        results.append(CheckResult(
            "ari app", OK, f"Stasis app {app!r} is free; it registers when the engine connects",
            ""))
    else:
        results.append(CheckResult("ari app", WARN, f"cannot look up Stasis app {app!r}: HTTP {response.code}", ""))
    return results


def _bounded(d: Deferred[Any], timeout: float, reactor: Any) -> Deferred[Any]:
    # treq's timeout covers the headers only: bound the body too
    d.addTimeout(timeout + 1, reactor)
    return d


def _unreachable(url: str, e: Exception, timeout: float) -> CheckResult:
    host = urlsplit(url)
    where = f"{host.hostname}:{host.port or (443 if host.scheme == 'https' else 80)}"
    if isinstance(e, net_error.ConnectionRefusedError):
        problem = f"connection refused at {where}"
        fix = ("start Asterisk and enable its HTTP server (http.conf: enabled=yes, bindaddr and bindport as in "
               "ARI_URL), then `asterisk -rx 'http show status'`")
    elif isinstance(e, net_error.DNSLookupError):
        problem = f"cannot resolve {host.hostname}"
        fix = "fix the host name in ARI_URL, or use the IP address of the Asterisk server"
    elif _timed_out(e):
        problem = f"no answer from {where} within {timeout:g}s"
        fix = "check that a firewall lets this machine reach Asterisk's HTTP port, and http.conf's bindaddr"
    elif "certificate verify failed" in _reason(e):
        problem = f"the TLS certificate of {where} is not trusted ({_reason(e)})"
        fix = ("set ARI_TLS_CA_FILE to Asterisk's certificate (http.conf tlscertfile) or the CA that signed it; "
               "verification stays on")
    elif "VerificationError" in _reason(e) or "hostname" in _reason(e).lower():
        problem = f"the TLS certificate of {where} does not name {host.hostname} ({_reason(e)})"
        fix = "use the host name the certificate was issued for in ARI_URL, or reissue the certificate"
    elif isinstance(e, ResponseNeverReceived) or "SSL" in repr(e):
        problem = f"{where} accepted the connection but did not answer HTTP ({_reason(e)})"
        fix = "check http:// versus https:// in ARI_URL against http.conf (tlsenable, tlsbindaddr)"
    else:
        problem = f"cannot reach {where}: {_reason(e)}"
        fix = "check ARI_URL and that Asterisk's HTTP server is running"
    return CheckResult("ari", FAIL, f"ARI unreachable at {url}: {problem}", fix)


def _timed_out(e: Exception) -> bool:
    """treq's timeout cancels the request: that surfaces as a cancellation, sometimes wrapped."""
    kinds = (TimeoutError, net_error.TimeoutError, CancelledError)
    if isinstance(e, kinds):
        return True
    return any(reason.check(*kinds) for reason in getattr(e, "reasons", ()) or ())


def _reason(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(f"{r.type.__name__}: {r.getErrorMessage()}" for r in reasons)
    return str(e) or type(e).__name__


def _ari_http_error(config: AgentConfig, code: int) -> CheckResult:
    ari = config.ari
    if code == 401:
        if not ari.password:
            return CheckResult("ari", FAIL, f"ARI at {ari.url} asks for a password and ARI_PASSWORD is not set",
                               "set ARI_PASSWORD (or ARI_PASSWORD_FILE) in the service's EnvironmentFile")
        return CheckResult("ari", FAIL, f"ARI at {ari.url} rejected user {ari.username!r} (401)",
                           "ARI_USERNAME/ARI_PASSWORD must match a [user] section of ari.conf with type=user; "
                           "then `asterisk -rx 'module reload res_ari.so'`")
    if code == 403:
        return CheckResult("ari", FAIL, f"ARI at {ari.url} denied access to user {ari.username!r} (403)",
                           "the ari.conf user must not be read_only=yes, and http.conf/ari.conf ACLs must allow "
                           "this machine")
    if code == 404:
        return CheckResult("ari", FAIL, f"no ARI at {ari.url} (404)",
                           "ARI_URL must be http://HOST:PORT[/prefix]/ari as set by http.conf, and ARI must be on: "
                           "ari.conf enabled=yes, `asterisk -rx 'module show like res_ari'`")
    if code == 503:
        return CheckResult("ari", FAIL, f"Asterisk at {ari.url} is not fully booted (503)",
                           "wait for Asterisk to finish starting, then check again")
    return CheckResult("ari", FAIL, f"ARI at {ari.url} answered HTTP {code}",
                       "check the Asterisk log (`asterisk -rvvv`) for errors from res_ari")


# --- ports ----------------------------------------------------------------------------------


def _bind(kind: int, host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP does
        sock.bind((host, port))
        return None
    except OSError as e:
        return e
    finally:
        sock.close()


def _resolve_listen_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return str(socket.getaddrinfo(host, None)[0][4][0])


def check_ports(config: AgentConfig) -> list[CheckResult]:
    media, web = config.media, config.web
    wanted = [
        ("rtp", socket.SOCK_DGRAM, "udp", media.rtp_host, media.rtp_port, "RTP_HOST/RTP_PORT",
         media.transport == "externalmedia"),
        ("audiosocket", socket.SOCK_STREAM, "tcp", media.audiosocket_host, media.audiosocket_port,
         "AUDIOSOCKET_HOST/AUDIOSOCKET_PORT", media.transport == "audiosocket"),
        ("web", socket.SOCK_STREAM, "tcp", web.host, web.port, "HEALTH_HOST/HEALTH_PORT", True),
    ]
    results = []
    for name, kind, proto, host, port, keys, used in wanted:
        where = f"{proto} {host}:{port}"
        try:
            problem = _bind(kind, _resolve_listen_host(host), port)
        except OSError as e:
            problem = e
        if problem is None:
            note = "" if used else f" (not used with AUDIO_TRANSPORT={media.transport})"
            results.append(CheckResult(name, OK if used else INFO, f"{where} can be bound{note}"))
            continue
        if problem.errno == errno.EADDRINUSE:
            fix = (f"stop what holds it (`ss -lntup | grep :{port}`; a running ai-agent holds it too) "
                   f"or change {keys}")
        elif problem.errno == errno.EACCES:
            fix = f"ports below 1024 need privileges: choose another with {keys}"
        elif problem.errno == errno.EADDRNOTAVAIL:
            fix = f"no interface of this machine has address {host}: fix {keys}"
        else:
            fix = f"check {keys}"
        status = FAIL if used else WARN
        results.append(CheckResult(name, status, f"cannot bind {where}: {problem.strerror or problem}", fix))
    return results


def check_media_path(config: AgentConfig) -> list[CheckResult]:
    media = config.media
    results = []
    media_port = media.rtp_port if media.transport == "externalmedia" else media.audiosocket_port
    advertised = f"{media.advertise_host}:{media_port}"
    source = config.sources.get("media.advertise_host", "default")
    ari_host = urlsplit(config.ari.url).hostname or ""
    if ipaddress.ip_address(media.advertise_host).is_loopback and not _is_loopback_host(ari_host):
        results.append(CheckResult("media addr", WARN,
                                   f"Asterisk ({ari_host}) would send media to loopback {advertised}",
                                   "set RTP_ADVERTISE_HOST to this machine's IP as Asterisk sees it"))
    else:
        results.append(CheckResult("media addr", OK, f"Asterisk will send media to {advertised} ({source})"))

    if media.downstream_mode == "file":
        path = media.media_dir
        if not os.path.isdir(path):
            results.append(CheckResult(
                "media dir", FAIL, f"MEDIA_DIR {path} does not exist",
                f"install -d -o ai-agent -g asterisk -m 2750 {path} (the agent writes, Asterisk reads)"))
        elif not os.access(path, os.W_OK | os.X_OK):
            results.append(CheckResult("media dir", FAIL, f"MEDIA_DIR {path} is not writable by this user",
                                       f"chown the directory to the service user: chown ai-agent {path}"))
        else:
            results.append(CheckResult("media dir", OK, f"MEDIA_DIR {path} is writable (Asterisk must read it too)"))
    return results


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_providers(config: AgentConfig) -> list[CheckResult]:
    default = config.calls.default_provider
    results = []
    for name, r in ProviderCatalog(config).readiness().items():
        if r.ready:
            status = OK
        else:
            status = FAIL if name == default else INFO
        label = f"{name} (default)" if name == default else name
        results.append(CheckResult("provider", status, f"{label}: {r.detail}", "" if r.ready else r.fix))
    return results


def check_secrets(config: AgentConfig) -> list[CheckResult]:
    results = []
    for key, path in sorted(config.secret_files.items()):
        if os.path.exists(path) and not secret_file_is_private(path):
            env = SETTINGS_BY_KEY[key].env
            results.append(CheckResult("secrets", WARN, f"{path} ({env}) is readable by every user",
                                       f"chmod 640 {path} and give it to the service user's group"))
    return results


# --- Redis ----------------------------------------------------------------------------------


async def check_redis(config: AgentConfig, reactor: Any, timeout: float = 5.0) -> list[CheckResult]:
    """Connect as the store would (TLS, AUTH, SELECT, PING), once, and say what went wrong."""
    url = config.store.redis_url
    if not url:
        return [CheckResult("store", OK, "in-memory store (REDIS_URL is empty)")]
    ready: Deferred[None] = Deferred()
    link = RedisLink(reactor, url, Logger(observer=LogPublisher()),
                     connected=lambda outage: None if ready.called else ready.callback(None),
                     lost=lambda: None, retry_policy=lambda attempt: 3600.0, ca_file=config.store.tls_ca_file)
    where = link.address.where
    link.start()
    try:
        deadline = reactor.seconds() + timeout
        while not ready.called and not link.last_error and reactor.seconds() < deadline:
            await deferLater(reactor, 0.02, lambda: None)
    finally:
        await link.stop()
    if ready.called:
        return [CheckResult("store", OK, f"Redis answers at {where}")]
    problem = link.last_error or f"no answer within {timeout:g} s"
    return [CheckResult("store", WARN, f"Redis at {where} unusable: {problem}",
                        "start redis-server or fix REDIS_URL (and REDIS_TLS_CA_FILE for rediss://); "
                        "calls still go on, their records wait in memory")]


async def run_checks(config: AgentConfig, reactor: Any, http: Any = None) -> list[CheckResult]:
    results = [CheckResult("config", OK, f"configuration valid ({config.path or 'no file: defaults and environment'})")]
    results += check_secrets(config)
    results += await check_ari(config, reactor, http)
    results += check_ports(config)
    results += check_media_path(config)
    results += await check_redis(config, reactor)
    results += check_providers(config)
    return results
