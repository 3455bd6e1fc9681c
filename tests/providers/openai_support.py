"""Helpers for the OpenAI Realtime tests: a recording events sink, a call stand-in, caller audio."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from tests.calls.simstack import until
from twisted_agent.config import AgentConfig, ContextConfig, OpenAIRealtimeConfig, ProvidersConfig
from twisted_agent.providers.base import ICallInfo, IProviderEvents, ToolResult
from twisted_agent.providers.openai_realtime import RealtimeProvider
from twisted_agent.sim.openai_realtime import FakeRealtime, FakeSession

FRAME_MS = 20


async def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """``until`` for any truthy value."""
    await until(lambda: bool(condition()), timeout, what)


@implementer(IProviderEvents)
class RecordingEvents:
    """Every call the provider makes, in order; audio gathered per utterance."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.audio: dict[str, bytearray] = {}
        self.rates: set[int] = set()
        self.tool_result = ToolResult(True, "done")

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [entry[1:] for entry in self.log if entry[0] == kind]

    def transcript(self, text: str, final: bool) -> None:
        self.log.append(("transcript", text, final))

    def user_speech_started(self) -> None:
        self.log.append(("speech_started",))

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.log.append(("agent_text", text, utterance_id))

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if utterance_id not in self.audio:
            self.log.append(("audio", utterance_id))
        self.audio.setdefault(utterance_id, bytearray()).extend(pcm)
        self.rates.add(rate)

    def utterance_end(self, utterance_id: str) -> None:
        self.log.append(("end", utterance_id))

    def tool_request(self, name: str, arguments: dict[str, Any]) -> Deferred[ToolResult]:
        self.log.append(("tool", name, arguments))
        return succeed(self.tool_result)

    def work_started(self) -> None:
        self.log.append(("work_started",))

    def timing(self, stage: str, ms: float) -> None:
        self.log.append(("timing", stage))

    def error(self, message: str, fatal: bool) -> None:
        self.log.append(("error", message, fatal))


@implementer(ICallInfo)
class CallInfo:
    def __init__(self, events: RecordingEvents, context: ContextConfig) -> None:
        self.call_id = "call-1"
        self.caller_number = "1001"
        self.caller_name = "Test Caller"
        self.context_name = "default"
        self.context = context
        self.events = events


def make_config(url: str, api: str = "ga", audio: str = "pcmu", key: str = "test-key",
                timeout: float = 3.0) -> AgentConfig:
    realtime = OpenAIRealtimeConfig(api_key=key, url=url, api=api, audio=audio)
    return AgentConfig(providers=ProvidersConfig(cloud_connect_timeout=timeout, openai_realtime=realtime))


async def started(fake: FakeRealtime, api: str = "ga", audio: str = "pcmu", greeting: str = "",
                  **context: Any) -> tuple[RealtimeProvider, RecordingEvents]:
    events = RecordingEvents()
    provider = RealtimeProvider(reactor, make_config(fake.url, api, audio))
    await provider.start(CallInfo(events, ContextConfig(greeting=greeting, **context)))
    return provider, events


def tone(ms: int, amplitude: int = 8000, frequency: float = 440.0) -> list[bytes]:
    """``ms`` of a loud tone as 20 ms frames of 8 kHz s16le: what the caller "says"."""
    n = 8000 * ms // 1000
    samples = [int(amplitude * math.sin(2 * math.pi * frequency * i / 8000)) for i in range(n)]
    pcm = struct.pack(f"<{n}h", *samples)
    return [pcm[i:i + 320] for i in range(0, len(pcm), 320)]


def silence(ms: int) -> list[bytes]:
    return [bytes(320)] * (ms // FRAME_MS)


def say(provider: RealtimeProvider, tone_ms: int = 600, silence_ms: int = 600) -> None:
    """A caller turn, pushed at once: the fake's VAD counts audio time, not wall time."""
    for frame in tone(tone_ms) + silence(silence_ms):
        provider.push_audio(frame)


def session(fake: FakeRealtime) -> FakeSession:
    return fake.sessions[-1]


def sent(fake: FakeRealtime, event_type: str) -> list[dict[str, Any]]:
    """The client events of one type the fake received."""
    return [e for e in session(fake).received if e["type"] == event_type]


async def finished(provider: RealtimeProvider, fake: FakeRealtime) -> None:
    """Close the provider, wait until the fake saw it go, and check the client broke no rule."""
    await provider.close()
    await wait_for(lambda: not fake.connections, timeout=3, what="the fake to see the connection close")
    assert fake.violations == []
