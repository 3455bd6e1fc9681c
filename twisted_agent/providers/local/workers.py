"""Blocking model inference in worker processes, with results delivered on the reactor thread.

Whisper and Piper hold the GIL for long stretches (Whisper's decoding loop is Python), so a
thread would stall the reactor's 20 ms media pacing; a worker *process* at a lower CPU priority
(``os.nice(10)``) cannot. :class:`WorkerPool` wraps :class:`concurrent.futures.ProcessPoolExecutor`:

* each worker loads its model once, in ``initializer`` (which keeps it in a module-level global
  of the worker), so a job only pays for inference;
* workers start with the ``forkserver`` method, never ``fork``: the parent runs a reactor and
  threads, and a forked copy of those is undefined behaviour;
* the pool keeps its own queue and hands the executor at most one job per worker, so a waiting
  job is still the pool's to cancel (the executor marks the jobs it pre-fetches "running"), the
  queue depth is exact, and ``max_pending`` bounds it: beyond it :meth:`WorkerPool.submit` fails
  at once with :class:`WorkerBusy`, which the caller turns into "too busy";
* cancelling a job's Deferred removes it from the queue, or, once a worker runs it, drops its
  result (the worker finishes the job: a process cannot be interrupted mid-inference safely);
* a job may say when it leaves the queue (``started=``: the moment a free worker gets it, which is
  how a turn tells the call that its work runs, rather than waits behind other calls' turns);
* a worker that dies (a crash, the OOM killer) breaks the executor: the jobs it held fail with
  :class:`WorkerCrashed`, and the next job starts a fresh executor (counted in ``restarts``);
* an ``initializer`` that raises does not break the executor: the worker keeps the error and
  fails every job with :class:`WorkerInitError` carrying its message (a missing or corrupt model
  file reads as such, not as "a process terminated abruptly").

Every callback from the executor's thread is passed to the reactor thread with
``callFromThread``; all of the pool's state lives on the reactor thread.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["JobResult", "PoolStopped", "WorkerBusy", "WorkerCrashed", "WorkerInfo", "WorkerInitError", "WorkerPool"]


class WorkerBusy(Exception):
    """Every worker is busy and ``max_pending`` jobs already wait: the caller should shed the load."""


class WorkerCrashed(Exception):
    """A worker process died while this job was in the pool; the pool restarts on the next job."""


class WorkerInitError(Exception):
    """The worker's initializer raised (the model could not be loaded); the message says why."""


class PoolStopped(Exception):
    """The pool was stopped before this job ran."""


@dataclass(frozen=True)
class JobResult:
    """What a job returned, and where its time went (wall clock, milliseconds)."""

    value: Any
    queued_ms: float  # from submit() until a worker started the job
    run_ms: float  # in the worker
    pid: int  # the worker that ran it


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    load_ms: float  # how long the initializer took in that worker


# -- the worker side: these run in the worker processes ----------------------------------------

_init_error: str | None = None
_load_ms = 0.0
_barrier: Any = None  # a multiprocessing.Barrier over every worker of this executor: start()'s warm-up


def _exit_with(engine: int) -> None:
    """End this worker when the engine process ends, however it ends (a SIGTERM while the model
    loads, SIGKILL, a crash): the forkserver parents the workers, not the engine, so nothing else
    would tell them, and a worker loading or waiting at the barrier never reads its job queue."""
    import select

    try:
        watched = os.pidfd_open(engine)
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # pragma: no cover - no pidfd (Linux < 5.3): the job queue's EOF is all there is
        return

    def wait() -> None:
        select.select([watched], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="engine-watch", daemon=True).start()


