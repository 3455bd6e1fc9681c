"""The admin UI through HTTP (treq's StubTreq over the engine's whole site), on a Clock, with a
MemoryStore and a fake ICallControl: what an operator, and an attacker, would see."""

from __future__ import annotations

import re
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from tests.web.conftest import (
    EPOCH,
    HASH,
    HOSTILE,
    PAGES,
    PASSWORD,
    SITE,
    BrokenStore,
    FakeControl,
    Site,
    assert_secure,
    case,
    events,
    hidden,
    open_stream,
)
from twisted_agent.calls.timing import TURN_FAILURES
from twisted_agent.store.interfaces import ICallStore, StoreUnavailable
from twisted_agent.web.admin import EventStream
from twisted_agent.web.auth import hash_password
from twisted_agent.web.interfaces import ICallControl
from twisted_agent.web.pages import TURN_FAILURE_TEXTS


def test_the_fakes_match_their_interfaces(site: Site) -> None:
    assert verifyObject(ICallControl, FakeControl()) and verifyObject(ICallStore, site.store)


# --- disabled until a password hash is set -------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/admin/"), ("GET", "/admin/login"), ("POST", "/admin/login"), ("POST", "/admin/logout"),
    ("GET", "/admin/history"), ("GET", "/admin/config"), ("GET", "/admin/calls/x"), ("GET", "/admin/events"),
    ("POST", "/admin/calls/x/hangup"), ("GET", "/admin/calls/x/events"), ("GET", "/admin/no-such-page"),
])
def test_without_a_password_hash_every_page_says_how_to_enable_it(method: str, path: str) -> None:
    site = Site({"ADMIN_PASSWORD_HASH": ""})
    reply = site.browser().request(method, path, data={"password": ""} if method == "POST" else None)
    assert reply.code == 503
    assert "ai-agent admin-password" in reply.text and "ADMIN_PASSWORD_HASH" in reply.text
    assert "There is no default password" in reply.text
    assert_secure(reply)
    assert "set-cookie" not in {k.decode().lower() for k, _ in reply.headers.getAllRawHeaders()}


def test_a_malformed_hash_keeps_it_disabled_and_says_so_in_the_log() -> None:
    with capturedLogs() as logged:
        site = Site({"ADMIN_PASSWORD_HASH": "scrypt$16384$8$1$c2FsdA==$not-base64!"})
    lines = [formatEvent(event) for event in logged]
    assert any("ADMIN_PASSWORD_HASH is malformed" in line and "disabled" in line for line in lines), lines
    assert not any("not-base64" in line for line in lines), "the value itself is never logged"
    reply = site.browser().get("/admin/login")
    assert reply.code == 503 and "malformed" in reply.text


# --- logging in --------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_and_logged_without_the_password(site: Site) -> None:
    browser = site.browser("198.51.100.7")
    with capturedLogs() as logged:
        reply = browser.login("open sesame 43")
    assert reply.code == 401 and "Wrong password." in reply.text
    assert "ai_agent_session" not in browser.cookies
    lines = [formatEvent(event) for event in logged]
    assert any("admin login failed from 198.51.100.7" in line for line in lines), lines
    assert not any("open sesame" in line for line in lines)
    assert browser.get("/admin/").code == 303


