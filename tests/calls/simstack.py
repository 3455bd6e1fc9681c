"""The simulated Asterisk and the real engine, wired together on loopback: whole-call test helpers.

After every call a test checks :meth:`Stack.all_released`: the simulator has no live channel or
bridge, MEDIA_DIR holds no reply file, and the media plane has no session.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.helpers import free_port
from twisted_agent.calls.engine import APOLOGY_NAME
from twisted_agent.config import load_config
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.providers.voices import ToneVoice
from twisted_agent.service import AgentService
from twisted_agent.sim import AsteriskSimulator, SimulatedCaller

APP = "asterisk-ai-voice-agent"
QUESTION = resources.files("twisted_agent.sim").joinpath("clips/question.sl").read_bytes()


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)


class Stack:
    """The simulated Asterisk and the real engine, wired together on loopback."""

    def __init__(self, tmp_path: Path, sim: AsteriskSimulator | None = None, **env: str) -> None:
        """``sim``: another stack's simulator, for several engines on one PBX (each its own ARI_APP)."""
        self.media_dir = tmp_path / "media"
        self.media_dir.mkdir(parents=True)
        self.env = env
        self.app = env.get("ARI_APP", APP)
        self.owns_sim = sim is None
        self.sim = sim if sim is not None else AsteriskSimulator(reactor, username="ai-agent", password="secret")
        self.service: AgentService | None = None

    async def start(self) -> Stack:
        if self.owns_sim:
            await self.sim.start()
        config = load_config(None, {
            "ARI_URL": self.sim.ari_url, "ARI_USERNAME": "ai-agent", "ARI_PASSWORD": "secret",
            "ARI_RECONNECT_MAX_DELAY": "1", "RTP_HOST": "127.0.0.1", "RTP_PORT": str(free_port(socket.SOCK_DGRAM)),
            "AUDIOSOCKET_HOST": "127.0.0.1", "AUDIOSOCKET_PORT": str(free_port()), "RTP_ADVERTISE_HOST": "127.0.0.1",
            "HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(free_port()), "MEDIA_DIR": str(self.media_dir),
            "AI_PROVIDER": "echo", "NO_AUDIO_SECONDS": "0", "DRAIN_TIMEOUT": "1", **self.env,
        })
        self.service = AgentService(config, reactor)
        self.service.privilegedStartService()
        self.service.startService()
        await until(lambda: self.engine_connected, what="the engine's ARI events connection")
        return self

    @property
    def engine_connected(self) -> bool:
        return self.service is not None and self.service.ari.connected

    @property
    def engine(self) -> Any:
        assert self.service is not None
        return self.service.engine

    def call(self, **kw: Any) -> SimulatedCaller:
        return self.sim.originate(self.app, **kw)

    def reply_files(self) -> list[str]:
        return [name for name in os.listdir(self.media_dir) if not name.startswith(APOLOGY_NAME)]

    async def all_released(self) -> None:
        await until(lambda: not self.engine.calls, what="the engine to forget its calls")
        await until(lambda: not self.sim.live_channels() and not self.sim.live_bridges(),
                    what="no live channel or bridge in the simulator")
        await until(lambda: not self.reply_files(), what="MEDIA_DIR to be empty")
        assert self.service is not None
        assert self.service.media.sessions == {}

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stopService()
        if self.owns_sim:
            await self.sim.stop()


def reply_audio(text: str) -> bytes:
    """What the caller hears of an echo reply played from a μ-law file."""
    return ulaw_decode(ulaw_encode(ToneVoice().render(text)))


def altered_frames(heard: bytes, clip: bytes, frame: int = 320, drift_s: float = 0.5) -> list[int]:
    """Indexes of the frames of ``clip`` (8 kHz s16le) that the caller did not hear intact, in order.

    The clip is followed through ``heard`` from where its first 200 ms were heard. Where a frame is
    not at its place but the 100 ms from it are found, unaltered, up to ``drift_s`` later, the
    alignment moves on: a stall of the shared reactor on a busy machine delays a frame past the
    caller's jitter allowance, and the rest of the clip is then heard intact but later (a new
    talkspurt), as on a phone. A window the clip itself repeats within ``drift_s`` never moves it
    (tone voice repeats single frames, and a steady tone matches itself a period later).
    """

    def find(needle: bytes, haystack: bytes, start: int, end: int) -> int:
        at = haystack.find(needle, start, end)
        while at >= 0 and at % 2:
            at = haystack.find(needle, at + 1, end)
        return at

    offset = find(clip[:3200], heard, 0, len(heard))
    assert offset >= 0, "the clip was heard from its start"
    drift = int(drift_s * 16000)
    altered = []
    for n in range(0, len(clip), frame):
        at = offset + n
        if heard[at:at + frame] == clip[n:n + frame]:
            continue
        window = clip[n:n + 5 * frame]
        found = find(window, heard, at, at + drift + len(window))
        if found >= 0 and window.strip(b"\0") and find(window, clip, n + 1, n + drift + len(window)) < 0:
            offset = found - n
            continue
        altered.append(n // frame)
    return altered


async def converse(caller: SimulatedCaller, speech: bytes = QUESTION) -> None:
    await caller.answered
    await until(lambda: caller.first_heard_at() is not None, what="the greeting")
    await sleep(1.6)  # the greeting ends (6 words of tone voice: ~1 s) and the gate guard passes
    await caller.say(speech)
    heard = len(caller.heard_segments())
    await until(lambda: len(caller.heard_segments()) > heard, timeout=5, what="the answer")
    await sleep(1.3)  # let the answer play out
