"""The HTTP side of ARI: auth, routing, parameters and responses (res_ari.c conventions, §1.5).

* Auth: HTTP Basic first, else ``api_key=user:pass``; a failure is 401
  ``{"message": "Authentication required"}`` with ``WWW-Authenticate: Basic realm="Asterisk REST Interface"``.
* Routing: an unknown path is 404 ``Resource not found``; a known path with another method is 405
  ``Invalid method`` with an ``Allow`` header. A literal segment wins over a ``{variable}`` one.
* Parameters come from the query string (or a form body) and from a JSON object body, which wins
  where both give one, as the generated ``…_parse_body`` functions do; ``variables`` is body-only.
* Success: the route's code (204 with no body for void operations, 200 with JSON for objects, 201
  with ``Location`` for play). Every error body is ``{"message": …}``.

Routes are plain data (:class:`Route`), so a test can check them against the Swagger files; a
handler can only read the parameters its route declares.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_agent.sim.model import AriError

__all__ = ["AriResource", "Credentials", "Params", "Reply", "Route", "route"]

AUTH_REALM = "Asterisk REST Interface"


@dataclass(frozen=True)
class Route:
    """One implemented ARI operation: what the conformance test compares with the Swagger docs."""

    method: str
    template: str
    handler: str
    params: tuple[str, ...] = ()
    success: int = 200
    body: tuple[str, ...] = ()

    def match(self, segments: list[str]) -> dict[str, str] | None:
        parts = self.template.strip("/").split("/")
        if len(parts) != len(segments):
            return None
        values = {}
        for part, segment in zip(parts, segments, strict=True):
            if part.startswith("{"):
                if not segment:
                    return None
                values[part[1:-1]] = segment
            elif part != segment:
                return None
        return values

    @property
    def literal_mask(self) -> tuple[bool, ...]:
        return tuple(not part.startswith("{") for part in self.template.strip("/").split("/"))


def route(method: str, template: str, *, params: tuple[str, ...] = (), success: int = 200,
          body: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a handler method of the routes class (see :mod:`twisted_agent.sim.routes`)."""

    def declare(function: Callable[..., Any]) -> Callable[..., Any]:
        function._ari_route = Route(method, template, function.__name__, params, success, body)  # type: ignore[attr-defined]
        return function

    return declare


