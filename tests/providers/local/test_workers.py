"""The worker-process pool: real worker processes (forkserver), fake models and jobs.

The initializers and jobs are module-level functions of this module: the workers import it to
unpickle them, so it imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import capturedLogs
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


def load_slowly(pid_dir: str) -> None:
    """An initializer that never finishes loading (a model load the engine's death interrupts)."""
    with open(os.path.join(pid_dir, str(os.getpid())), "w"):
        pass
    time.sleep(300)


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


def spin_until(release: str, started_dir: str, limit: float) -> dict[str, Any]:
    """Pure-Python CPU work that holds the worker's GIL, like Whisper's decoding loop, from the moment
    it says it started (a file named after its pid) until ``release`` exists (or ``limit`` s pass)."""
    with open(os.path.join(started_dir, str(os.getpid())), "w"):
        pass
    end = time.monotonic() + limit
    n = 0
    while not os.path.exists(release) and time.monotonic() < end:
        n += sum(i * i for i in range(200))
    return {"released": os.path.exists(release), "pid": os.getpid(), "nice": os.nice(0)}


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
async def test_a_job_says_when_a_worker_takes_it_never_while_it_waits() -> None:
    workers = pool()
    try:
        await workers.start()
        told: list[str] = []
        running = workers.submit(sleep_then, 0.3, "first", started=lambda: told.append("first started"))
        running.addCallback(lambda value: told.append(f"{value} done"))
        assert told == ["first started"], "a free worker takes it at once"
        queued = workers.submit_timed(use_model, "second", started=lambda: told.append("second started"))
        dropped = workers.submit(use_model, "third", started=lambda: told.append("third started"))
        dropped.cancel()
        assert isinstance(await failure_of(dropped), defer.CancelledError)
        assert told == ["first started"], "the second waits behind the first"
        second = await queued
        assert told == ["first started", "first done", "second started"], "cancelled while waiting: never started"
        assert second.value["echo"] == "second"

        def broken() -> None:
            raise RuntimeError("the caller's bookkeeping broke")

        with capturedLogs() as events:
            result = await workers.submit(use_model, "fourth", started=broken)
        assert result["echo"] == "fourth", "the job ran all the same"
        assert [e["log_failure"].getErrorMessage() for e in events if "log_failure" in e] == [
            "the caller's bookkeeping broke"]
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


@pytest_twisted.ensureDeferred
async def test_busy_workers_are_lower_priority_processes_and_the_reactor_runs_while_they_spin(
        tmp_path: Any) -> None:
    """What keeps the media plane's 20 ms rhythm while models burn every core (the figures, which
    depend on the machine's load, are bench/reactor_rhythm.py's): each worker is its own process,
    at a lower priority than the engine, and while all of them spin the reactor thread goes on
    running its timers. A job run on the reactor thread would never see the release: the reactor
    could not create it before the job ended."""
    workers = pool(size=2)
    try:
        await workers.start()
        started_dir, release = tmp_path / "started", tmp_path / "release"
        started_dir.mkdir()
        jobs = [workers.submit(spin_until, str(release), str(started_dir), 30.0) for _ in range(2)]
        await wait_for(lambda: len(os.listdir(started_dir)) == 2)  # both workers are spinning
        ticks: list[float] = []
        ticker = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        ticker.start(0.02, now=False)
        await wait_for(lambda: len(ticks) >= 5)
        ticker.stop()
        assert not any(job.called for job in jobs)  # the ticks ran while both jobs were still running
        release.touch()
        results = await defer.gatherResults(jobs)

        assert all(result["released"] for result in results)
        pids = {result["pid"] for result in results}
        assert len(pids) == 2 and os.getpid() not in pids
        assert {str(pid) for pid in pids} == set(os.listdir(started_dir))
        assert workers.nice > 0
        assert [result["nice"] for result in results] == [os.nice(0) + workers.nice] * 2
    finally:
        await stopped(workers)


_ENGINE = """
import sys
from twisted.internet import reactor
from twisted_agent.providers.local.workers import WorkerPool
from tests.providers.local.test_workers import load_slowly
pool = WorkerPool(reactor, load_slowly, (sys.argv[1],), size=2, name="doomed")
reactor.callWhenRunning(pool.start)
reactor.addSystemEventTrigger("before", "shutdown", pool.stop)  # as the engine's service does
reactor.run()
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_the_engine_however_it_ends(tmp_path: Any, how: int) -> None:
    """The engine dies while its workers load: they must not outlive it (they hold its stdout, a
    model's memory, and under systemd the unit's cgroup)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE, str(tmp_path)], cwd=root)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 2:
            assert time.monotonic() < deadline and engine.poll() is None, "the workers did not start"
            time.sleep(0.05)
        workers = [int(name) for name in os.listdir(tmp_path)]
        engine.send_signal(how)
        engine.wait(timeout=30)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 30  # a hang guard, not a figure: they go at once
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker(s) {left} outlived the engine"
