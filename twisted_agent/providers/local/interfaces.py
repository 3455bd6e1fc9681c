"""The three stages of the local pipeline, each behind an interface so backends can be swapped.

Every method that does work returns a cancellable ``Deferred``; model inference never runs on the
reactor thread (worker processes for Whisper and Piper, a worker thread or process for an embedded
language model, streamed HTTP for Ollama and OpenAI-compatible servers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str = "en"
    duration_ms: int = 0
    #: Whisper's probability that the audio held no speech; with avg_logprob it decides suppression
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    #: True when the hallucination guard dropped the text (then ``text`` is "")
    suppressed: bool = False
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Speech:
    pcm: bytes  # 16-bit mono little-endian
    rate: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
    name: str
    ready: bool
    detail: str
    fix: str = ""
    loaded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ISpeechToText(Interface):
    def transcribe(pcm: bytes, rate: int, language: str | None = None,
                   started: Callable[[], object] | None = None) -> Deferred[Transcript]:
        """Recognise one utterance (16-bit mono PCM at ``rate``); cancellable (the result is dropped).
        ``started`` is called once, on the reactor thread, when the model starts on it: when a worker
        takes it from the queue shared by every call (at once if one is free, or for a backend that
        queues nothing); never if it is cancelled or fails before. The turn's work starts then."""

    def status() -> ModelStatus:
        """Whether the model is installed and loaded, cheaply."""

    def start() -> Deferred[None]:
        """Start workers and load the model (off the reactor thread)."""

    def stop() -> Deferred[None]:
        """Stop the workers."""


class ILanguageModel(Interface):
    name = Attribute("backend name: ollama, openai-compatible or embedded")

    def chat(messages: list[dict[str, str]], on_token: Callable[[str], None]) -> Deferred[str]:
        """Stream a reply to ``messages`` (role/content dicts, system first): ``on_token`` gets each
        piece of text as it arrives; fires with the whole reply. Cancelling stops the generation
        (the HTTP request is dropped, the worker told to stop)."""

    def yield_to(busy: Deferred[Any]) -> None:
        """Work that matters more than the rest of a reply (the first piece of a reply being
        synthesized: the caller is waiting for it) is running until ``busy`` fires. A backend on
        this machine's CPU pauses generating between tokens until then (bounded); others ignore it."""

    def status() -> ModelStatus:
        """Whether the backend can answer now."""

    def start() -> Deferred[None]:
        """Connect / load the model."""

    def stop() -> Deferred[None]:
        """Release it."""


class ITextToSpeech(Interface):
    def synthesize(text: str, voice: str | None = None) -> Deferred[Speech]:
        """Speak one sentence; cancellable."""

    def status() -> ModelStatus:
        """Whether the voice is installed and loaded."""

    def start() -> Deferred[None]:
        """Start workers and load the voice."""

    def stop() -> Deferred[None]:
        """Stop the workers."""
