"""The engine's live calls, admission (draining, call limit) and graceful drain on shutdown."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twisted_agent.status import ComponentStatus, IStatusSource


class ICallHandle(Interface):
    """What the registry needs of a live call."""

    call_id = Attribute("the engine's id for the call (the caller channel id)")

    def release(reason: str) -> Deferred[None]:
        """End the call and free everything it holds; fires when done, never fails."""


class Refusal(Exception):
    """Why a new call is not taken; the call engine sends such calls back to the dialplan."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@implementer(IStatusSource)
class CallRegistry:
    """Counts and holds the live calls of this engine.

    ``admit()`` decides whether a new call may start: not while draining, not beyond
    ``max_calls``. ``drain()`` stops admission, waits for the live calls to end by themselves for
    up to ``timeout`` seconds, then releases those that remain.
    """

    component = "calls"
    log = Logger()

    def __init__(self, clock: IReactorTime, max_calls: int = 0) -> None:
        self._clock = clock
        self._max_calls = max_calls
        self._calls: dict[str, Any] = {}
        self._idle_waiters: list[Deferred[None]] = []
        self.draining = False
        self.total_admitted = 0
        self.total_refused = 0

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls

    @property
    def accepting(self) -> bool:
        return not self.draining and not (self._max_calls and len(self._calls) >= self._max_calls)

    def admit(self, handle: Any) -> None:
        """Register a new call, or raise :class:`Refusal` saying why it cannot be taken."""
        if self.draining:
            self.total_refused += 1
            raise Refusal("draining")
        if self._max_calls and len(self._calls) >= self._max_calls:
            self.total_refused += 1
            raise Refusal("full")
        if handle.call_id in self._calls:
            raise ValueError(f"call {handle.call_id} is already registered")
        self._calls[handle.call_id] = handle
        self.total_admitted += 1

    def discard(self, call_id: str) -> None:
        """Forget a call that has ended (idempotent)."""
        self._calls.pop(call_id, None)
        if not self._calls:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def calls(self) -> list[Any]:
        return list(self._calls.values())

    def _when_idle(self) -> Deferred[None]:
        if not self._calls:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._idle_waiters.remove(d))
        self._idle_waiters.append(waiter)
        return waiter

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop taking calls; fire once every live call has ended or been released."""
        self.draining = True
        return Deferred.fromCoroutine(self._drain(timeout))

    async def _drain(self, timeout: float) -> None:
        if self._calls:
            self.log.info("draining: waiting up to {timeout}s for {count} active call(s) to finish",
                          timeout=timeout, count=len(self._calls))
            idle = self._when_idle()
            idle.addTimeout(timeout, self._clock)
            try:
                await idle
                self.log.info("draining: all calls finished")
                return
            except TimeoutError:
                pass  # the remaining calls are released below
        remaining = self.calls()
        if remaining:
            self.log.warn("draining: drain timeout reached; ending {count} call(s)", count=len(remaining))
            await DeferredList([h.release("shutdown") for h in remaining], consumeErrors=True)
            for handle in remaining:
                self.discard(handle.call_id)

    def status(self) -> ComponentStatus:
        limit = f" of {self._max_calls}" if self._max_calls else ""
        if self.draining:
            return ComponentStatus("draining", False, f"{len(self._calls)} active call(s); not taking new calls")
        return ComponentStatus("running", True, f"{len(self._calls)}{limit} active call(s)")
