"""The inactivity watchdog: a caller who says nothing while it is their turn is asked, then let go.

Plain logic on a clock. The call says when the caller has the floor (:meth:`waiting`), when they do
not (:meth:`busy`: the agent is thinking or speaking), and when the caller showed life
(:meth:`active`: speech, a key). After ``prompt_s`` of waiting the watchdog calls ``ask`` ("Are you
still there?"), after ``hangup_s`` more of waiting ``give_up`` (goodbye, hang-up). A caller in the
middle of a long turn (``talking()`` true) is never taken for silent.

:class:`InactivityPrompts` is what the agent says then: the context's ``still_there`` question,
then its ``goodbye``, after which the call ends once the goodbye has been heard, unless the
caller spoke up meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


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


class InactivityPrompts:
    """The agent's side of the watchdog for one call.

    ``speaker()`` is the provider when the agent may speak now (the caller's turn, the call neither
    failing nor ending), else None; ``context()`` the context in force; ``after_speaking(action)``
    runs ``action`` once the agent has finished speaking; ``leave()`` ends the call.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, prompt_s: float, hangup_s: float, call_id: str, *,
                 talking: Callable[[], bool], speaker: Callable[[], Any], context: Callable[[], Any],
                 after_speaking: Callable[[Callable[[], None]], None], leave: Callable[[], None],
                 count: Callable[[str], None]) -> None:
        self.watchdog = InactivityWatchdog(clock, prompt_s, hangup_s, self._ask, self._say_goodbye, talking)
        self.call_id = call_id
        self._speaker = speaker
        self._context = context
        self._after_speaking = after_speaking
        self._leave = leave
        self._count = count
        #: the goodbye was said and nobody spoke since: the call ends once it has been heard
        self._leaving = False

    def caller_active(self) -> None:
        """The caller spoke or pressed a key: their silence counts afresh; over the goodbye, they stay."""
        if self.watchdog.active():
            self._leaving = False

    def _ask(self) -> None:
        provider = self._speaker()
        if provider is None:
            return
        self._count("inactivity_prompts")
        self.log.info("call {call_id}: the caller has been silent; asking if they are still there",
                      call_id=self.call_id)
        text = self._context().still_there
        if text:
            provider.speak(text).addErrback(self._speak_failed)

    def _say_goodbye(self) -> None:
        provider = self._speaker()
        if provider is None:
            return
        self._count("inactivity_hangups")
        self.log.info("call {call_id}: the caller stayed silent; saying goodbye and hanging up", call_id=self.call_id)

        def leave(_: object = None) -> None:
            if self.watchdog.stage == 2:  # (not if they spoke up meanwhile)
                self._leaving = True
                self._after_speaking(self._leave_if_silent)

        def failed(failure: Any) -> None:
            self._speak_failed(failure)
            leave()

        text = self._context().goodbye
        if text:
            provider.speak(text).addCallbacks(leave, failed)
        else:
            leave()

    def _leave_if_silent(self) -> None:
        if self._leaving:
            self._leaving = False
            self._leave()

    def _speak_failed(self, failure: Any) -> None:
        self.log.failure("call {call_id}: the provider could not speak", failure, call_id=self.call_id)
