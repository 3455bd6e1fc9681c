"""The admin UI: thin Klein routes over :mod:`~twisted_agent.web.auth` (who may do what),
:mod:`~twisted_agent.web.pages` (the HTML) and the call store.

Mounted by :class:`~twisted_agent.web.app.AgentWebApp` at /admin/, so the routes here are
relative to it ("/login" is /admin/login). Every response carries a strict Content-Security-Policy
and no-store; every state-changing request needs a CSRF token and a same-site Origin (if any).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from functools import wraps
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlencode

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from twisted_agent.config import AgentConfig
from twisted_agent.config_display import describe
from twisted_agent.store.interfaces import ICallStore, StoreUnavailable
from twisted_agent.web import pages
from twisted_agent.web.auth import (
    LOOPBACK,
    LoginLimiter,
    MalformedHash,
    PasswordHash,
    Session,
    SessionTable,
    client_address,
    local_next,
    new_token,
    origin_allowed,
    tokens_match,
)
from twisted_agent.web.interfaces import ICallControl

T = TypeVar("T")
RunBlocking = Callable[[Callable[[], bool]], "Deferred[bool]"]

SESSION_COOKIE = b"ai_agent_session"
#: the login form's pre-session CSRF token (double submit: cookie and form field must agree)
LOGIN_COOKIE = b"ai_agent_login"
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
STATIC_TYPES = {"admin.js": b"text/javascript; charset=utf-8", "admin.css": b"text/css; charset=utf-8"}
#: a store read slower than this is shown as unavailable instead of hanging the page
STORE_TIMEOUT = 5.0
HANGUP_TIMEOUT = 10.0
POLL_INTERVAL = 0.5
KEEPALIVE_INTERVAL = 15.0


class EventStream:
    """Server-Sent Events of a JSON snapshot: sent when it changes, a comment line when quiet.

    ``snapshot`` is polled every ``interval`` seconds on the clock (one read at a time);
    ``alive`` is asked first, and a False (the session ended) ends the stream. :meth:`start`'s
    Deferred fires when the stream stops; cancelling it stops the stream.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, snapshot: Callable[[], Deferred[Any]], write: Callable[[bytes], None],
                 alive: Callable[[], bool] = lambda: True, interval: float = POLL_INTERVAL,
                 keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self._clock = clock
        self._snapshot = snapshot
        self._write = write
        self._alive = alive
        self._keepalive = keepalive
        self._interval = interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._pending: Deferred[Any] | None = None
        self._last: str | None = None
        self._last_write = clock.seconds()
        self.done: Deferred[None] = Deferred(lambda _: self.stop())
        self.stopped = False

    def start(self) -> Deferred[None]:
        self._loop.start(self._interval, now=True)
        return self.done

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None:
            self._pending.cancel()
        if not self.done.called:
            self.done.callback(None)

    def _tick(self) -> None:
        if not self._alive():
            self.stop()
            return
        if self._clock.seconds() - self._last_write >= self._keepalive:
            self._send(b": keep-alive\n\n")
        if self._pending is not None:
            return
        self._pending = pending = self._snapshot()
        pending.addCallbacks(self._got, self._failed)
        pending.addBoth(self._settled)

    def _settled(self, _: object) -> None:
        self._pending = None

    def _got(self, snapshot: Any) -> None:
        self._emit("message", snapshot)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        problem = {"error": failure.getErrorMessage() or getattr(failure.type, "__name__", "error")}
        # logged once per new problem, not twice a second while it lasts
        if not failure.check(StoreUnavailable) and self._last != "problem" + json.dumps(problem, sort_keys=True):
            self.log.failure("admin live updates: reading the store failed", failure)
        self._emit("problem", problem)

    def _emit(self, event: str, body: Any) -> None:
        key = event + json.dumps(body, sort_keys=True)
        if self.stopped or key == self._last:
            return
        self._last = key
        data = json.dumps({**body, "now": self._clock.seconds()}, sort_keys=True)
        prefix = b"" if event == "message" else b"event: " + event.encode() + b"\n"
        self._send(prefix + b"data: " + data.encode() + b"\n\n")

    def _send(self, chunk: bytes) -> None:
        if self.stopped:
            return
        self._last_write = self._clock.seconds()
        try:
            self._write(chunk)
        except Exception:
            # the connection is gone and the finish notice is on its way: stop now, quietly
            self.stop()


