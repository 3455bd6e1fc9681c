"""How much /health and /ready cost compared with /live, on a real engine over loopback HTTP.

Monitoring polls /health every few seconds on every engine; this shows what one poll costs.
/live does no work beyond the HTTP round trip, so it is the baseline measured in the same run,
and the ratio is what survives a noisy machine.

    .venv/bin/python bench/bench_health.py [requests-per-path]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any

import treq
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

from twisted_agent.config import load_config
from twisted_agent.demo import loopback
from twisted_agent.listening import address
from twisted_agent.service import AgentService


async def measure(reactor: Any, count: int) -> None:
    config = loopback(load_config(None, {"ARI_URL": "http://127.0.0.1:1/ari"}))
    config = dataclasses.replace(config, calls=dataclasses.replace(config.calls, drain_timeout=0))
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    assert service.web.port is not None
    base = f"http://127.0.0.1:{address(service.web.port)[1]}"
    results: dict[str, list[float]] = {}
    try:
        # /live first and last: if the two baselines differ, the machine was busy during the run
        for label, path in (("/live", "/live"), ("/health", "/health"), ("/ready", "/ready"),
                            ("/live#2", "/live")):
            times = []
            for _ in range(count):
                started = time.perf_counter()
                response = await treq.get(base + path, pool=pool)
                await response.content()
                times.append(time.perf_counter() - started)
            results[label] = times
    finally:
        await pool.closeCachedConnections()
        await service.stopService()
    baseline = statistics.median(results["/live"])
    print(f"requests per path: {count} (keep-alive, sequential), python {sys.version.split()[0]}")
    print(f"{'path':<8} {'median ms':>10} {'p95 ms':>8} {'req/s':>8} {'x /live':>8}")
    print("(one engine, one client, both on this reactor: the figures include the client's own work)")
    for path, times in results.items():
        times.sort()
        median = statistics.median(times)
        p95 = times[int(len(times) * 0.95) - 1]
        print(f"{path:<8} {median * 1e3:>10.3f} {p95 * 1e3:>8.3f} {1 / median:>8.0f} {median / baseline:>8.2f}")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    task.react(lambda reactor: Deferred.fromCoroutine(measure(reactor, count)))


if __name__ == "__main__":
    main()
