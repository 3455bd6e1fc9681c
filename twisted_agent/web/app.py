"""The engine's web site: /health, /live, /ready, /metrics, and the admin UI under /admin."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from twisted_agent.health import EngineHealth


def _json(request: IRequest, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=None, sort_keys=True).encode() + b"\n"


class AgentWebApp:
    app = Klein()

    def __init__(self, health: EngineHealth, metrics: Any = None, admin: Any = None) -> None:
        self.health = health
        #: has ``exposition() -> (content type, bytes)``
        self.metrics = metrics
        #: has ``resource()``: the admin UI, mounted at /admin
        self.admin = admin

    @app.route("/health", methods=["GET", "HEAD"])
    def get_health(self, request: IRequest) -> bytes:
        return _json(request, self.health.snapshot())

    @app.route("/live", methods=["GET", "HEAD"])
    def get_live(self, request: IRequest) -> bytes:
        # The process answers, so the reactor turns: that is all liveness means.
        return _json(request, {"live": True})

    @app.route("/ready", methods=["GET", "HEAD"])
    def get_ready(self, request: IRequest) -> bytes:
        reasons = self.health.not_ready_reasons()
        if reasons:
            return _json(request, {"ready": False, "reasons": reasons}, 503)
        return _json(request, {"ready": True})

    @app.route("/metrics", methods=["GET", "HEAD"])
    def get_metrics(self, request: IRequest) -> bytes:
        if self.metrics is None:
            return _json(request, {"error": "metrics are not enabled"}, 404)
        content_type, body = self.metrics.exposition()
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body

    @app.route("/admin")
    def admin_slash(self, request: IRequest) -> bytes:
        request.redirect(b"/admin/")
        return b""

    # the admin app's own routes are relative to /admin/ ("/" is /admin/, "/login" is /admin/login)
    @app.route("/admin/", branch=True)
    def admin_ui(self, request: IRequest) -> Any:
        if self.admin is None:
            return _json(request, {"error": "the admin UI is not enabled"}, 404)
        return self.admin.resource()

    def resource(self) -> Any:
        return self.app.resource()
