"""``ai-agent demo``: start the engine on loopback, show what it reports, stop it gracefully.

Until the call engine and the built-in Asterisk simulator land, the demo starts the real service
(web site, media listener, call registry), queries /health and /ready over HTTP, then drains and
stops it as SIGTERM would.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import treq
from twisted.internet.defer import Deferred

from twisted_agent.config import AgentConfig
from twisted_agent.listening import address
from twisted_agent.service import AgentService


def loopback(config: AgentConfig) -> AgentConfig:
    """The same configuration on free loopback ports, so the demo never clashes with a running engine."""
    media = dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=0, audiosocket_host="127.0.0.1",
                                audiosocket_port=0, advertise_host="127.0.0.1")
    web = dataclasses.replace(config.web, host="127.0.0.1", port=0)
    return dataclasses.replace(config, media=media, web=web)


async def run_demo(reactor: Any, config: AgentConfig, out: Any) -> int:
    service = AgentService(loopback(config), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        assert service.web.port is not None
        _, port = address(service.web.port)
        base = f"http://127.0.0.1:{port}"
        out.write(f"engine started; web site on {base}\n")
        response = await treq.get(f"{base}/health", timeout=5)
        health = await response.json()
        out.write(f"GET /health -> {response.code}\n{json.dumps(health, indent=2, sort_keys=True)}\n")
        response = await treq.get(f"{base}/ready", timeout=5)
        ready = await response.json()
        out.write(f"GET /ready -> {response.code} {json.dumps(ready)}\n")
        missing = [k for k in ("ari_connected", "rtp_server_running", "active_calls", "providers",
                               "audio_transport") if k not in health]
        if missing:
            out.write(f"/health lacks {missing}\n")
            return 1
        out.write("a full simulated call needs the call engine and the Asterisk simulator, not built yet\n")
        return 0
    finally:
        stopped: Deferred[None] = service.stopService()
        await stopped
        out.write("engine drained and stopped\n")
