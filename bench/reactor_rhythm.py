"""Does the reactor keep its 20 ms rhythm while model workers burn every core?

A 20 ms ``LoopingCall`` on the reactor (the media pacer's beat) records how late each tick runs
against its deadline, in windows of ``--seconds``, round-robin over these modes:

* ``idle``: nothing else runs in this process or its workers: the baseline, measured in the same
  run, so a noisy machine shows in it too;
* ``workers``: ``--workers`` processes of a :class:`~twisted_agent.providers.local.workers.WorkerPool`
  at nice 10 (what the agent's Whisper and Piper workers are) spin in pure Python, holding their
  own GIL as Whisper's decoding loop does; by default one per core, so every core is busy;
* ``workers-nice0``: the same at nice 0, to see what the nice buys;
* ``thread``: one such spin on the reactor's thread pool (``deferToThread``), in the engine's
  process: what running a model in a thread would do to the reactor (the GIL).

No model is loaded (bench/inference_isolation.py measures the media plane under real Whisper
inference); this is the figure the test suite once asserted, now reported instead: p50/p95/p99/max
tick lateness per mode, and p99 against the idle baseline. Everything is in this process and its
workers; no Asterisk.

    .venv/bin/python bench/reactor_rhythm.py [--seconds 2] [--rounds 2] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODES = ("idle", "workers", "workers-nice0", "thread")
INTERVAL = 0.02
WARM = 0.2  # seconds between starting the spins and measuring: every spinner is running by then


# -- what runs in the workers (module-level, so forkserver workers can unpickle them) ---------------


def load_nothing() -> None:
    """The workers' initializer: no model, the spin is the work."""


def spin(seconds: float) -> int:
    """Pure-Python CPU work that holds the worker's GIL, like Whisper's decoding loop."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(200))
    return n


# -- the measurement -------------------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[round(fraction * (len(sorted_values) - 1))]


async def tick_lateness(reactor: Any, seconds: float) -> tuple[list[float], int]:
    """Each tick's lateness (seconds) against the first deadline it was due at, and the ticks skipped."""
    from twisted.internet import task

    lateness: list[float] = []
    due = [0]  # intervals since start of the next deadline
    skipped = [0]
    start = reactor.seconds()

    def tick(count: int) -> None:
        # count > 1: LoopingCall skipped deadlines; this tick is late against the first one it missed
        lateness.append(reactor.seconds() - (start + (due[0] + 1) * INTERVAL))
        skipped[0] += count - 1
        due[0] += count

    ticker = task.LoopingCall.withCount(tick)
    ticker.clock = reactor
    done = ticker.start(INTERVAL, now=False)
    await task.deferLater(reactor, seconds, lambda: None)
    ticker.stop()
    await done
    return lateness, skipped[0]


async def measure(reactor: Any, mode: str, pools: dict[str, Any], seconds: float) -> dict[str, Any]:
    from twisted.internet import defer, task, threads

    burn = WARM + seconds + WARM
    if mode == "idle":
        spinning: defer.Deferred[Any] = defer.succeed(None)
    elif mode == "thread":
        spinning = threads.deferToThread(spin, burn)
    else:
        pool = pools[mode]
        spinning = defer.gatherResults([pool.submit(spin, burn) for _ in range(pool.size)])
    await task.deferLater(reactor, WARM, lambda: None)
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    lateness, skipped = await tick_lateness(reactor, seconds)
    cpu = 100 * (cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    await spinning
    return {"lateness": lateness, "skipped": skipped, "cpu": cpu}


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from twisted_agent.providers.local.workers import WorkerPool

    modes = args.modes.split(",")
    pools = {
        "workers": WorkerPool(reactor, load_nothing, size=args.workers, name="spin", nice=10),
        "workers-nice0": WorkerPool(reactor, load_nothing, size=args.workers, name="spin-nice0", nice=0),
    }
    try:
        for mode, pool in pools.items():
            if mode in modes:
                await pool.start()
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):  # round-robin, so a burst of outside load hits one window of each
            for mode in modes:
                results[mode].append(await measure(reactor, mode, pools, args.seconds))
    finally:
        for pool in pools.values():
            await pool.stop()
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"reactor rhythm: a 20 ms LoopingCall's tick lateness while {args.workers} worker process(es) "
          f"(or one reactor-pool thread) spin in pure Python; {args.rounds} round(s) of {args.seconds:g} s "
          f"per mode, round-robin; python {sys.version.split()[0]}, {os.cpu_count()} cores, in-process, no Asterisk")
    print(f"{'mode':<14} {'procs':>5} {'nice':>4} {'ticks':>5} {'skip':>4} {'p50ms':>6} {'p95ms':>6} {'p99ms':>6} "
          f"{'maxms':>7} {'p99-idle':>8} {'x idle':>6} {'eng cpu%':>8}  p99ms per round")
    shape = {"idle": (0, 0), "workers": (args.workers, 10), "workers-nice0": (args.workers, 0), "thread": (0, 0)}
    baseline: float | None = None
    for mode, windows in results.items():
        values = sorted(v for window in windows for v in window["lateness"])
        p99 = percentile(values, 0.99) * 1000
        if mode == "idle":
            baseline = p99
        per_round = " ".join(f"{percentile(sorted(w['lateness']), 0.99) * 1000:.2f}" for w in windows)
        versus = f"{p99 - baseline:>+8.2f} {p99 / baseline if baseline else float('nan'):>6.1f}" \
            if baseline is not None else f"{'-':>8} {'-':>6}"
        procs, nice = shape[mode]
        cpu = sum(w["cpu"] for w in windows) / len(windows)
        print(f"{mode:<14} {procs:>5} {nice:>4} {len(values):>5} {sum(w['skipped'] for w in windows):>4} "
              f"{percentile(values, 0.5) * 1000:>6.2f} {percentile(values, 0.95) * 1000:>6.2f} {p99:>6.2f} "
              f"{values[-1] * 1000:>7.2f} {versus} {cpu:>8.1f}  {per_round}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per window")
    parser.add_argument("--rounds", type=int, default=2, help="windows per mode, round-robin over the modes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="spinning worker processes (default: one per core)")
    parser.add_argument("--modes", default=",".join(MODES), help="which of " + ", ".join(MODES))
    args = parser.parse_args()
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    react(lambda reactor: ensureDeferred(run(reactor, args)))

if __name__ == "__main__":
    main()
