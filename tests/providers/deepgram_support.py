"""What the Deepgram provider's tests share: a recording events sink, a call stand-in, audio, a config."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from twisted_agent.config import AgentConfig, ContextConfig, DeepgramConfig, ProvidersConfig
from twisted_agent.providers.base import ICallInfo, IProviderEvents, ToolResult

FRAME = 320  # 20 ms of 8 kHz s16le


def tone_frames(ms: int, amplitude: int = 8000, frequency: float = 440.0) -> list[bytes]:
    """A caller speaking: a tone, cut in 20 ms frames."""
    n = 8 * ms
    pcm = struct.pack(f"<{n}h", *(int(amplitude * math.sin(2 * math.pi * frequency * i / 8000)) for i in range(n)))
    return [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]


def silence_frames(ms: int) -> list[bytes]:
    return [bytes(FRAME)] * (ms // 20)


def config(url: str, api_key: str = "test-key", timeout: float = 3.0) -> AgentConfig:
    return AgentConfig(providers=ProvidersConfig(cloud_connect_timeout=timeout,
                                                 deepgram=DeepgramConfig(api_key=api_key, url=url)))


@implementer(IProviderEvents)
class Sink:
    """Records everything the provider tells the engine, in order."""

    def __init__(self, tool_result: ToolResult | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.tool_result = tool_result or ToolResult(True, "done")

    def transcript(self, text: str, final: bool) -> None:
        self.events.append(("transcript", text, final))

    def user_speech_started(self) -> None:
        self.events.append(("user_speech_started",))

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.events.append(("agent_text", text, utterance_id))

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.events.append(("agent_audio", pcm, rate, utterance_id))

    def utterance_end(self, utterance_id: str) -> None:
        self.events.append(("utterance_end", utterance_id))

    def tool_request(self, name: str, arguments: dict[str, Any]) -> Deferred[ToolResult]:
        self.events.append(("tool_request", name, arguments))
        return succeed(self.tool_result)

    def work_started(self) -> None:
        self.events.append(("work_started",))

    def timing(self, stage: str, ms: float) -> None:
        self.events.append(("timing", stage, ms))

    def error(self, message: str, fatal: bool) -> None:
        self.events.append(("error", message, fatal))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == kind]

    def audio_of(self, utterance_id: str) -> bytes:
        return b"".join(e[1] for e in self.of("agent_audio") if e[3] == utterance_id)

    def ended(self, utterance_id: str) -> bool:
        return ("utterance_end", utterance_id) in self.events


@implementer(ICallInfo)
@dataclass
class CallInfo:
    events: Sink
    context: ContextConfig = field(default_factory=lambda: ContextConfig(greeting="Hello there."))
    call_id: str = "chan-1"
    caller_number: str = "1001"
    caller_name: str = "Alice"
    context_name: str = "default"
