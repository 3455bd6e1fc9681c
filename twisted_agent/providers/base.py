"""The seam between a call and whatever holds the conversation (local pipeline, cloud agent, echo).

The engine gives a provider an :class:`ICallInfo` (who is calling, which context, and an
:class:`IProviderEvents` sink) and feeds it the caller's audio; the provider answers through the
sink: text, audio chunks, timing marks, tool requests, errors. Everything that takes time returns a
``Deferred`` that can be cancelled: cancelling stops the work (barge-in relies on it).

Two kinds of provider:
- ``wants_turn_taking = True`` (local pipeline, echo): the engine decides when the caller's turn
  ends (a pause after speech) and calls :meth:`IProvider.end_of_turn`; while the agent speaks the
  caller's audio is gated (not sent as a new turn), so the agent never transcribes itself.
- ``wants_turn_taking = False`` (cloud voice agents): the provider gets every frame, ungated, and
  detects turns itself; it tells the engine with ``user_speech_started``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class ProviderError(Exception):
    """A provider could not do what was asked. ``fatal`` ends the provider's part in the call."""

    def __init__(self, message: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class ProviderReadiness:
    name: str
    ready: bool
    detail: str
    fix: str = ""
    implemented: bool = True
    #: not ready *yet*: still starting (loading its models); ``IProviderFactory.when_ready`` says when
    #: that is over. A provider not ready and not starting failed for good or is not installed.
    starting: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class IProviderEvents(Interface):
    """What a provider tells the engine about its call. Called on the reactor thread."""

    def transcript(text: str, final: bool) -> None:
        """What the caller said (partial results may follow each other; final closes the turn's text)."""

    def user_speech_started() -> None:
        """The provider heard the caller start speaking (providers that detect turns themselves)."""

    def agent_text(text: str, utterance_id: str) -> None:
        """What the agent is about to say (for the transcript and history)."""

    def agent_audio(pcm: bytes, rate: int, utterance_id: str) -> None:
        """A chunk of the agent's voice: 16-bit mono PCM at ``rate`` Hz, in order, for one utterance."""

    def utterance_end(utterance_id: str) -> None:
        """No more audio will come for this utterance (the reply is complete)."""

    def tool_request(name: str, arguments: dict[str, Any]) -> Deferred[ToolResult]:
        """Ask the engine to act on the call: ``hangup`` or ``transfer`` (``{"target": name}``)."""

    def work_started() -> None:
        """The work on the turn :meth:`IProvider.end_of_turn` asked for started: its first model job
        left the queue it shared with other calls' turns and runs. Until then the engine gives the
        turn QUEUE_TIMEOUT; from then on, PROVIDER_TIMEOUT for the answer's first audio. Said once
        per turn, during ``end_of_turn`` or after it (never for work that is thrown away, such as a
        speculation the caller's next words discarded). A provider that queues nothing says it at
        once, in ``end_of_turn``; providers that take turns themselves never get ``end_of_turn``.
        A separate event, not a :meth:`timing` stage: a timing is a report, this moves a deadline."""

    def timing(stage: str, ms: float) -> None:
        """How long a stage took: ``stt``, ``llm_first_token``, ``tts_first_byte`` ..."""

    def error(message: str, fatal: bool) -> None:
        """Something failed; a fatal error ends the provider's part (the engine apologises)."""


class ICallInfo(Interface):
    call_id = Attribute("the engine's id for the call (the caller channel id)")
    caller_number = Attribute("the caller's number, as Asterisk gives it")
    caller_name = Attribute("the caller's name, as Asterisk gives it")
    context_name = Attribute("the name of the conversation context in force")
    context = Attribute("the ContextConfig: greeting, system prompt, language, voice")
    events = Attribute("the IProviderEvents sink for this call")


class IProvider(Interface):
    name = Attribute("the provider's name, as AI_PROVIDER gives it")
    wants_turn_taking = Attribute("True: the engine ends turns and gates audio while the agent speaks")

    def start(call: ICallInfo) -> Deferred[None]:
        """Begin the conversation; the provider owns the greeting. Fires when ready for audio."""

    def push_audio(frame: bytes) -> None:
        """One 20 ms frame of the caller's audio, 8 kHz s16le."""

    def speech_started() -> None:
        """The media session's VAD heard the caller start speaking (with engine turn-taking: again,
        so work started at :meth:`speech_ended` is moot)."""

    def speech_ended() -> None:
        """The media session's VAD heard the caller stop. With engine turn-taking: the caller paused
        and a turn end is pending; :meth:`end_of_turn` follows unless :meth:`speech_started` comes
        first, so a provider may start answering now (speculatively) and must not speak before it."""

    def end_of_turn() -> Deferred[None]:
        """The caller's turn is over (engine turn-taking): answer it. Cancelling stops the answer.
        The provider says when its work on the answer starts (:meth:`IProviderEvents.work_started`)."""

    def interrupt(heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        """Stop speaking; the caller heard this many ms of each utterance."""

    def speak(text: str) -> Deferred[None]:
        """Say something outside the normal turn (a check-in, a goodbye)."""

    def dtmf(digit: str) -> None:
        """A DTMF digit from the caller."""

    def close() -> Deferred[None]:
        """End the provider's part and free what it holds; idempotent."""


class IProviderFactory(Interface):
    name = Attribute("the provider's name")

    def readiness() -> Any:
        """A ProviderReadiness: whether a call could use this provider now, and the fix if not; while
        the provider is still starting (``starting``), a call may wait for it (:meth:`when_ready`)."""

    def when_ready() -> Deferred[None]:
        """Fires (with None) once the provider is no longer starting: at once when it is not
        starting (ready, failed for good, not installed, or never started here). It says the start
        is over, not how it went: :meth:`create` then gives a provider or raises ProviderError.
        Cancelling it stops this wait only, never the start (other calls and the engine rely on it);
        the caller bounds it (READY_TIMEOUT)."""

    def create() -> IProvider:
        """A provider for one call; raises ProviderError when none can be had now (see readiness)."""