def _bootstrap(nice: int, barrier: Any, initializer: Callable[..., None], initargs: Sequence[Any],
               engine: int | None = None) -> None:
    """Worker initializer: follow the engine's lifetime, lower our priority, then load the model,
    keeping any error for the jobs."""
    global _init_error, _load_ms, _barrier
    _barrier = barrier
    if engine is not None:
        _exit_with(engine)
    # Ctrl-C in a terminal signals the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:  # pragma: no cover - a sandbox may forbid it; the worker still works
            pass
    started = time.monotonic()
    try:
        initializer(*initargs)
    except BaseException as e:
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        _init_error = f"{detail} (in worker {os.getpid()})"
    _load_ms = (time.monotonic() - started) * 1000


def _run(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float, float, int]:
    if _init_error is not None and fn is not _warm_up:  # _warm_up raises it after releasing the barrier
        raise WorkerInitError(_init_error)
    started = time.monotonic()
    value = fn(*args)
    return value, started, time.monotonic(), os.getpid()


def _warm_up(timeout: float) -> WorkerInfo:
    """Return once every worker of the executor has loaded: each waits for the others at the barrier,
    so no worker can take two of these jobs."""
    if _init_error is not None:
        _barrier.abort()  # the others would wait for us until the timeout
        raise WorkerInitError(_init_error)
    _barrier.wait(timeout)
    return WorkerInfo(os.getpid(), round(_load_ms, 1))


# -- the parent side: everything below runs on the reactor thread -------------------------------


class _Job:
    __slots__ = ("args", "cancelled", "deferred", "executor", "fn", "internal", "started", "submitted")

    def __init__(self, fn: Callable[..., Any], args: Sequence[Any], internal: bool = False,
                 canceller: Callable[[_Job], None] | None = None,
                 started: Callable[[], object] | None = None) -> None:
        self.fn = fn
        self.args = args
        self.internal = internal  # a warm-up job: not counted in the job counters
        self.started = started  # told when a worker gets the job
        self.submitted = time.monotonic()
        self.cancelled = False
        self.executor: ProcessPoolExecutor | None = None
        self.deferred: Deferred[Any] = Deferred(None if canceller is None else lambda _: canceller(self))