def test_the_right_password_gives_a_strict_http_only_session_cookie(site: Site) -> None:
    browser = site.browser()
    form = browser.get("/admin/login")
    assert form.code == 200 and 'type="password"' in form.text
    login_cookie = form.cookies()["ai_agent_login"]
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie and "Path=/admin" in login_cookie
    reply = browser.post("/admin/login", {"password": PASSWORD, "csrf": hidden(form.text, "csrf"), "next": ""})
    assert (reply.code, reply.header("location")) == (303, "/admin/")
    cookie = reply.cookies()["ai_agent_session"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie
    assert "Max-Age=0" in reply.cookies()["ai_agent_login"], "the pre-session token is spent"
    page = browser.get("/admin/")
    assert page.code == 200 and "Live calls" in page.text


def test_secure_cookies_when_configured_and_a_default_cost_hash() -> None:
    site = Site({"ADMIN_COOKIE_SECURE": "true", "ADMIN_PASSWORD_HASH": hash_password("slow but fine")})
    browser = site.browser()  # it sends Secure cookies over plain HTTP, which a browser would not
    assert "; Secure" in browser.get("/admin/login").cookies()["ai_agent_login"]
    assert "; Secure" in browser.login("slow but fine").cookies()["ai_agent_session"]


def test_login_needs_its_form_token(site: Site) -> None:
    browser = site.browser()
    browser.get("/admin/login")
    assert browser.post("/admin/login", {"password": PASSWORD}).code == 403
    assert browser.post("/admin/login", {"password": PASSWORD, "csrf": "guess"}).code == 403
    stranger = site.browser()  # a forged cross-site form: no login cookie at all
    token = hidden(browser.get("/admin/login").text, "csrf")
    assert stranger.post("/admin/login", {"password": PASSWORD, "csrf": token}).code == 403
    assert "ai_agent_session" not in browser.cookies and "ai_agent_session" not in stranger.cookies


def test_login_goes_back_to_the_page_asked_for_and_nowhere_else(site: Site) -> None:
    browser = site.browser()
    location = browser.get("/admin/calls/1767225600.1").header("location") or ""
    next_path = parse_qs(urlsplit(location).query)["next"][0]
    assert location.startswith("/admin/login?") and next_path == "/admin/calls/1767225600.1"
    assert browser.login(next_path=next_path).header("location") == "/admin/calls/1767225600.1"
    for evil in ("https://evil.example/", "//evil.example/admin/", "/admin/\\\\evil.example"):
        assert site.browser().login(next_path=evil).header("location") == "/admin/"


def test_a_new_session_id_on_every_login(site: Site) -> None:
    browser = site.browser()
    browser.cookies["ai_agent_session"] = "chosen-by-an-attacker"
    browser.login()
    first = browser.cookies["ai_agent_session"]
    assert first != "chosen-by-an-attacker"
    # logging in again while logged in (the form is fetched without the session: logged in, it redirects)
    del browser.cookies["ai_agent_session"]
    form = browser.get("/admin/login")
    browser.cookies["ai_agent_session"] = first
    assert browser.post("/admin/login", {"password": PASSWORD, "csrf": hidden(form.text, "csrf")}).code == 303
    second = browser.cookies["ai_agent_session"]
    assert second != first
    old = site.browser()
    old.cookies["ai_agent_session"] = first
    assert old.get("/admin/").code == 303, "logging in again ended the old session"


def test_logout_ends_the_session_on_the_server(site: Site) -> None:
    browser = site.logged_in()
    token = browser.cookies["ai_agent_session"]
    reply = browser.post("/admin/logout", {"csrf": browser.csrf()})
    assert (reply.code, reply.header("location")) == (303, "/admin/login")
    assert "Max-Age=0" in reply.cookies()["ai_agent_session"]
    replay = site.browser()
    replay.cookies["ai_agent_session"] = token
    assert replay.get("/admin/").code == 303
    assert replay.get("/admin/events").code == 401


def test_sessions_end_after_the_idle_time(site: Site) -> None:
    site = Site({"ADMIN_SESSION_HOURS": "1"})
    browser = site.logged_in()
    for _ in range(3):
        site.clock.advance(3000)
        assert browser.get("/admin/history").code == 200, "each request restarts the idle timer"
    site.clock.advance(3601)
    assert browser.get("/admin/").code == 303


# --- the login rate limit ----------------------------------------------------------------------


def test_five_failures_then_429_even_for_the_right_password(site: Site) -> None:
    browser = site.browser("203.0.113.5")
    for _ in range(5):
        assert browser.login("wrong").code == 401
    with capturedLogs() as logged:
        reply = browser.login(PASSWORD)
    assert (reply.code, reply.header("retry-after")) == (429, "900") and "Too many failed attempts" in reply.text
    assert "ai_agent_session" not in browser.cookies
    assert any("refused unchecked" in formatEvent(e) for e in logged)
    assert site.browser("203.0.113.6").login().code == 303, "another address may still log in"
    site.clock.advance(900)
    assert browser.login(PASSWORD).code == 303


def test_a_global_cap_when_the_guesses_come_from_everywhere(site: Site) -> None:
    for n in range(50):
        assert site.browser(f"10.1.0.{n}").login("wrong").code == 401
    assert site.browser("10.2.0.1").login().code == 429


def test_behind_a_local_proxy_its_last_forwarded_address_counts(site: Site) -> None:
    # StubTreq's peer is 127.0.0.1, like a local proxy's (test_auth: the header is ignored from elsewhere)
    browser = site.browser("203.0.113.9, 127.0.0.1")
    for _ in range(5):
        browser.login("wrong")
    assert site.browser("127.0.0.1").login().code == 429, "the proxy's last entry is the counted address"


# --- pages need a login -------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_pages_send_strangers_to_the_login_form(site: Site, path: str) -> None:
    reply = site.browser().get(path)
    assert reply.code == 303 and (reply.header("location") or "").startswith("/admin/login?next=")
    assert_secure(reply)


@pytest.mark.parametrize("path", ["/admin/events", "/admin/calls/1767225600.1/events"])
def test_live_updates_answer_strangers_401(site: Site, path: str) -> None:
    reply = site.browser().get(path)
    assert reply.code == 401
    assert_secure(reply)


def test_actions_refuse_strangers(site: Site) -> None:
    site.live_call()
    stranger = site.browser()
    assert stranger.post("/admin/calls/1767225600.1/hangup", {"csrf": "x"}).code == 403
    assert stranger.post("/admin/logout", {"csrf": "x"}).code == 403
    assert site.control.hung_up == []


# --- CSRF and origins on actions ----------------------------------------------------------------


def test_hang_up_needs_the_sessions_csrf_token(site: Site) -> None:
    site.live_call()
    browser = site.logged_in()
    other = site.logged_in()
    with capturedLogs() as logged:
        assert browser.post("/admin/calls/1767225600.1/hangup").code == 403
        assert browser.post("/admin/calls/1767225600.1/hangup", {"csrf": "wrong"}).code == 403
        assert browser.post("/admin/calls/1767225600.1/hangup", {"csrf": other.csrf()}).code == 403
    assert site.control.hung_up == [], "nothing was done"
    assert any("missing or wrong CSRF token" in formatEvent(e) for e in logged)
    reply = browser.post("/admin/calls/1767225600.1/hangup", {"csrf": browser.csrf()})
    assert (reply.code, reply.header("location")) == (303, "/admin/calls/1767225600.1?done=ended")
    assert site.control.hung_up == ["1767225600.1"]
    assert '<p class="flash" role="status">call ended</p>' in browser.get("/admin/calls/1767225600.1?done=ended").text
    assert "flash" not in browser.get("/admin/calls/1767225600.1?done=%3Cb%3E").text, "only known results show"


def test_hang_up_of_an_unknown_call_says_so(site: Site) -> None:
    browser = site.logged_in()
    reply = browser.post("/admin/calls/nope/hangup", {"csrf": browser.csrf()})
    assert site.control.hung_up == ["nope"]
    page = browser.get(reply.header("location") or "")
    assert page.code == 404 and '<p class="flash" role="status">call not found</p>' in page.text


def test_the_csrf_token_may_come_as_a_header(site: Site) -> None:
    site.live_call()
    browser = site.logged_in()
    reply = browser.post("/admin/calls/1767225600.1/hangup", headers={"X-CSRF-Token": browser.csrf()})
    assert reply.code == 303 and site.control.hung_up == ["1767225600.1"]


def test_logout_needs_the_csrf_token(site: Site) -> None:
    browser = site.logged_in()
    assert browser.post("/admin/logout").code == 403
    assert browser.post("/admin/logout", {"csrf": "wrong"}).code == 403
    assert browser.get("/admin/").code == 200, "still logged in"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:15001", "null"])
def test_a_foreign_origin_is_refused(site: Site, origin: str) -> None:
    site.live_call()
    browser = site.logged_in()
    token = browser.csrf()
    reply = browser.post("/admin/calls/1767225600.1/hangup", {"csrf": token}, headers={"Origin": origin})
    assert reply.code == 403 and "cross-site" in reply.text
    assert browser.post("/admin/logout", {"csrf": token}, headers={"Origin": origin}).code == 403
    assert site.control.hung_up == []
    fresh = site.browser()
    form = fresh.get("/admin/login")
    refused = fresh.post("/admin/login", {"password": PASSWORD, "csrf": hidden(form.text, "csrf")},
                         headers={"Origin": origin})
    assert refused.code == 403 and "ai_agent_session" not in fresh.cookies
    ok = browser.post("/admin/calls/1767225600.1/hangup", {"csrf": token}, headers={"Origin": SITE})
    assert ok.code == 303 and site.control.hung_up == ["1767225600.1"]


def test_the_proxys_host_is_this_site(site: Site) -> None:
    site.live_call()
    browser = site.logged_in()
    reply = browser.post("/admin/calls/1767225600.1/hangup", {"csrf": browser.csrf()},
                         headers={"Origin": "https://pbx.example.com", "X-Forwarded-Host": "pbx.example.com"})
    assert reply.code == 303


# --- what the pages show ------------------------------------------------------------------------


def test_the_live_table(site: Site) -> None:
    site.live_call(last_turn={"voice_to_voice_ms": 812.4}, state="speaking")
    page = site.logged_in().get("/admin/")
    assert page.code == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    row = re.search(r'<tbody id="live-calls"[^>]*>(.*)</tbody>', page.text)
    assert row
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells == ['<a href="/admin/calls/1767225600.1">+15550001</a><span class="name">Ada</span>', "engine-a",
                     "echo", "sales", '<span class="state speaking">speaking</span>', "1:15", "812 ms"]
    assert '<strong id="cluster-active">1</strong>' in page.text
    assert 'hidden="hidden">No call in progress.' in page.text


def test_no_live_call(site: Site) -> None:
    page = site.logged_in().get("/admin/")
    assert '<p id="no-calls" class="empty">No call in progress.</p>' in page.text


def test_a_live_call_page(site: Site) -> None:
    site.live_call(turns=[{"turn_end_wait_ms": 500.0, "provider_stt_ms": 120.0, "provider_llm_first_token_ms": 300.0,
                           "provider_tts_first_sentence_ms": 80.0, "voice_to_voice_ms": 1000.0,
                           "after_turn_end_ms": 500.0}, {"voice_to_voice_ms": 400.0}],
                   transcript=[{"speaker": "agent", "text": "Hello, how can I help you?"},
                               {"speaker": "caller", "text": "Opening hours?"}])
    page = site.logged_in().get("/admin/calls/1767225600.1")
    text = page.text
    assert page.code == 200
    assert "<dd>echo (channel variable)</dd>" in text and "<dd>sales (context)</dd>" in text
    assert '<span id="call-state" class="state listening">listening</span>' in text
    assert "<dd>2025-12-31 23:58:45 UTC</dd>" in text
    assert '<dd><span class="duration" data-started="1767225525.0">1:15</span></dd>' in text
    assert text.index("Hello, how can I help you?") < text.index("Opening hours?")
    assert 'action="/admin/calls/1767225600.1/hangup"' in text and ">Hang up</button>" in text
    assert hidden(text, "csrf")
    assert 'data-live="1"' in text and 'data-events="/admin/calls/1767225600.1/events"' in text
    bars = re.findall(r'<rect x="([\d.]+)" y="0" width="([\d.]+)" height="1" class="bar (\w+)"', text)
    assert bars == [("0.0", "50.0", "turn_end_wait_ms"), ("50.0", "12.0", "provider_stt_ms"),
                    ("62.0", "30.0", "provider_llm_first_token_ms"), ("92.0", "8.0", "provider_tts_first_sentence_ms"),
                    ("0.0", "100.0", "voice_to_voice_ms"), ("0.0", "40.0", "voice_to_voice_ms")]
    assert "after_turn_end_ms: 500 ms" in text


def test_the_queue_stage_and_a_turn_that_got_the_apology_on_the_call_page(site: Site) -> None:
    site.live_call(turns=[
        {"turn_end_wait_ms": 500.0, "queue_ms": 1500.0, "provider_stt_ms": 200.0, "voice_to_voice_ms": 4000.0},
        {"turn_end_wait_ms": 500.0, "failed": "queue_timeout", "failed_after_ms": 5000.0}])
    text = site.logged_in().get("/admin/calls/1767225600.1").text
    bars = re.findall(r'<rect x="([\d.]+)" y="0" width="([\d.]+)" height="1" class="bar (\w+)"', text)
    assert bars == [("0.0", "10.0", "turn_end_wait_ms"), ("10.0", "30.0", "queue_ms"),
                    ("40.0", "4.0", "provider_stt_ms"), ("0.0", "80.0", "voice_to_voice_ms"),
                    ("0.0", "10.0", "turn_end_wait_ms"), ("0.0", "100.0", "failed_after_ms")]
    assert '<th scope="row">queue</th>' in text and '<th scope="row">apology after</th>' in text
    first, second = text.split("<h3>Turn 2</h3>")
    assert "No answer" not in first
    assert ('<p class="failed">No answer: the caller heard the apology; its work waited too long for the shared '
            "models (QUEUE_TIMEOUT).</p>") in second
    stub, chunks, _ = open_stream(site, site.logged_in(), "/admin/calls/1767225600.1/events")
    turns = events(chunks)[0]["waterfall"]["turns"]
    assert [turn["failed"] for turn in turns] == ["", "its work waited too long for the shared models (QUEUE_TIMEOUT)"]
    assert [bar["key"] for bar in turns[0]["bars"]][:3] == ["turn_end_wait_ms", "queue_ms", "provider_stt_ms"]
    assert set(TURN_FAILURE_TEXTS) == set(TURN_FAILURES), "every reason a turn can fail for is explained"


def test_a_finished_call_page(site: Site) -> None:
    site.finished_call("c-old", EPOCH - 3600)
    page = site.logged_in().get("/admin/calls/c-old")
    text = page.text
    for shown in ("<dd>completed</dd>", "<dd>caller hung up</dd>", "<dd>16 Normal Clearing</dd>", "<dd>0:30</dd>",
                  "<dd>2025-12-31 23:00:00 UTC</dd>", "<dd>2025-12-31 23:00:30 UTC</dd>",
                  '<th scope="row">rtp.packets_in</th><td>1500</td>', "pacer.p99_ms"):
        assert shown in text, shown
    assert ">Hang up</button>" not in text and 'data-live="0"' in text
    assert "No turn measured yet." in text


def test_an_unknown_call_is_404(site: Site) -> None:
    page = site.logged_in().get("/admin/calls/nope")
    assert page.code == 404 and "No call 'nope' is live or in the history" in page.text


def test_hostile_text_is_escaped_on_every_page(site: Site) -> None:
    site.live_call(caller_name=HOSTILE, caller_number=f'"><img src=x onerror=alert(1)>{HOSTILE}',
                   context=HOSTILE, transcript=[{"speaker": "caller", "text": HOSTILE}],
                   last_turn={"voice_to_voice_ms": 1.0}, turns=[{HOSTILE: 3.0}])
    site.finished_call("done", EPOCH - 60, end_reason=HOSTILE, outcome=HOSTILE, hangup_cause=HOSTILE,
                       caller_number=HOSTILE)
    site.store.call_updated({**site.live_call("evil"), "call_id": "evil", "caller_name": HOSTILE})
    browser = site.logged_in()
    for path in ("/admin/", "/admin/calls/1767225600.1", "/admin/calls/done", "/admin/history",
                 "/admin/history?number=" + "%3Cscript%3E", "/admin/calls/%3Cscript%3Ealert(1)%3C%2Fscript%3E"):
        page = browser.get(path)
        assert "<script>alert" not in page.text and "<img" not in page.text, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.get("/admin/calls/1767225600.1").text


def test_no_inline_script_or_style_anywhere(site: Site) -> None:
    # the CSP forbids them: a page relying on one would silently break
    site.live_call(turns=[{"voice_to_voice_ms": 10.0}])
    site.finished_call("done", EPOCH - 60)
    browser = site.logged_in()
    for path in (*PAGES, "/admin/calls/done", "/admin/login"):
        text = browser.get(path).text
        assert re.findall(r"<script(?![^>]*\bsrc=)", text) == [], path
        assert " style=" not in text and "<style" not in text and not re.search(r"\son\w+=", text), path


def test_the_configuration_page_masks_every_secret() -> None:
    secrets = {"ARI_PASSWORD": "ari-secret-value-1", "REDIS_URL": "redis://:redis-secret-value-2@127.0.0.1:6379/0",
               "DEEPGRAM_API_KEY": "dg-secret-value-3", "OPENAI_API_KEY": "sk-secret-value-4"}
    site = Site({**secrets, "RTP_PORT": "4000"})
    text = site.logged_in().get("/admin/config").text
    for value in [*secrets.values(), "redis-secret-value-2", HASH, *HASH.split("$")[4:]]:  # salt and key too
        assert value not in text, value
    assert "redis://:****@127.0.0.1:6379/0" in text
    assert re.search(r"<tr><td><code>media.rtp_port</code></td><td><code>RTP_PORT</code></td>"
                     r'<td class="value">4000</td><td class="source environment">environment</td></tr>', text)
    assert '<td class="source default">default</td>' in text
    assert "channel variables of the same name" in text and "AI_CONTEXT" in text


def test_history_search(site: Site) -> None:
    site.finished_call("jan1-a", EPOCH + 10, number="+15550001")
    site.finished_call("jan1-b", EPOCH + 86399, number="+15559999")
    site.finished_call("jan2", EPOCH + 86400 + 5, number="+15550001")
    site.finished_call("dec31", EPOCH - 5, number="+15550002")
    browser = site.logged_in()

    def found(query: str) -> list[str]:
        page = browser.get("/admin/history" + query)
        assert page.code == 200, page.text
        return re.findall(r'href="/admin/calls/([^"]+)"', page.text)

    assert found("") == ["dec31", "jan2", "jan1-b", "jan1-a"], "newest to end first"
    assert found("?number=0001") == ["jan2", "jan1-a"]
    assert found("?from=2026-01-01&to=2026-01-01") == ["jan1-b", "jan1-a"], "the last day is included whole"
    assert found("?from=2026-01-02") == ["jan2"]
    assert found("?to=2025-12-31") == ["dec31"]
    assert found("?limit=2") == ["dec31", "jan2"]
    page = browser.get("/admin/history?number=0001&from=2026-01-01")
    assert 'value="0001"' in page.text and 'value="2026-01-01"' in page.text, "the form keeps what was typed"


@pytest.mark.parametrize("query,message", [
    ("?from=yesterday", "from: 'yesterday' is not a date; use YYYY-MM-DD"),
    ("?to=2026-02-30", "is not a date"), ("?from=2026-01-02&to=2026-01-01", "the first day is after the last"),
    ("?limit=many", "is not a whole number"), ("?limit=0", "choose 1 to 1000"),
])
def test_history_search_explains_bad_input(site: Site, query: str, message: str) -> None:
    page = site.logged_in().get("/admin/history" + query)
    assert page.code == 400 and message in page.text and 'class="search"' in page.text


def test_store_failures_are_explained_not_traced() -> None:
    site = Site(store_class=BrokenStore)
    browser = site.logged_in()
    for path, message in (("/admin/history", "history unavailable: redis: connection refused"),
                          ("/admin/", "live calls unavailable: redis: connection refused"),
                          ("/admin/calls/x", "call unavailable: redis: connection refused")):
        reply = browser.get(path)
        assert reply.code == 503 and message in reply.text and "Traceback" not in reply.text


def test_a_store_that_never_answers_is_unavailable_after_a_while(site: Site) -> None:
    site.store.history = lambda *a, **kw: Deferred()  # type: ignore[method-assign]
    browser = site.logged_in()
    stub = cast(Any, StubTreq(site.resource))
    cookie = f"ai_agent_session={browser.cookies['ai_agent_session']}"
    pending = stub.get(SITE + "/admin/history", headers={"Cookie": cookie})
    case.assertNoResult(pending)
    site.clock.advance(5)
    stub.flush()
    reply = case.successResultOf(pending)
    assert reply.code == 503 and b"the store did not answer within 5 s" in case.successResultOf(reply.content())


def test_an_unexpected_error_is_a_plain_500_and_a_log_entry(site: Site) -> None:
    def broken() -> Deferred[list[dict[str, Any]]]:
        raise RuntimeError("bug with a secret detail")

    site.store.live_calls = broken  # type: ignore[method-assign]
    browser = site.logged_in()
    with capturedLogs() as logged:
        reply = browser.get("/admin/")
    assert reply.code == 500 and "Something went wrong" in reply.text
    assert "Traceback" not in reply.text and "secret detail" not in reply.text
    assert_secure(reply)
    assert any(event.get("log_failure") is not None for event in logged)


def test_unknown_pages_and_methods(site: Site) -> None:
    browser = site.logged_in()
    missing = browser.get("/admin/nothing-here")
    assert missing.code == 404 and "no such admin page" in missing.text
    assert_secure(missing)
    assert browser.get("/admin/logout").code == 405


def test_static_files_are_served_without_login(site: Site) -> None:
    browser = site.browser()
    js, css = browser.get("/admin/static/admin.js"), browser.get("/admin/static/admin.css")
    assert (js.code, js.header("content-type")) == (200, "text/javascript; charset=utf-8") and "EventSource" in js.text
    assert (css.code, css.header("content-type")) == (200, "text/css; charset=utf-8")
    assert_secure(css)
    assert browser.get("/admin/static/../admin.py").code == browser.get("/admin/static/other.js").code == 404


def test_navigation_and_logout_on_every_page(site: Site) -> None:
    site.live_call()
    browser = site.logged_in()
    for path in PAGES:
        text = browser.get(path).text
        assert all(f'href="/admin/{page}"' in text for page in ("", "history", "config")), path
        assert 'action="/admin/logout"' in text and hidden(text, "csrf")


# --- live updates (Server-Sent Events) ----------------------------------------------------------


def test_the_live_events_stream_sends_the_calls_when_they_change(site: Site) -> None:
    site.live_call(caller_name=HOSTILE, last_turn={"voice_to_voice_ms": 640.0})
    browser = site.logged_in()
    stub, chunks, _ = open_stream(site, browser, "/admin/events")
    [first] = events(chunks)
    assert first == {"cluster_active": 1, "now": EPOCH, "calls": [{
        "call_id": "1767225600.1", "href": "/admin/calls/1767225600.1", "caller_number": "+15550001",
        "caller_name": HOSTILE, "engine_id": "engine-a", "provider": "echo", "context": "sales",
        "state": "listening", "started_at": EPOCH - 75, "voice_to_voice_ms": 640.0}]}
    site.clock.advance(2)
    stub.flush()
    assert len(events(chunks)) == 1, "nothing changed, nothing sent"
    site.live_call("second", state="thinking")
    site.clock.advance(0.5)
    stub.flush()
    latest = events(chunks)[-1]
    assert [c["call_id"] for c in latest["calls"]] == ["1767225600.1", "second"] and latest["cluster_active"] == 2
    site.clock.advance(15)
    stub.flush()
    assert b": keep-alive\n\n" in b"".join(chunks)


def test_the_call_events_stream_grows_the_transcript(site: Site) -> None:
    record = site.live_call()
    browser = site.logged_in()
    stub, chunks, _ = open_stream(site, browser, "/admin/calls/1767225600.1/events")
    assert [t["text"] for t in events(chunks)[0]["transcript"]] == ["Hello, how can I help you?"]
    site.store.call_updated({**record, "state": "thinking", "transcript": [
        *record["transcript"], {"speaker": "caller", "text": "Hi there"}], "turns": [{"voice_to_voice_ms": 900.0}]})
    site.clock.advance(0.5)
    stub.flush()
    latest = events(chunks)[-1]
    assert latest["state"] == "thinking" and latest["transcript"][-1] == {"speaker": "caller", "text": "Hi there"}
    assert latest["waterfall"]["turns"][0]["bars"][0]["key"] == "voice_to_voice_ms"
    assert latest["ended"] is False
    site.store.call_finished({**record, "ended_at": EPOCH, "state": "ended"})
    site.clock.advance(0.5)
    stub.flush()
    assert events(chunks)[-1]["ended"] is True


def test_logging_out_stops_the_sessions_streams(site: Site) -> None:
    browser = site.logged_in()
    stub, chunks, ended = open_stream(site, browser, "/admin/events")
    browser.post("/admin/logout", {"csrf": browser.csrf()})
    site.clock.advance(0.5)
    stub.flush()
    assert site.clock.getDelayedCalls() == [], "the poll loop ended"
    case.successResultOf(ended)  # and the response with it


def test_the_event_stream_stops_cleanly() -> None:
    clock = Clock()
    written: list[bytes] = []
    state = {"n": 1}
    stream = EventStream(clock, lambda: succeed(dict(state)), written.append)
    done = stream.start()
    clock.advance(0.5)
    assert written == [b'data: {"n": 1, "now": 0.0}\n\n']
    state["n"] = 2
    clock.advance(0.5)
    assert written[-1] == b'data: {"n": 2, "now": 1.0}\n\n'
    done.cancel()  # what Klein does when the client goes away
    assert stream.stopped and clock.getDelayedCalls() == []
    case.successResultOf(done)
    state["n"] = 3
    clock.advance(5)
    assert len(written) == 2


def test_the_event_stream_reports_store_trouble_once_and_recovers() -> None:
    clock = Clock()
    written: list[bytes] = []
    answers: list[Deferred[Any]] = [fail(RuntimeError("bug")), fail(RuntimeError("bug")),
                                    fail(StoreUnavailable("redis down")), succeed({"calls": []})]
    stream = EventStream(clock, lambda: answers.pop(0), written.append)
    with capturedLogs() as logged:
        stream.start()
        clock.pump([0.5] * 3)
    assert written == [b'event: problem\ndata: {"error": "bug", "now": 0.0}\n\n',
                       b'event: problem\ndata: {"error": "redis down", "now": 1.0}\n\n',
                       b'data: {"calls": [], "now": 1.5}\n\n']
    assert len([e for e in logged if e.get("log_failure")]) == 1, "a bug is logged once, Redis being down not at all"
    stream.stop()


def test_the_event_stream_waits_for_a_slow_read_and_stops_on_a_dead_connection() -> None:
    clock = Clock()
    slow: Deferred[Any] = Deferred()
    reads: list[Deferred[Any]] = []

    def write(data: bytes) -> None:
        raise RuntimeError("Request.write called on a request after Request.finish was called.")

    def snapshot() -> Deferred[Any]:
        reads.append(slow)
        return slow

    stream = EventStream(clock, snapshot, write)
    stream.start()
    clock.advance(3)
    assert len(reads) == 1, "one read at a time"
    slow.callback({"x": 1})
    assert stream.stopped and clock.getDelayedCalls() == []
