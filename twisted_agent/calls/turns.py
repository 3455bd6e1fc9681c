"""Turn-taking for providers that leave it to the engine: when has the caller finished speaking?

The policy lives here alone so it can get smarter (semantic end-of-turn, adaptive pauses) without
touching the call. Today: the turn ends ``pause`` seconds after the caller's last voiced audio,
unless speech starts again first. The VAD reports speech end some time after the last voiced frame
(VAD_END_MS); that time counts toward the pause, it is not added to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class TurnTaker:
    def __init__(self, clock: IReactorTime, pause: float, on_turn_end: Callable[[], Any]) -> None:
        self._clock = clock
        self.pause = pause
        self._on_turn_end = on_turn_end
        self._pending: IDelayedCall | None = None
        self.speaking = False
        self.spoke = False  # some speech since the last turn end
        self.speech_ended_at: float | None = None

    def speech_started(self) -> None:
        self.speaking = True
        self.spoke = True
        self._cancel()

    def speech_ended(self, last_voiced_at: float | None = None) -> None:
        self.speaking = False
        if not self.spoke:
            return
        now = self._clock.seconds()
        self.speech_ended_at = last_voiced_at if last_voiced_at is not None else now
        self._cancel()
        self._pending = self._clock.callLater(max(0.0, self.speech_ended_at + self.pause - now), self._end)

    def _end(self) -> None:
        self._pending = None
        self.spoke = False
        self._on_turn_end()

    def reset(self) -> None:
        """Forget the turn in progress (the agent took the floor)."""
        self._cancel()
        self.speaking = False
        self.spoke = False

    def _cancel(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    @property
    def waiting(self) -> bool:
        return self._pending is not None
