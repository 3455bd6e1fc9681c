"""Klein routes for /health, /live and /ready."""

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

    def __init__(self, health: EngineHealth) -> None:
        self.health = health

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

    def resource(self) -> Any:
        return self.app.resource()
