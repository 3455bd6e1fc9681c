"""A call's timers: at most one pending delayed call each, started again or cancelled at will.

Each timer of a call (the deadline for the reply, the filler, the gate guard, the confirmation of
Asterisk's talk, the no-audio diagnosis) is cancelled from several places, some of which run after
it fired or before it was ever started: cancelling is always allowed and does nothing then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timer:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None

    @property
    def pending(self) -> bool:
        """Started and neither fired (it is not pending while its function runs) nor cancelled."""
        return self._call is not None and self._call.active()

    def start(self, seconds: float, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function(*args)`` in ``seconds``, instead of what was pending."""
        self.cancel()
        self._call = self._clock.callLater(seconds, function, *args)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