class AdminResource(Resource):
    """The Klein app behind the security headers every admin response must carry (errors too)."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        return self._inner.render(request)


def _off_reactor(clock: IReactorTime) -> RunBlocking:
    if IReactorThreads.providedBy(clock):
        reactor: Any = clock
        return lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)
    # a test clock (task.Clock) has no threads: hashes are checked in place
    return lambda work: maybeDeferred(work)


def _arg(request: IRequest, name: str) -> str:
    values = request.args.get(name.encode(), []) if request.args else []
    return values[0].decode("utf-8", "replace") if values else ""


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _html(request: IRequest, body: bytes, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return body


def _see_other(request: IRequest, location: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode("utf-8"))
    return b""


Handler = Callable[..., Coroutine[Any, Any, bytes | None]]


Refusal = Callable[["AdminApp", IRequest], bytes]


def _guarded(handler: Handler, anonymous: Refusal, before: Callable[[AdminApp, IRequest], bytes | None] | None = None,
             check: Callable[[AdminApp, IRequest, Session], bytes | None] | None = None) -> Callable[..., Any]:
    """The handler for a logged-in operator, once the UI is enabled and ``before``/``check`` found
    nothing wrong; ``anonymous`` answers anyone without a session."""

    @wraps(handler)
    def guarded(self: AdminApp, request: IRequest, **kw: Any) -> Any:
        if self.password is None:
            return self.disabled(request)
        refused = before(self, request) if before is not None else None
        if refused is not None:
            return refused
        session = self.session_of(request, touch=True)
        if session is None:
            return anonymous(self, request)
        refused = check(self, request, session) if check is not None else None
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(handler(self, request, session, **kw))
    return guarded


def _to_login(self: AdminApp, request: IRequest) -> bytes:
    path = local_next(request.uri.decode("utf-8", "replace"))
    return _see_other(request, "/admin/login?" + urlencode({"next": path}))


def _unauthorized(self: AdminApp, request: IRequest) -> bytes:
    request.setResponseCode(401)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"log in first\n"


def _cross_site(self: AdminApp, request: IRequest) -> bytes | None:
    return None if self.same_origin(request) else self.forbidden(request, "cross-site request refused")


def _csrf(self: AdminApp, request: IRequest, session: Session) -> bytes | None:
    given = _arg(request, "csrf") or _header(request, b"x-csrf-token")
    if tokens_match(session.csrf, given):
        return None
    return self.forbidden(request, "missing or wrong CSRF token; reload the page and try again")


def page_route(handler: Handler) -> Callable[..., Any]:
    """A page for a logged-in operator; anyone else is sent to the login form, and back afterwards."""
    return _guarded(handler, _to_login)


def stream_route(handler: Handler) -> Callable[..., Any]:
    """Live updates for a logged-in operator; anyone else gets 401 (an EventSource cannot follow a login)."""
    return _guarded(handler, _unauthorized)


def action_route(handler: Handler) -> Callable[..., Any]:
    """A state-changing POST: a same-site Origin (when sent), a session and its CSRF token, else 403."""
    return _guarded(handler, lambda self, request: self.forbidden(request, "log in first"), _cross_site, _csrf)


class AdminApp:
    """The admin UI. Disabled (503 everywhere) until ADMIN_PASSWORD_HASH holds a valid hash."""

    app = Klein()
    log = Logger()

    def __init__(self, config: AgentConfig, store: ICallStore, control: ICallControl, clock: IReactorTime, *,
                 run_blocking: RunBlocking | None = None) -> None:
        self.config = config
        self.store = store
        self.control = control
        self.clock = clock
        self.password: PasswordHash | None = None
        self.disabled_reason = ("The admin UI is disabled: no password is set (ADMIN_PASSWORD_HASH is empty). "
                                "There is no default password.")
        if config.web.admin_password_hash:
            try:
                self.password = PasswordHash.parse(config.web.admin_password_hash)
            except MalformedHash as e:
                self.log.error("ADMIN_PASSWORD_HASH is malformed: {problem}; the admin UI stays disabled",
                               problem=str(e))
                self.disabled_reason = ("The admin UI is disabled: ADMIN_PASSWORD_HASH is malformed "
                                        "(the service log says why).")
        self.sessions = SessionTable(clock, config.web.admin_session_hours * 3600)
        self.limiter = LoginLimiter(clock)
        self._run_blocking = run_blocking or _off_reactor(clock)
        static = resources.files("twisted_agent.web").joinpath("static")
        self._static = {name: static.joinpath(name).read_bytes() for name in STATIC_TYPES}
        self._resource = AdminResource(self.app.resource())

    def resource(self) -> IResource:
        return self._resource

    # --- what the routes share ------------------------------------------------------------------

    def session_of(self, request: IRequest, touch: bool) -> Session | None:
        token = request.getCookie(SESSION_COOKIE)
        text = token.decode("ascii", "replace") if token else None
        return self.sessions.get(text) if touch else self.sessions.peek(text)

    def _from_loopback(self, request: IRequest) -> bool:
        return getattr(request.getClientAddress(), "host", None) in LOOPBACK

    def client(self, request: IRequest) -> str:
        peer = getattr(request.getClientAddress(), "host", None)
        return client_address(peer, _header(request, b"x-forwarded-for"))

    def same_origin(self, request: IRequest) -> bool:
        hosts = [h for h in (_header(request, b"host"),) if h]
        forwarded = _header(request, b"x-forwarded-host")
        if forwarded and self._from_loopback(request):
            hosts.append(forwarded.split(",")[-1].strip())
        return origin_allowed(_header(request, b"origin"), hosts)

    def set_cookie(self, request: IRequest, name: bytes, value: str, *, expire: bool = False) -> None:
        # IRequest leaves httpOnly and sameSite out; twisted.web's Request has them
        web_request: Any = request
        web_request.addCookie(name, value.encode("ascii"), path=b"/admin", httpOnly=True, sameSite="strict",
                              secure=self.config.web.admin_cookie_secure, max_age=b"0" if expire else None)

    def disabled(self, request: IRequest) -> bytes:
        return _html(request, pages.disabled_page(self.disabled_reason), 503)

    def forbidden(self, request: IRequest, why: str) -> bytes:
        self.log.warn("admin: refused {method} {path} from {address}: {why}", method=request.method.decode(),
                      path=request.path.decode("utf-8", "replace"), address=self.client(request), why=why)
        return _html(request, pages.message_page("Forbidden", why), 403)

    def chrome(self, session: Session, current: str = "") -> pages.Chrome:
        return pages.Chrome(csrf=session.csrf, current=current)

    async def read(self, pending: Deferred[T], *, quiet: bool = False) -> T:
        """A store read, bounded in time; every failure becomes :class:`StoreUnavailable`.

        An unexpected error is logged first, unless ``quiet``: live updates poll twice a second and
        log a problem once (as :class:`EventStream` does), so they get it unchanged.
        """
        pending.addTimeout(STORE_TIMEOUT, self.clock)
        try:
            return await pending
        except StoreUnavailable:
            raise
        except DeferredTimeout:
            raise StoreUnavailable(f"the store did not answer within {STORE_TIMEOUT:.0f} s") from None
        except Exception as e:
            if quiet:
                raise
            self.log.failure("admin: reading the store failed")
            raise StoreUnavailable(f"the store failed ({type(e).__name__}); see the service log") from None

    # --- logging in and out -----------------------------------------------------------------------

    @app.route("/login", methods=["GET", "HEAD"])
    def login_form(self, request: IRequest) -> bytes:
        if self.password is None:
            return self.disabled(request)
        next_path = local_next(_arg(request, "next"))
        if self.session_of(request, touch=False) is not None:
            return _see_other(request, next_path)
        cookie = request.getCookie(LOGIN_COOKIE)
        token = cookie.decode("ascii", "replace") if cookie else ""
        if len(token) < 32:
            token = new_token()
            self.set_cookie(request, LOGIN_COOKIE, token)
        return _html(request, pages.login_page(token, next_path))

    @app.route("/login", methods=["POST"])
    def login(self, request: IRequest) -> Any:
        if self.password is None:
            return self.disabled(request)
        if not self.same_origin(request):
            return self.forbidden(request, "cross-site request refused")
        cookie = request.getCookie(LOGIN_COOKIE)
        token = _arg(request, "csrf")
        if not tokens_match(cookie.decode("ascii", "replace") if cookie else None, token):
            return self.forbidden(request, "the login form expired; open it again")
        return Deferred.fromCoroutine(self._login(request, token))

    async def _login(self, request: IRequest, form_token: str) -> bytes:
        assert self.password is not None
        address = self.client(request)
        next_path = local_next(_arg(request, "next"))
        wait = self.limiter.begin(address)
        if wait:
            self.log.warn("admin login from {address} refused unchecked: too many failed attempts, retry in {wait} s",
                          address=address, wait=wait)
            request.setHeader(b"retry-after", str(wait).encode())
            message = f"Too many failed attempts. Try again in {max(1, round(wait / 60))} minute(s)."
            return _html(request, pages.login_page(form_token, next_path, message), 429)
        password, check = _arg(request, "password"), self.password.verify
        if not await self._run_blocking(lambda: check(password)):
            self.log.warn("admin login failed from {address}", address=address)
            return _html(request, pages.login_page(form_token, next_path, "Wrong password."), 401)
        self.limiter.succeeded(address)
        old = request.getCookie(SESSION_COOKIE)
        self.sessions.end(old.decode("ascii", "replace") if old else None)
        session = self.sessions.create()
        self.set_cookie(request, SESSION_COOKIE, session.token)
        self.set_cookie(request, LOGIN_COOKIE, "", expire=True)
        self.log.info("admin login from {address}", address=address)
        return _see_other(request, next_path)

    @app.route("/logout", methods=["POST"])
    @action_route
    async def logout(self, request: IRequest, session: Session) -> bytes:
        self.sessions.end(session.token)
        self.set_cookie(request, SESSION_COOKIE, "", expire=True)
        self.log.info("admin logout from {address}", address=self.client(request))
        return _see_other(request, "/admin/login")

    # --- pages ------------------------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    @page_route
    async def live(self, request: IRequest, session: Session) -> bytes:
        chrome = self.chrome(session, "live")
        try:
            records = await self.read(self.store.live_calls())
        except StoreUnavailable as e:
            return _html(request, pages.message_page("Live calls", f"live calls unavailable: {e}", chrome), 503)
        payload = pages.live_payload(records, self.store.cluster_active())
        return _html(request, pages.live_page(payload, self.clock.seconds(), chrome))

    @app.route("/calls/<call_id>", methods=["GET", "HEAD"])
    @page_route
    async def call(self, request: IRequest, session: Session, call_id: str) -> bytes:
        chrome = self.chrome(session)
        chrome.flash = pages.HANGUP_RESULTS.get(_arg(request, "done"), "")
        try:
            record = await self.read(self.store.get_call(call_id))
        except StoreUnavailable as e:
            return _html(request, pages.message_page("Call", f"call unavailable: {e}", chrome), 503)
        if record is None:
            return _html(request, pages.message_page("Call not found", f"No call {call_id!r} is live or in the "
                                                     "history (it may have been trimmed from it).", chrome), 404)
        return _html(request, pages.call_page(record, self.clock.seconds(), chrome))

    @app.route("/calls/<call_id>/hangup", methods=["POST"])
    @action_route
    async def hang_up(self, request: IRequest, session: Session, call_id: str) -> bytes:
        address = self.client(request)
        pending = self.control.hang_up(call_id)
        pending.addTimeout(HANGUP_TIMEOUT, self.clock)
        try:
            ended = await pending
        except Exception:
            self.log.failure("admin: hanging up call {call_id} failed", call_id=call_id)
            ended = False
        self.log.info("admin: operator at {address} hung up call {call_id}: {result}", address=address,
                      call_id=call_id, result="ended" if ended else "not found")
        # the result rides in the address, not the session: the page reloads itself when the call ends
        return _see_other(request, pages.call_href(call_id) + ("?done=ended" if ended else "?done=not-found"))

    @app.route("/history", methods=["GET", "HEAD"])
    @page_route
    async def history(self, request: IRequest, session: Session) -> bytes:
        chrome = self.chrome(session, "history")
        args = {name: _arg(request, name) for name in ("number", "from", "to", "limit")}
        query = pages.parse_history_query(args)
        if query.errors:
            return _html(request, pages.history_page(query, None, chrome), 400)
        try:
            records = await self.read(self.store.history(query.number, query.since, query.until, query.limit))
        except StoreUnavailable as e:
            return _html(request, pages.history_page(query, None, chrome, f"history unavailable: {e}"), 503)
        return _html(request, pages.history_page(query, records, chrome))

    @app.route("/config", methods=["GET", "HEAD"])
    @page_route
    async def configuration(self, request: IRequest, session: Session) -> bytes:
        chrome = self.chrome(session, "config")
        return _html(request, pages.config_page(describe(self.config), self.config.path, chrome))

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def static(self, request: IRequest, name: str) -> bytes:
        # public (the login page needs them) and not secret: the same two files every install ships
        if name not in self._static:
            return _html(request, pages.message_page("Not found", "No such file."), 404)
        request.setHeader(b"content-type", STATIC_TYPES[name])
        return self._static[name]

    # --- live updates -----------------------------------------------------------------------------

    def _stream(self, request: IRequest, session: Session, snapshot: Callable[[], Deferred[Any]]) -> Deferred[None]:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        # a buffering proxy (nginx) would hold the events back
        request.setHeader(b"x-accel-buffering", b"no")
        token = session.token
        stream = EventStream(self.clock, snapshot, request.write, alive=lambda: self.sessions.peek(token) is not None)
        web_request: Any = request  # notifyFinish is twisted.web's, not IRequest's
        web_request.notifyFinish().addBoth(lambda _: stream.stop())
        return stream.start()

    @app.route("/events", methods=["GET"])
    @stream_route
    async def live_events(self, request: IRequest, session: Session) -> None:
        async def snapshot() -> dict[str, Any]:
            records = await self.read(self.store.live_calls(), quiet=True)
            return pages.live_payload(records, self.store.cluster_active())

        await self._stream(request, session, lambda: Deferred.fromCoroutine(snapshot()))

    @app.route("/calls/<call_id>/events", methods=["GET"])
    @stream_route
    async def call_events(self, request: IRequest, session: Session, call_id: str) -> None:
        async def snapshot() -> dict[str, Any]:
            record = await self.read(self.store.get_call(call_id), quiet=True)
            return pages.call_payload(record) if record is not None else {"call_id": call_id, "missing": True}

        await self._stream(request, session, lambda: Deferred.fromCoroutine(snapshot()))

    # --- errors -----------------------------------------------------------------------------------

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        if self.password is None:
            return self.disabled(request)
        return _html(request, pages.message_page("Not found", "There is no such admin page."), 404)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        if self.password is None:
            return self.disabled(request)
        return _html(request, pages.message_page("Not allowed", "This page does not take that method."), 405)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        # the operator gets a plain sentence; the traceback goes to the log only
        self.log.failure("admin: {method} {path} failed", failure, method=request.method.decode(),
                         path=request.path.decode("utf-8", "replace"))
        return _html(request, pages.message_page("Error", "Something went wrong; the service log says what."), 500)
