"""The inactivity watchdog: a caller who says nothing while it is their turn is asked, then let go.

Plain logic on a clock. The call says when the caller has the floor (:meth:`waiting`), when they do
not (:meth:`busy`: the agent is thinking or speaking), and when the caller showed life
(:meth:`active`: speech, a key). After ``prompt_s`` of waiting the watchdog calls ``ask`` ("Are you
still there?"), after ``hangup_s`` more of waiting ``give_up`` (goodbye, hang-up). A caller in the
middle of a long turn (``talking()`` true) is never taken for silent.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class InactivityWatchdog:
    def __init__(self, clock: IReactorTime, prompt_s: float, hangup_s: float, ask: Callable[[], None],
                 give_up: Callable[[], None], talking: Callable[[], bool]) -> None:
        self._clock = clock
        self.prompt_s = prompt_s
        self.hangup_s = hangup_s
        self._ask = ask
        self._give_up = give_up
        self._talking = talking
        #: 0: the caller is expected to speak; 1: they were asked; 2: the watchdog gave up on them
        self.stage = 0
        self._timer: IDelayedCall | None = None

    @property
    def armed(self) -> bool:
        return self._timer is not None and self._timer.active()

    def waiting(self) -> None:
        """It is the caller's turn: count their silence from now."""
        self.busy()
        if self.prompt_s and self.stage < 2:
            self._timer = self._clock.callLater(self.prompt_s if self.stage == 0 else self.hangup_s, self._due)

    def busy(self) -> None:
        """The agent has the floor: the caller's silence does not count."""
        if self.armed:
            assert self._timer is not None
            self._timer.cancel()
        self._timer = None

    def active(self) -> bool:
        """The caller spoke or pressed a key: start afresh. True if the watchdog had given up."""
        gave_up, self.stage = self.stage == 2, 0
        if self.armed:
            self.waiting()
        return gave_up

    def _due(self) -> None:
        self._timer = None
        if self._talking():
            self.waiting()  # a long turn, not silence
            return
        self.stage += 1
        if self.stage == 1:
            self.waiting()  # (the question makes the agent busy; its end starts the count again)
            self._ask()
        else:
            self._give_up()
