"""The worker-process pool: real worker processes (forkserver), fake models and jobs.

The initializers and jobs are module-level functions of this module: the workers import it to
unpickle them, so it imports nothing heavy.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python import threadable

from twisted_agent.providers.local.workers import (
    JobResult,
    PoolStopped,
    WorkerBusy,
    WorkerCrashed,
    WorkerInitError,
    WorkerPool,
)

# -- what runs in the workers --------------------------------------------------------------------

_model: dict[str, Any] = {}


def load_fake_model(name: str) -> None:
    """The fake initializer: 'loads' a model into the worker's global, counting loads."""
    _model["name"] = name
    _model["loads"] = _model.get("loads", 0) + 1
    _model["jobs"] = 0


def load_broken_model(path: str) -> None:
    raise FileNotFoundError(f"no model file at {path}")


def use_model(text: str) -> dict[str, Any]:
    _model["jobs"] += 1
    return {"echo": text, "model": _model["name"], "loads": _model["loads"], "jobs": _model["jobs"],
            "pid": os.getpid(), "nice": os.nice(0)}


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("ran")
    return path


def refuse(message: str) -> None:
    raise ValueError(message)


def die(code: int) -> None:
    os._exit(code)


def spin(seconds: float) -> int:
    """Pure-Python CPU work that holds the worker's GIL, like Whisper's decoding loop."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(200))
    return n


# -- helpers --------------------------------------------------------------------------------------


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def pool(size: int = 1, **kwargs: Any) -> WorkerPool:
    return WorkerPool(reactor(), load_fake_model, ("fake-tiny",), size=size, name="test", **kwargs)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor(), seconds, lambda: None)


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await sleep(0.01)


async def failure_of(d: defer.Deferred[Any]) -> BaseException:
    try:
        await d
    except BaseException as e:
        return e
    raise AssertionError("the Deferred did not fail")


async def stopped(workers: WorkerPool) -> None:
    await workers.stop()


# -- tests ----------------------------------------------------------------------------------------


def test_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="fork"):
        WorkerPool(reactor(), load_fake_model, (), start_method="fork")


@pytest_twisted.ensureDeferred
async def test_results_arrive_on_the_reactor_thread_from_a_niced_worker_that_loaded_once() -> None:
    workers = pool()
    try:
        threads = []

        def note_thread(result: Any) -> Any:
            threads.append(threadable.isInIOThread())
            return result

        one = await workers.submit(use_model, "one").addCallback(note_thread)
        two = await workers.submit(use_model, "two")
        assert threads == [True]
        assert one["echo"] == "one" and one["model"] == "fake-tiny"
        assert one["pid"] != os.getpid() and two["pid"] == one["pid"]
        assert (one["loads"], two["loads"], two["jobs"]) == (1, 1, 2)  # the model loaded once, used twice
        assert one["nice"] == os.nice(0) + 10
        assert workers.stats()["completed"] == 2
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_start_loads_every_worker_before_firing() -> None:
    workers = pool(size=2)
    try:
        infos = await workers.start()
        assert len({info.pid for info in infos}) == 2
        assert all(info.load_ms >= 0 for info in infos)
        assert workers.loaded_workers == 2 and workers.busy_workers == 0
        assert (await workers.start()) and workers.stats()["submitted"] == 0  # warm: nothing to do, not counted
        timed = await workers.submit_timed(use_model, "x")
        assert isinstance(timed, JobResult) and timed.pid in {info.pid for info in infos}
        assert timed.value["loads"] == 1 and timed.queued_ms >= 0 and timed.run_ms >= 0
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_cancelling_a_queued_job_means_it_never_runs(tmp_path: Any) -> None:
    workers = pool()
    try:
        await workers.start()
        running = workers.submit(sleep_then, 0.3, "first")
        marker = str(tmp_path / "ran")
        queued = workers.submit(touch, marker)
        assert workers.queue_depth == 1 and workers.busy_workers == 1
        queued.cancel()
        assert isinstance(await failure_of(queued), defer.CancelledError)
        assert workers.queue_depth == 0
        assert await running == "first"
        assert await workers.submit(os.path.exists, marker) is False
        stats = workers.stats()
        assert (stats["submitted"], stats["completed"], stats["cancelled"], stats["failed"]) == (3, 2, 1, 0)
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_cancelling_a_running_job_drops_its_result_and_frees_the_worker_when_done() -> None:
    workers = pool()
    try:
        await workers.start()
        job = workers.submit(sleep_then, 0.3, "late")
        assert workers.busy_workers == 1
        started = time.monotonic()
        job.cancel()
        assert isinstance(await failure_of(job), defer.CancelledError)
        assert time.monotonic() - started < 0.1  # the caller is released at once
        assert workers.busy_workers == 1  # the worker still finishes the job
        result = await workers.submit(use_model, "next")
        assert result["echo"] == "next"
        stats = workers.stats()
        assert (stats["completed"], stats["cancelled"], stats["busy_workers"]) == (1, 1, 0)
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_a_full_queue_fails_fast_with_worker_busy() -> None:
    workers = pool(max_pending=1)
    try:
        await workers.start()
        running = workers.submit(sleep_then, 0.3, "a")
        waiting = workers.submit(use_model, "b")
        started = time.monotonic()
        refused = workers.submit(use_model, "c")
        error = await failure_of(refused)
        assert time.monotonic() - started < 0.05
        assert isinstance(error, WorkerBusy) and "busy" in str(error)
        assert await running == "a" and (await waiting)["echo"] == "b"
        assert workers.stats()["rejected"] == 1 and workers.stats()["submitted"] == 2
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_a_job_that_raises_errbacks_with_its_exception() -> None:
    workers = pool()
    try:
        error = await failure_of(workers.submit(refuse, "bad input"))
        assert isinstance(error, ValueError) and str(error) == "bad input"
        assert (await workers.submit(use_model, "still fine"))["jobs"] == 1
        assert workers.stats()["failed"] == 1
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_a_dying_worker_fails_its_job_clearly_and_the_pool_restarts() -> None:
    workers = pool()
    try:
        (before,) = await workers.start()
        error = await failure_of(workers.submit(die, 3))
        assert isinstance(error, WorkerCrashed)
        assert "worker process died" in str(error) and "restarts" in str(error)
        assert workers.loaded_workers == 0
        after = await workers.submit(use_model, "again")
        assert after["pid"] != before.pid and after["loads"] == 1
        stats = workers.stats()
        assert (stats["crashed"], stats["failed"], stats["restarts"], stats["completed"]) == (1, 1, 1, 1)
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_a_crash_fails_the_jobs_in_the_pool_and_the_waiting_ones_run_on_a_new_pool() -> None:
    workers = pool()
    try:
        await workers.start()
        dying = workers.submit(die, 1)
        waiting = workers.submit(use_model, "queued")
        assert isinstance(await failure_of(dying), WorkerCrashed)
        assert (await waiting)["echo"] == "queued"
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_a_failing_initializer_reports_its_error() -> None:
    workers = WorkerPool(reactor(), load_broken_model, ("/models/missing.pt",), size=2, name="broken")
    try:
        error = await failure_of(workers.start())
        assert isinstance(error, WorkerInitError)
        assert "FileNotFoundError: no model file at /models/missing.pt" in str(error)
        job_error = await failure_of(workers.submit(use_model, "x"))
        assert isinstance(job_error, WorkerInitError) and "/models/missing.pt" in str(job_error)
    finally:
        await stopped(workers)


@pytest_twisted.ensureDeferred
async def test_stop_fails_waiting_jobs_and_refuses_new_ones() -> None:
    workers = pool()
    await workers.start()
    running = workers.submit(sleep_then, 0.2, "finishes")
    waiting = workers.submit(use_model, "never")
    stopping = workers.stop()
    assert isinstance(await failure_of(waiting), PoolStopped)
    assert await running == "finishes"
    await stopping
    assert isinstance(await failure_of(workers.submit(use_model, "x")), PoolStopped)


async def tick_lateness(seconds: float) -> list[float]:
    """How late each tick of a 20 ms LoopingCall ran, over ``seconds``, sorted."""
    clock = reactor()
    interval = 0.02
    lateness: list[float] = []
    start = clock.seconds()

    def tick() -> None:
        lateness.append(clock.seconds() - (start + (len(lateness) + 1) * interval))

    ticker = task.LoopingCall(tick)
    ticker.clock = clock
    done = ticker.start(interval, now=False)
    await sleep(seconds)
    ticker.stop()
    await done
    return sorted(lateness)


def p99(values: list[float]) -> float:
    return values[int(0.99 * (len(values) - 1))]


@pytest_twisted.ensureDeferred
async def test_the_reactor_keeps_its_20ms_rhythm_while_workers_burn_cpu() -> None:
    """Both cores busy with worker processes (nice 10): the reactor's 20 ms ticks stay within 5 ms.

    Measured on the 2-core box: p99 1.1 ms with two nice-10 workers spinning, 4-6 ms (and once
    100 ms) at nice 0, ~5 ms (the GIL's switch interval) with the work in a thread. On a shared
    machine, outside load can spoil a window, so there are up to three, each with the workers idle
    (1 s) then busy (2 s). If outside load already made the *idle* reactor late (p99 >= 3 ms) in
    every window, the machine cannot tell us anything and the test skips, saying so.
    """
    workers = pool(size=2)
    try:
        await workers.start()
        seen = []
        for _ in range(3):
            idle = await tick_lateness(1.0)
            spinning = defer.gatherResults([workers.submit(spin, 2.4), workers.submit(spin, 2.4)])
            await sleep(0.2)  # both workers are spinning
            busy = await tick_lateness(2.0)
            assert workers.busy_workers == 2 and len(busy) >= 90
            await spinning
            if p99(busy) < 0.005:
                return
            seen.append((round(p99(idle) * 1000, 2), round(p99(busy) * 1000, 2)))
        if all(idle_p99 >= 3 for idle_p99, _ in seen):
            pytest.skip(f"the machine is too busy to measure: p99 tick lateness (idle, busy) in ms: {seen}")
        raise AssertionError(f"p99 tick lateness (idle, busy) in each window, ms: {seen}")
    finally:
        await stopped(workers)
