"""Fixtures of the web tests: the admin UI over StubTreq on a Clock (``site`` and its helpers), and the
whole engine against the simulated Asterisk (``stacks``, from tests/calls) for the real-browser test."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

# the whole engine against the simulated Asterisk, as the call tests have it (for test_browser)
from tests.calls.conftest import stacks  # noqa: F401
from twisted_agent.config import load_config
from twisted_agent.store.interfaces import StoreUnavailable
from twisted_agent.store.memory import MemoryStore
from twisted_agent.web.admin import AdminApp
from twisted_agent.web.app import AgentWebApp
from twisted_agent.web.auth import hash_password
from twisted_agent.web.interfaces import ICallControl

case = SynchronousTestCase()


@pytest.fixture
def site() -> Site:
    return Site()


PASSWORD = "open sesame 42"
#: cheap scrypt parameters: the tests log in often (the default cost is tested in test_auth)
HASH = hash_password(PASSWORD, n=2**4, r=1, p=1)
EPOCH = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
HOSTILE = "<script>alert(1)</script>"
SITE = "http://127.0.0.1:15000"


@implementer(ICallControl)
class FakeControl:
    def __init__(self) -> None:
        self.live: set[str] = set()
        self.hung_up: list[str] = []

    def hang_up(self, call_id: str) -> Deferred[bool]:
        self.hung_up.append(call_id)
        found = call_id in self.live
        self.live.discard(call_id)
        return succeed(found)


class BrokenStore(MemoryStore):
    """Redis down: every read fails the way the interface says."""

    def live_calls(self) -> Deferred[list[dict[str, Any]]]:
        return fail(StoreUnavailable("redis: connection refused"))

    def get_call(self, call_id: str) -> Deferred[dict[str, Any] | None]:
        return fail(StoreUnavailable("redis: connection refused"))

    def history(self, number: str = "", since: float | None = None, until: float | None = None,
                limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        return fail(StoreUnavailable("redis: connection refused"))


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def cookies(self) -> dict[str, str]:
        """Set-Cookie lines by cookie name."""
        return {line.split("=", 1)[0]: line for line in self.headers.getRawHeaders("set-cookie", [])}


class Browser:
    """One visitor: keeps its cookies (as a browser would on this one site) and reads whole replies."""

    def __init__(self, resource: Any, address: str | None = None) -> None:
        self.resource = resource
        self.cookies: dict[str, str] = {}
        #: sent as X-Forwarded-For (StubTreq's peer is 127.0.0.1, as a local proxy's would be)
        self.address = address

    def request(self, method: str, path: str, data: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        sent = {"Host": "127.0.0.1:15000", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if self.address:
            sent["X-Forwarded-For"] = self.address
        stub = cast(Any, StubTreq(self.resource))
        response = case.successResultOf(stub.request(method, SITE + path, data=data, headers=sent,
                                                     allow_redirects=False))
        reply = Reply(response.code, response.headers, case.successResultOf(response.content()))
        for line in response.headers.getRawHeaders("set-cookie", []):
            name, rest = line.split("=", 1)
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in line:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, str] | None = None, **kw: Any) -> Reply:
        return self.request("POST", path, data=data, **kw)

    def login(self, password: str = PASSWORD, next_path: str = "/admin/") -> Reply:
        form = self.get("/admin/login")
        return self.post("/admin/login", {"password": password, "csrf": hidden(form.text, "csrf"),
                                          "next": next_path})

    def csrf(self) -> str:
        return hidden(self.get("/admin/").text, "csrf")


def hidden(html: str, name: str) -> str:
    found = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html)
    assert found, f"no hidden {name} field"
    return found.group(1)


class Site:
    def __init__(self, env: dict[str, str] | None = None, store_class: type[MemoryStore] = MemoryStore) -> None:
        environment = {"ADMIN_PASSWORD_HASH": HASH, **(env or {})}
        self.config = load_config(None, environment, lambda h, p: "127.0.0.1")
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.store = store_class(self.clock, self.config.store, "engine-a")
        self.control = FakeControl()
        self.admin = AdminApp(self.config, self.store, self.control, self.clock)
        # the admin routes do not touch the engine's health: no need to build one
        self.resource = AgentWebApp(cast(Any, None), admin=self.admin).resource()

    def browser(self, address: str | None = None) -> Browser:
        return Browser(self.resource, address)

    def logged_in(self) -> Browser:
        browser = self.browser()
        assert browser.login().code == 303
        return browser

    def live_call(self, call_id: str = "1767225600.1", **fields: Any) -> dict[str, Any]:
        record = {
            "call_id": call_id, "caller_number": "+15550001", "caller_name": "Ada", "provider": "echo",
            "provider_source": "channel variable", "context": "sales", "context_source": "context",
            "state": "listening", "transport": "externalmedia", "downstream_mode": "file",
            "started_at": self.clock.seconds() - 75, "updated_at": self.clock.seconds(),
            "transcript": [{"speaker": "agent", "text": "Hello, how can I help you?"}],
            "turns": [], "last_turn": None, **fields,
        }
        self.store.call_updated(record)
        self.control.live.add(call_id)
        return record

    def finished_call(self, call_id: str, started_at: float, number: str = "+15550001", **fields: Any) -> None:
        record = {**self.live_call(call_id, started_at=started_at, caller_number=number), "state": "ended",
                  "ended_at": started_at + 30, "duration_s": 30.0, "outcome": "completed",
                  "end_reason": "caller hung up", "hangup_cause": "16 Normal Clearing",
                  "media": {"rtp": {"packets_in": 1500, "jitter_ms": 2.5}, "pacer": {"p99_ms": 1.2}}, **fields}
        self.store.call_finished(record)
        self.control.live.discard(call_id)


SECURITY = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
PAGES = ["/admin/", "/admin/history", "/admin/config", "/admin/calls/1767225600.1"]


def assert_secure(reply: Reply) -> None:
    for name, value in SECURITY.items():
        assert reply.header(name) == value, name


# --- live updates (Server-Sent Events) ----------------------------------------------------------


def open_stream(site: Site, browser: Browser, path: str) -> tuple[Any, list[bytes], Deferred[None]]:
    stub = cast(Any, StubTreq(site.resource))
    response = case.successResultOf(stub.get(SITE + path, headers={
        "Cookie": f"ai_agent_session={browser.cookies['ai_agent_session']}"}))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    for name, value in SECURITY.items():
        assert response.headers.getRawHeaders(name) == [value]
    chunks: list[bytes] = []
    ended = treq.collect(response, chunks.append)
    stub.flush()
    return stub, chunks, ended


def events(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line[len(b"data: "):]) for line in b"".join(chunks).split(b"\n") if line.startswith(b"data: ")]
