"""OpenAI Realtime's two interfaces, GA and beta (PROTOCOLS §3): event names and what we send.

The GA interface nests the audio settings (``session.audio.input.format``) and renamed the
response events (``response.output_audio.delta``); the beta one, chosen by the handshake header
``OpenAI-Beta: realtime=v1``, keeps flat names (``input_audio_format``, ``response.audio.delta``).
Everything else the adapter does is the same for both, so the difference lives in this table and in
:func:`session_update`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted_agent.config import ContextConfig, OpenAIRealtimeConfig
from twisted_agent.media.codecs import ulaw_decode
from twisted_agent.providers.base import ToolResult

SERVICE = "OpenAI Realtime"
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"


@dataclass(frozen=True)
class Family:
    name: str
    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str


GA = Family("ga", "response.output_audio.delta", "response.output_audio.done",
            "response.output_audio_transcript.delta", "response.output_audio_transcript.done")
BETA = Family("beta", "response.audio.delta", "response.audio.done",
              "response.audio_transcript.delta", "response.audio_transcript.done")
FAMILIES = {"ga": GA, "beta": BETA}


@dataclass(frozen=True)
class AudioFormat:
    name: str
    rate: int  # of what goes over the socket
    bytes_per_ms: int
    ga: dict[str, Any]
    beta: str


PCMU = AudioFormat("pcmu", 8000, 8, {"type": "audio/pcmu"}, "g711_ulaw")
PCM16 = AudioFormat("pcm16", 24000, 48, {"type": "audio/pcm", "rate": 24000}, "pcm16")
AUDIO_FORMATS = {"pcmu": PCMU, "pcm16": PCM16}

#: The model's names for the tools, and the engine's names for the same actions.
TOOL_ACTIONS = {"hang_up": "hangup", "transfer": "transfer"}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "hang_up",
        "description": "End the call. Say goodbye first; the line is closed once you have finished speaking.",
        "parameters": {"type": "object", "properties": {
            "reason": {"type": "string", "description": "why the call ends, for the call record"}}},
    },
    {
        "type": "function",
        "name": "transfer",
        "description": "Transfer the caller to a person or department, when they ask for one or you cannot help.",
        "parameters": {"type": "object", "properties": {
            "target": {"type": "string", "description": "who to transfer to, e.g. 'operator' or 'sales'"}}},
    },
]

#: Error codes (and types) after which the session is of no more use: the key, the quota, the session.
FATAL_ERROR_CODES = frozenset({"invalid_api_key", "session_expired", "insufficient_quota", "account_deactivated"})
FATAL_ERROR_TYPES = frozenset({"authentication_error", "permission_error"})


def is_fatal(error: dict[str, Any]) -> bool:
    """Most errors are about one client event and the session goes on (§3 "Other events"); a
    server error that ends the session shows up as the closed connection, reported then."""
    return error.get("code") in FATAL_ERROR_CODES or error.get("type") in FATAL_ERROR_TYPES


def realtime_url(url: str, model: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "model"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("model", model)])))


def handshake_headers(settings: OpenAIRealtimeConfig) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {settings.api_key}"}
    if settings.api == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    return headers


def session_update(settings: OpenAIRealtimeConfig, context: ContextConfig) -> dict[str, Any]:
    audio = AUDIO_FORMATS[settings.audio]
    turn_detection = {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_ms,
        "silence_duration_ms": settings.vad_silence_ms,
        # the server answers each turn and cancels its reply when the caller talks over it
        "create_response": True,
        "interrupt_response": True,
    }
    transcription = {"model": TRANSCRIPTION_MODEL, "language": context.language}
    if settings.api == "beta":
        session: dict[str, Any] = {
            "modalities": ["audio", "text"],
            "instructions": context.system_prompt,
            "voice": settings.voice,
            "input_audio_format": audio.beta,
            "output_audio_format": audio.beta,
            "turn_detection": turn_detection,
            "input_audio_transcription": transcription,
        }
    else:
        session = {
            "type": "realtime",
            "instructions": context.system_prompt,
            "output_modalities": ["audio"],
            "audio": {
                "input": {"format": dict(audio.ga), "turn_detection": turn_detection, "transcription": transcription},
                "output": {"format": dict(audio.ga), "voice": settings.voice},
            },
        }
    session["tools"] = TOOLS
    session["tool_choice"] = "auto"
    return {"type": "session.update", "session": session}


def say_exactly(text: str) -> dict[str, Any]:
    """A response outside the caller's turns (greeting, check-in, goodbye); the per-response
    instructions replace the session's for this response only, in both interfaces."""
    return {"type": "response.create", "response": {"instructions": f"Say exactly: {text}"}}


def caller_text(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


def function_output(call_id: str, output: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": call_id, "output": output}}


def tool_output(result: ToolResult) -> dict[str, Any]:
    return {"ok": result.ok, "detail": result.detail, **result.data}


@dataclass
class ReplyItem:
    """An assistant message as it arrives: one utterance for the engine (its id is the item id)."""

    id: str
    response_id: str
    received: int = 0  # bytes of audio, as sent by the server
    transcript: list[str] = field(default_factory=list)
    audio_done: bool = False
    transcript_done: bool = False
    text_sent: bool = False
    ended: bool = False
    truncated: bool = False
    carry: bytes = b""  # an odd byte of 16-bit PCM, until its other half comes

    def received_ms(self, audio: AudioFormat) -> int:
        return self.received // audio.bytes_per_ms

    def to_pcm(self, data: bytes, audio: AudioFormat) -> bytes:
        """A delta as s16le at ``audio.rate``: μ-law decoded; 24 kHz PCM as is, in whole samples."""
        if audio is PCMU:
            return ulaw_decode(data)
        data = self.carry + data
        whole = len(data) - len(data) % 2
        self.carry = data[whole:]
        return data[:whole]
