"""The callers of harness.py, on the built-in simulator instead of a real Asterisk.

The same script (``wait:S``, ``play:CLIP`` steps), the same engine settings (an environment), the
same outputs: what the caller heard and said from the answer on, and the engine's log messages. It
runs the reactor, so tests and benchmarks run it in a process of its own::

    python -m tests.asterisk.simulated SPEC.json OUT.json

SPEC: ``{"settings": {...}, "script": "wait:2,play:question,...", "calls": N}``; OUT: one entry per
call, ``{"heard": base64 PCM, "said": base64 PCM, "messages": [...]}`` (8 kHz s16le).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from tests.asterisk import harness
from tests.asterisk.harness import LOCAL_CHANNEL_LOSS_DB
from tests.asterisk.instance import ROOT
from twisted_agent.media.interfaces import SAMPLE_RATE


def clips() -> dict[str, bytes]:
    """The clips as the agent gets them from a real Asterisk's Local channel (harness.write_clips)."""
    from tests.media.speech import gain

    found = harness.clips()
    found.update({f"{name}-soft": gain(pcm, -LOCAL_CHANNEL_LOSS_DB) for name, pcm in list(found.items())})
    return found


async def run(reactor: Any, settings: dict[str, str], script: str, calls: int) -> list[dict[str, Any]]:
    from twisted_agent.config import load_config
    from twisted_agent.demo import APP, loopback, sleep, until
    from twisted_agent.service import AgentService
    from twisted_agent.sim import AsteriskSimulator

    sounds = clips()
    messages: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("twisted_agent"):
            messages.append(formatEvent(event))

    media_dir = tempfile.mkdtemp(prefix="ai-agent-sim-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="sim")
    await sim.start()
    config = loopback(load_config(None, {"INACTIVITY_PROMPT_SECONDS": "0", **settings}))
    config = dataclasses.replace(
        config, ari=dataclasses.replace(config.ari, url=sim.ari_url, username="ai-agent", password="sim", app=APP),
        media=dataclasses.replace(config.media, media_dir=media_dir))
    globalLogPublisher.addObserver(observe)
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    results = []
    try:
        await until(reactor, lambda: service.ari.connected, 10, "ARI")
        provider = config.calls.default_provider
        await until(reactor, lambda: service.providers.factories[provider].readiness().ready, 300, "the provider")
        for _ in range(calls):
            del messages[:]
            # the dialplan's caller sends silence frames while it waits (Playtones(0)), as phones do
            caller = sim.originate(APP, idle="silence_frames")
            await caller.answered
            said = bytearray()
            for step in script.split(","):
                kind, _, value = step.partition(":")
                if kind == "wait":
                    said += bytes(2 * int(float(value) * SAMPLE_RATE))
                    await sleep(reactor, float(value))
                elif kind == "play":
                    said += sounds[value]
                    await caller.say(sounds[value])
                elif kind == "hangup":
                    break
            heard = caller.heard()
            await caller.hangup()
            await until(reactor, lambda: not service.engine.calls, 10, "the call released")
            results.append({"heard": base64.b64encode(heard).decode(), "said": base64.b64encode(bytes(said)).decode(),
                            "messages": list(messages)})
    finally:
        await service.stopService()
        globalLogPublisher.removeObserver(observe)
        await sim.stop()
        shutil.rmtree(media_dir, ignore_errors=True)
    return results


def main(spec_path: str, out_path: str) -> None:
    from twisted.internet import task

    with open(spec_path) as f:
        spec = json.load(f)

    def write(results: list[dict[str, Any]]) -> None:
        with open(out_path, "w") as f:
            json.dump(results, f)

    task.react(lambda reactor: Deferred.fromCoroutine(
        run(reactor, spec["settings"], spec["script"], spec.get("calls", 1))).addCallback(write))


def simulate(settings: dict[str, str], script: str, calls: int = 1) -> list[dict[str, Any]]:
    """Run :func:`run` in a child process; its results, with the audio decoded to bytes."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        spec, out = f"{d}/spec.json", f"{d}/out.json"
        with open(spec, "w") as f:
            json.dump({"settings": settings, "script": script, "calls": calls}, f)
        subprocess.run([sys.executable, "-m", "tests.asterisk.simulated", spec, out], check=True, cwd=ROOT)
        with open(out) as f:
            results: list[dict[str, Any]] = json.load(f)
    for r in results:
        r["heard"], r["said"] = base64.b64decode(r["heard"]), base64.b64decode(r["said"])
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