class WorkerPool:
    """``size`` worker processes, each running ``initializer(*initargs)`` once, then jobs.

    ``initializer`` and every job function must be importable by the workers (module-level
    functions of an importable module); their arguments and results travel pickled over a pipe,
    so keep them small (PCM bytes, not numpy arrays of floats).

    Counters (see :meth:`stats`): every accepted job is counted in ``submitted`` and ends in
    exactly one of ``completed``, ``failed`` or ``cancelled``; ``rejected`` counts
    :class:`WorkerBusy` refusals, ``crashed`` the jobs lost to a dying worker (also in ``failed``),
    ``restarts`` the executors started after a crash.
    """

    log = Logger()

    def __init__(self, reactor: Any, initializer: Callable[..., None], initargs: Sequence[Any] = (),
                 size: int = 1, name: str = "worker", *, max_pending: int = 8, nice: int = 10,
                 start_method: str = "forkserver", start_timeout: float = 120.0) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got size={size!r}")
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending!r}")
        if start_method == "fork":
            raise ValueError("start_method 'fork' would copy the running reactor and its threads: "
                             "use 'forkserver' or 'spawn'")
        self._reactor = reactor
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self.size = size
        self.name = name
        self.max_pending = max_pending
        self.nice = nice
        self.start_timeout = start_timeout
        self._context = multiprocessing.get_context(start_method)
        self._executor: ProcessPoolExecutor | None = None
        self._crashed_executor = False  # the last executor died: the next one is a restart
        self._queue: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._loaded: dict[int, float] = {}  # pid -> load ms, for the current executor's workers
        self._stopped = False
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.rejected = 0
        self.crashed = 0
        self.restarts = 0

    # -- what callers see -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a worker (start()'s warm-up jobs aside)."""
        return sum(not job.internal for job in self._queue)

    @property
    def busy_workers(self) -> int:
        """Workers running a job (including a job whose Deferred was cancelled: the worker is busy)."""
        return len(self._running)

    @property
    def loaded_workers(self) -> int:
        """Workers of the current executor known to have loaded (they ran a job)."""
        return len(self._loaded)

    def stats(self) -> dict[str, int]:
        return {
            "workers": self.size, "loaded_workers": self.loaded_workers, "busy_workers": self.busy_workers,
            "queue_depth": self.queue_depth, "max_pending": self.max_pending, "submitted": self.submitted,
            "completed": self.completed, "failed": self.failed, "cancelled": self.cancelled,
            "rejected": self.rejected, "crashed": self.crashed, "restarts": self.restarts,
        }

    def submit(self, fn: Callable[..., Any], *args: Any, started: Callable[[], object] | None = None) -> Deferred[Any]:
        """Run ``fn(*args)`` in a worker; the Deferred fires on the reactor thread with its result.

        Fails at once with :class:`WorkerBusy` when ``max_pending`` jobs already wait. Cancelling
        the Deferred cancels a waiting job or drops the result of a running one. ``started`` is
        called (on the reactor thread, once) when a worker gets the job: at once, within this call,
        if one is free; never for a job cancelled, refused or failed while it waits.
        """
        return self.submit_timed(fn, *args, started=started).addCallback(lambda result: result.value)

    def submit_timed(self, fn: Callable[..., Any], *args: Any,
                     started: Callable[[], object] | None = None) -> Deferred[JobResult]:
        """:meth:`submit`, firing with a :class:`JobResult` (the value, its queue and run times)."""
        if self._stopped:
            return fail(PoolStopped(f"the {self.name} worker pool is stopped"))
        waiting = self.queue_depth
        if waiting >= self.max_pending:
            self.rejected += 1
            return fail(WorkerBusy(
                f"all {self.size} {self.name} worker(s) are busy and {waiting} job(s) already wait"))
        job = _Job(fn, args, canceller=self._cancel, started=started)
        self.submitted += 1
        self._queue.append(job)
        self._dispatch()
        return job.deferred

    def start(self) -> Deferred[list[WorkerInfo]]:
        """Start every worker and load its model; fires with each worker's pid and load time once all
        have loaded, or fails with the first worker's load error (:class:`WorkerInitError`)."""
        self._stopped = False
        if self._executor is not None and len(self._loaded) >= self.size:
            return succeed([WorkerInfo(pid, ms) for pid, ms in self._loaded.items()])
        jobs = [_Job(_warm_up, (self.start_timeout,), internal=True) for _ in range(self.size)]
        # ahead of waiting jobs: the barrier needs every worker, and each has to be free to join it
        for job in jobs:
            self._queue.appendleft(job)
        self._dispatch()
        warm = DeferredList([job.deferred for job in jobs], consumeErrors=True)

        def gathered(results: list[tuple[bool, Any]]) -> list[WorkerInfo] | Failure:
            failures = [value for ok, value in results if not ok]
            if failures:
                # a worker that failed to load aborts the barrier; report its error, not the others'
                failures.sort(key=lambda f: 0 if f.check(WorkerInitError, WorkerCrashed) else 1)
                return failures[0]
            infos = [value.value for ok, value in results]
            self.log.info("{name} pool ready: {count} worker(s), load {load_ms} ms",
                          name=self.name, count=len(infos), load_ms=[info.load_ms for info in infos])
            return infos

        return warm.addCallback(gathered)

    def stop(self) -> Deferred[None]:
        """Fail the waiting jobs with :class:`PoolStopped` and shut the workers down; fires when they
        have exited (after finishing the jobs they are running). Workers still loading their model
        are ended instead: a load can take minutes, and the process cannot exit while they run."""
        self._stopped = True
        waiting, self._queue = list(self._queue), deque()
        for job in waiting:
            if not job.internal:
                self.cancelled += 1
            job.deferred.errback(PoolStopped(f"the {self.name} worker pool stopped"))
        executor, self._executor = self._executor, None
        loading = any(job.internal for job in self._running)  # start()'s warm-ups: workers still loading
        self._loaded.clear()
        if executor is None:
            return succeed(None)
        if loading:
            # concurrent.futures has no public way to end a worker; its process table is the one
            for process in list(getattr(executor, "_processes", {}).values()):
                process.terminate()
            self.log.info("{name} pool stopped while loading: its workers were ended", name=self.name)
        # the executor holds only the jobs already handed to a worker: let them finish
        executor.shutdown(wait=False)
        done: Deferred[None] = Deferred()

        def join() -> None:
            executor.shutdown(wait=True)
            self._reactor.callFromThread(done.callback, None)

        # shutdown(wait=True) blocks until the workers exit: a short-lived thread waits for it
        threading.Thread(target=join, name=f"{self.name}-pool-stop", daemon=True).start()
        return done

    # -- internals --------------------------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        # the Deferred errbacks with CancelledError once this returns
        self.cancelled += 1
        try:
            self._queue.remove(job)
        except ValueError:
            job.cancelled = True  # running: drop its result when it comes

    def _new_executor(self) -> ProcessPoolExecutor:
        if self._crashed_executor:
            self.restarts += 1
            self._crashed_executor = False
            self.log.info("restarting the {name} worker pool", name=self.name)
        barrier = self._context.Barrier(self.size)
        self._executor = ProcessPoolExecutor(
            max_workers=self.size, mp_context=self._context, initializer=_bootstrap,
            initargs=(self.nice, barrier, self._initializer, self._initargs, os.getpid()))
        return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = None
            self._loaded.clear()
            self._crashed_executor = True
        executor.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        while self._queue and len(self._running) < self.size:
            job = self._queue.popleft()
            executor = self._executor or self._new_executor()
            try:
                future = executor.submit(_run, job.fn, job.args)
            except (BrokenProcessPool, RuntimeError):
                # the executor broke before its failure callbacks reached the reactor thread
                self._discard(executor)
                executor = self._new_executor()
                future = executor.submit(_run, job.fn, job.args)
            job.executor = executor
            self._running.add(job)
            future.add_done_callback(partial(self._done_in_thread, job))
            if job.started is not None:
                self._tell_started(job.started)

    def _tell_started(self, started: Callable[[], object]) -> None:
        try:
            started()
        except Exception:
            # the caller's bookkeeping, not the job's: the job runs, the queue goes on
            self.log.failure("{name} pool: a job's start callback failed", name=self.name)

    def _done_in_thread(self, job: _Job, future: Future[Any]) -> None:
        # called on the executor's management thread (or on ours if the future was already done)
        self._reactor.callFromThread(self._finished, job, future)

    def _finished(self, job: _Job, future: Future[Any]) -> None:
        self._running.discard(job)
        try:
            self._deliver(job, future)
        finally:
            self._dispatch()

    def _deliver(self, job: _Job, future: Future[Any]) -> None:
        error = future.exception() if not future.cancelled() else PoolStopped("the pool shut down")
        if isinstance(error, BrokenProcessPool):
            if not job.internal:
                self.crashed += 1
            if job.executor is not None:
                if self._executor is job.executor:
                    self.log.error("a {name} worker process died: {error}", name=self.name, error=error)
                self._discard(job.executor)
            error = WorkerCrashed(
                f"a {self.name} worker process died while this job was in the pool ({error}); "
                "the pool restarts on the next job")
        if job.cancelled:
            return
        if error is not None:
            if not job.internal:
                self.failed += 1
            job.deferred.errback(error)
            return
        value, started, ended, pid = future.result()
        if job.executor is self._executor:
            if job.internal:
                self._loaded[pid] = value.load_ms
            else:
                self._loaded.setdefault(pid, 0.0)
        if not job.internal:
            self.completed += 1
        job.deferred.callback(JobResult(value, round((started - job.submitted) * 1000, 2),
                                        round((ended - started) * 1000, 2), pid))