@dataclass
class Reply:
    body: Any = None
    code: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Params:
    """The parameters of one request; reading one the route does not declare is a simulator bug."""

    def __init__(self, route: Route, path: dict[str, str], values: dict[str, str],
                 variables: dict[str, Any] | None) -> None:
        self._route = route
        self.path = path
        self._values = values
        self._variables = variables

    def get(self, name: str) -> str | None:
        if name not in self._route.params:
            raise AssertionError(f"{self._route.handler} reads undeclared parameter {name!r}")
        return self._values.get(name)

    def int(self, name: str, default: int = 0) -> int:
        """atoi-like: missing -> default, junk -> 0 (as the generated code's ``atoi``)."""
        value = self.get(name)
        if value is None or value == "":
            return default
        match = re.match(r"\s*[-+]?\d+", value)
        return int(match.group()) if match else 0

    def list(self, name: str) -> list[str]:
        """An allowMultiple parameter: comma separated, empty items dropped."""
        value = self.get(name)
        return [item.strip() for item in (value or "").split(",") if item.strip()]

    def variables(self) -> dict[str, str]:
        """``{"variables": {NAME: "value" | {"value": …}}}`` from the body; 400 on non-string values."""
        if "variables" not in self._route.body:
            raise AssertionError(f"{self._route.handler} reads undeclared body parameter 'variables'")
        result: dict[str, str] = {}
        for name, value in (self._variables or {}).items():
            if isinstance(value, dict) and isinstance(value.get("value"), str):
                value = value["value"]
            if not isinstance(value, str):
                raise AriError(400, "Only string values in the 'variables' object allowed")
            result[str(name)] = value
        return result


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_text(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


class AriResource(Resource):
    """Everything under ``/ari``: the REST routes and, at ``/ari/events``, the WebSocket upgrade."""

    isLeaf = True
    log = Logger()

    def __init__(self, handlers: Any, routes: list[Route], credentials: Credentials,
                 events: Callable[[Request], Any], requests: list[tuple[str, str, dict[str, Any]]]) -> None:
        super().__init__()
        self._handlers = handlers
        self._routes = routes
        self._credentials = credentials
        self._events = events
        self._requests = requests

    # -- helpers -------------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        if header[:6].lower() == b"basic ":
            try:
                user, _, password = base64.b64decode(header[6:].strip()).partition(b":")
            except ValueError:
                return False
            return (user.decode("utf-8", "replace"), password.decode("utf-8", "replace")) == (
                self._credentials.username, self._credentials.password)
        keys = request.args.get(b"api_key")
        if keys:
            name, _, secret = keys[-1].decode("utf-8", "replace").partition(":")
            return (name, secret) == (self._credentials.username, self._credentials.password)
        return False

    @staticmethod
    def write_error(request: Request, error: AriError) -> bytes:
        request.setResponseCode(error.code, error.reason.encode())
        request.setHeader(b"content-type", b"application/json")
        if error.code == 401:
            request.setHeader(b"www-authenticate", f'Basic realm="{AUTH_REALM}"'.encode())
        return json.dumps({"message": error.message}).encode()

    # -- dispatch --------------------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        segments = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        if segments == ["events"]:
            return self._events(request)
        method = request.method.decode("ascii", "replace").upper()
        path = "/" + "/".join([*[p.decode() for p in request.prepath or []], *segments])
        try:
            values, variables = self._parameters(request)
        except AriError as error:
            self._requests.append((method, path, {}))
            return self.write_error(request, error)
        recorded: dict[str, Any] = dict(values)
        if variables is not None:
            recorded["variables"] = variables
        self._requests.append((method, path, recorded))
        if not self.authorized(request):
            return self.write_error(request, AriError(401, "Authentication required", "Unauthorized"))
        try:
            chosen, path_values = self._find(method, segments)
        except AriError as error:
            if error.code == 405:
                allowed = sorted({r.method for r in self._routes if r.match(segments) is not None})
                request.setHeader(b"allow", ", ".join(allowed).encode())
            return self.write_error(request, error)
        params = Params(chosen, path_values, values, variables)
        try:
            result = getattr(self._handlers, chosen.handler)(params)
        except AriError as error:
            return self.write_error(request, error)
        if not isinstance(result, Deferred):
            return self._finish(request, chosen, result)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        result.addCallbacks(lambda value: self._write_later(request, gone, self._finish(request, chosen, value)),
                            lambda failure: self._write_later(request, gone, self._failure(request, failure)))
        return NOT_DONE_YET

    def _find(self, method: str, segments: list[str]) -> tuple[Route, dict[str, str]]:
        matches = [(r, values) for r in self._routes if (values := r.match(segments)) is not None]
        if not matches:
            raise AriError(404, "Resource not found")
        best = max(r.literal_mask for r, _ in matches)
        for candidate, values in matches:
            if candidate.literal_mask == best and candidate.method == method:
                return candidate, values
        raise AriError(405, "Invalid method", "Method Not Allowed")

    @staticmethod
    def _parameters(request: Request) -> tuple[dict[str, str], dict[str, Any] | None]:
        values = {key.decode("utf-8", "replace"): items[-1].decode("utf-8", "replace")
                  for key, items in request.args.items() if items}
        values.pop("api_key", None)
        variables = None
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        raw = request.content.read() if request.content is not None else b""
        if raw.strip() and content_type == b"application/json":
            try:
                body = json.loads(raw)
            except ValueError:
                raise AriError(400, "Error parsing request body") from None
            if isinstance(body, dict):
                for key, value in body.items():
                    if key == "variables" and isinstance(value, dict):
                        variables = value
                    elif value is not None:
                        values[key] = _text(value)
        return values, variables

    def _finish(self, request: Request, chosen: Route, result: Any) -> bytes:
        reply = result if isinstance(result, Reply) else Reply(result)
        code = reply.code or chosen.success
        request.setResponseCode(code)
        for name, value in reply.headers.items():
            request.setHeader(name.encode(), value.encode())
        if code == 204:
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(reply.body).encode()

    def _failure(self, request: Request, failure: Failure) -> bytes:
        if isinstance(failure.value, AriError):
            return self.write_error(request, failure.value)
        self.log.failure("simulator request failed", failure)
        return self.write_error(request, AriError(500, "Internal Server Error"))

    @staticmethod
    def _write_later(request: Request, gone: list[bool], body: bytes) -> None:
        if gone:
            return
        request.write(body)
        request.finish()
