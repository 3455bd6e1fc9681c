"""The local pipeline's greetings, synthesized once when it starts and spoken from memory.

A context's greeting is fixed by the configuration, yet synthesizing it on every call put Piper's
whole run (100-300 ms on the 2-core box, more beside a busy language model) between the answer and
the first sound. :class:`GreetingCache` asks the pipeline's TTS for each distinct greeting once at
start-up, with the same ``synthesize(text, voice)`` request a call would make (so the audio is the
same: the TTS splits and normalises the text itself), and keeps the :class:`Speech`. What decides
the audio is the text and the context's voice; the TTS (backend, rate) is the pipeline's own.

A greeting that is not there (its synthesis failed at start, or a call chose the local provider
with ``AI_PROVIDER`` in a context that names another) is synthesized per call as before; the log
says why, once per greeting. A failed synthesis at start never makes the pipeline unready.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_agent.config import AgentConfig, ContextConfig
from twisted_agent.providers.local.interfaces import ITextToSpeech, Speech


@dataclass(frozen=True)
class Greeting:
    """What a context's greeting sounds like: its text, in its voice (None: the TTS's own)."""

    text: str
    voice: str | None


def greeting_of(context: ContextConfig) -> Greeting:
    return Greeting(context.greeting, context.voice or None)


def greetings_for(config: AgentConfig, provider: str) -> list[Greeting]:
    """The distinct greetings of the contexts whose calls go to ``provider``: those naming it, and
    those naming none when it is the default (how a call's provider is chosen, ``calls.bringup``)."""
    found: list[Greeting] = []
    for context in config.contexts.values():
        greeting = greeting_of(context)
        if greeting.text and (context.provider or config.calls.default_provider) == provider and greeting not in found:
            found.append(greeting)
    return found


class GreetingCache:
    """Greetings synthesized once, by :meth:`fill`; :meth:`speech` hands them to calls."""

    log = Logger()

    def __init__(self, tts: ITextToSpeech) -> None:
        self._tts = tts
        self._speech: dict[Greeting, Speech] = {}
        #: greeting -> why its synthesis at start failed
        self._failed: dict[Greeting, str] = {}
        #: what :meth:`fill` was asked for (None: it has not run)
        self._wanted: tuple[Greeting, ...] | None = None
        self._explained: set[Greeting] = set()

    @property
    def size(self) -> int:
        """Bytes of audio held."""
        return sum(len(speech.pcm) for speech in self._speech.values())

    async def fill(self, greetings: Iterable[Greeting]) -> None:
        """Synthesize each greeting (one after another: the TTS's queue is bounded and shared).
        Never fails: a greeting that cannot be synthesized is logged and left to each call."""
        self._wanted = tuple(greetings)
        for greeting in self._wanted:
            try:
                self._speech[greeting] = await self._tts.synthesize(greeting.text, greeting.voice)
            except Exception:
                error = Failure().getErrorMessage()
                self._failed[greeting] = error
                self.log.warn("greeting {text!r} (voice {voice}) could not be synthesized at start: {error}; "
                              "each call synthesizes it", text=greeting.text, voice=greeting.voice or "default",
                              error=error)
        self.log.info("{count} greetings held in memory ({size_kb} KB of audio); {failed} failed",
                      count=len(self._speech), size_kb=round(self.size / 1024, 1), failed=len(self._failed))

    def speech(self, greeting: Greeting) -> Speech | None:
        """The greeting's audio, or None (the call synthesizes it; the first time, the log says why)."""
        speech = self._speech.get(greeting)
        if speech is None and greeting not in self._explained:
            self._explained.add(greeting)
            self.log.info("greeting {text!r} (voice {voice}) is synthesized per call: {reason}",
                          text=greeting.text, voice=greeting.voice or "default", reason=self._why_missing(greeting))
        return speech

    def _why_missing(self, greeting: Greeting) -> str:
        if greeting in self._failed:
            return f"its synthesis at start failed ({self._failed[greeting]})"
        if self._wanted is None:
            return "no greetings were synthesized at start (the pipeline had not started, or its models failed to load)"
        if greeting in self._wanted:
            return "its synthesis at start is still under way"
        return "no context whose calls go to the local provider by default has it (AI_PROVIDER chose it)"
