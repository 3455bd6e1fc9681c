"""Small shared helpers for tests that run real processes and sockets."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest

from twisted_agent.demo import free_port as free_port  # one helper for package and tests


def unavailable(message: str) -> NoReturn:
    """What a test does when something optional it needs is absent: skip with ``message``, which
    says how to provide it, or fail under ``CI=true``, where everything is supposed to be there."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


#: Asterisk 22.10.1's ARI Swagger files, kept in the repository (tests/data/ari-api-docs/README.md)
ARI_API_DOCS = Path(__file__).resolve().parent / "data" / "ari-api-docs"

BIN = os.path.dirname(sys.executable)


def loopback_env(**extra: str) -> dict[str, str]:
    """An environment for a real engine on free loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARI_", "RTP_", "HEALTH_", "AUDIO"))}
    env.update({
        "HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(free_port()),
        "RTP_HOST": "127.0.0.1", "RTP_PORT": str(free_port(socket.SOCK_DGRAM)),
        "AUDIOSOCKET_HOST": "127.0.0.1", "AUDIOSOCKET_PORT": str(free_port()),
        "ARI_URL": f"http://127.0.0.1:{free_port()}/ari", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for_http(url: str, deadline_s: float = 20.0) -> tuple[int, Any]:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return http_get(url)
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
