"""What can go wrong asking a language model for a reply, as exceptions a turn can tell apart.

Every failure is an :class:`LLMError` (a :class:`~twisted_agent.providers.base.ProviderError`):
``fatal`` says whether the next turn would fail the same way (no such model, server gone, bad
request), so the call should give up on the provider, or whether this turn alone failed (a timeout,
an error mid-reply, a full queue). ``fix`` is the one line that tells an operator what to do.
"""

from __future__ import annotations

from twisted_agent.providers.base import ProviderError


class LLMError(ProviderError):
    """A reply could not be had. ``str()`` is one readable line."""

    def __init__(self, message: str, fatal: bool = False, fix: str = "", status: int | None = None) -> None:
        super().__init__(message, fatal)
        self.message = message
        self.fix = fix
        #: the HTTP status of an HTTP backend's error answer, if there was one
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


class LLMModelMissing(LLMError):
    """The model is not there: not pulled into Ollama, unknown to the server, or no GGUF file."""

    def __init__(self, message: str, fix: str, status: int | None = None) -> None:
        super().__init__(message, fatal=True, fix=fix, status=status)


class LLMUnavailable(LLMError):
    """No answer from the server at all (refused, reset, DNS), or the embedded runtime is missing."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message, fatal=True, fix=fix)


class LLMTimeout(LLMError):
    """A deadline passed: response headers, first token, or the whole reply (``stage`` says which)."""

    def __init__(self, stage: str, seconds: float, backend: str) -> None:
        super().__init__(f"{backend}: no {stage} within {seconds:g}s", fatal=False)
        self.stage = stage
        self.seconds = seconds


class LLMStreamError(LLMError):
    """The reply started but broke: an error line mid-stream, a malformed chunk, or EOF before the end."""


class LLMBusy(LLMError):
    """The embedded model's queue is full: this turn is refused, the next may get through."""

    def __init__(self, message: str) -> None:
        super().__init__(message, fatal=False, fix="raise LOCAL_MAX_QUEUE, or run the model on an Ollama server")
