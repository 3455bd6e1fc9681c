"""Time and ordering for the simulator: tracked timers, and a channel's serial command queue.

Every timer the simulator starts goes through :class:`Timers`, so ``stop()`` can cancel them all
and leave a clean reactor. :class:`CommandQueue` models ``stasis_app_control``: ARI commands on
one channel (play, bridge add/remove, answer, continue ...) run one at a time in the order they
were sent, so a second ``play`` waits for the first to finish and an ``addChannel`` sent during a
playback takes effect only when it ends, as on a real Asterisk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ChannelGone", "CommandQueue", "Timers"]


class ChannelGone(Exception):
    """The channel hung up or left Stasis before a queued command ran."""


class Timers:
    """``callLater`` and ``LoopingCall`` on one clock, all cancellable at once."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: set[IDelayedCall] = set()
        self._loops: set[LoopingCall] = set()
        self._sleeps: set[Deferred[None]] = set()

    def seconds(self) -> float:
        return self.clock.seconds()

    def later(self, delay: float, function: Callable[..., object], *args: object) -> IDelayedCall:
        def fire() -> None:
            self._calls.discard(call)
            with self.log.failuresHandled("simulator timer {function!r} failed", function=function):
                function(*args)

        call = self.clock.callLater(max(0.0, delay), fire)
        self._calls.add(call)
        return call

    def cancel(self, call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
        if call is not None:
            self._calls.discard(call)

    def sleep(self, delay: float) -> Deferred[None]:
        """A Deferred that fires after ``delay``; cancelled (CancelledError) by :meth:`cancel_all`."""
        call: IDelayedCall | None = None

        def cancel(_: Deferred[None]) -> None:
            self.cancel(call)

        waiter: Deferred[None] = Deferred(cancel)
        self._sleeps.add(waiter)
        waiter.addBoth(self._forget_sleep, waiter)
        call = self.later(delay, waiter.callback, None)
        return waiter

    def _forget_sleep(self, result: object, waiter: Deferred[None]) -> object:
        self._sleeps.discard(waiter)
        return result

    def loop(self, interval: float, tick: Callable[[int], object]) -> LoopingCall:
        """Start ``tick(count)`` every ``interval`` s; ``count`` > 1 when the reactor fell behind."""
        looping = LoopingCall.withCount(tick)
        looping.clock = self.clock
        self._loops.add(looping)
        done = looping.start(interval, now=False)
        done.addErrback(lambda failure: self.log.failure("simulator loop {tick!r} failed", failure, tick=tick))
        return looping

    def stop_loop(self, looping: LoopingCall | None) -> None:
        if looping is not None:
            if looping.running:
                looping.stop()
            self._loops.discard(looping)

    def cancel_all(self) -> None:
        for looping in list(self._loops):
            self.stop_loop(looping)
        for call in list(self._calls):
            self.cancel(call)
        for waiter in list(self._sleeps):
            waiter.cancel()


#: a control command: returns at once, or a Deferred when it blocks the queue (a playback)
Command = Callable[[], Any]


class CommandQueue:
    """One channel's control queue: commands run serially, each after its dispatch delay."""

    log = Logger()

    def __init__(self, timers: Timers) -> None:
        self._timers = timers
        self._pending: deque[tuple[Command, Deferred[Any], float]] = deque()
        self._busy = False
        self._closed = False
        self._current: Deferred[Any] | None = None

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, command: Command, delay: float = 0.0) -> Deferred[Any]:
        """Queue ``command``; the Deferred fires with its result once it has run (ChannelGone if it never will)."""
        done: Deferred[Any] = Deferred()
        if self._closed:
            done.errback(ChannelGone())
            return done
        self._pending.append((command, done, delay))
        if not self._busy:
            self._next()
        return done

    def post(self, command: Command, delay: float = 0.0) -> None:
        """Queue ``command`` without waiting for it (an async ARI command such as play or addChannel)."""
        self.submit(command, delay).addErrback(self._unwaited_failure)

    def _unwaited_failure(self, failure: Failure) -> None:
        if not failure.check(ChannelGone, CancelledError):
            self.log.failure("simulator channel command failed", failure)

    def close(self) -> None:
        """The channel is gone: drop what has not started (their waiters get ChannelGone)."""
        self._closed = True
        while self._pending:
            _, done, _ = self._pending.popleft()
            done.errback(ChannelGone())

    def _next(self) -> None:
        if not self._pending:
            self._busy = False
            return
        self._busy = True
        command, done, delay = self._pending.popleft()
        if delay > 0:
            self._timers.later(delay, self._run, command, done)
        else:
            self._run(command, done)

    def _run(self, command: Command, done: Deferred[Any]) -> None:
        try:
            result = command()
        except Exception:
            self._finish(Failure(), done)
            return
        if isinstance(result, Deferred):
            result.addBoth(self._finish, done)
        else:
            self._finish(result, done)

    def _finish(self, result: object, done: Deferred[Any]) -> None:
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)
        self._next()
