"""What the call store costs the engine, and how fast Redis takes its records.

Prints, for the in-memory store (the baseline) and the Redis store against a local redis-server
started here on a free loopback port:

- the reactor time one live-record update costs the engine (``call_updated``: copy or JSON, queue),
  for a realistic record (a 10-turn call: 21 transcript lines, 10 timing dicts);
- Redis: records written per second (live updates of many calls, then their finishes), from the
  first write until nothing waits;
- Redis: after an outage with N finished calls buffered, the seconds from Redis coming back until
  every record is written (includes the reconnection back-off's first retry).

Usage: .venv/bin/python bench/store.py [--updates 20000] [--calls 200] [--buffered 5000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from twisted_agent.config import StoreConfig
from twisted_agent.demo import free_port
from twisted_agent.store.memory import MemoryStore
from twisted_agent.store.redis import RedisStore


def record(call_id: str, turns: int = 10) -> dict[str, Any]:
    transcript = [{"speaker": "agent", "text": "Hello, how can I help you today?"}]
    timings = []
    for turn in range(turns):
        transcript.append({"speaker": "caller", "text": f"I would like to know the opening hours, question {turn}"})
        transcript.append({"speaker": "agent", "text": "We open at nine every morning and close at six."})
        timings.append({"turn_end_wait_ms": 500.0, "provider_stt_ms": 180.2, "provider_llm_first_token_ms": 240.7,
                        "provider_tts_first_sentence_ms": 90.1, "voice_to_voice_ms": 1010.4,
                        "after_turn_end_ms": 510.4})
    return {"call_id": call_id, "engine_id": "bench", "caller_number": "+15551230000", "caller_name": "Bench",
            "provider": "local", "provider_source": "default", "context": "default", "context_source": "default",
            "state": "listening", "transport": "externalmedia", "downstream_mode": "stream",
            "started_at": time.time(), "updated_at": time.time(), "transcript": transcript, "turns": timings,
            "last_turn": timings[-1]}


def finished(live: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {**live, "state": "ended", "ended_at": now, "duration_s": 60.0, "outcome": "completed",
            "end_reason": "caller hung up", "hangup_cause": "Normal Clearing (16)",
            "media": {"frames_in": 3000, "frames_out": 2900, "packets_in": 3000, "lost": 0}}


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Any, timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        await sleep(0.001)
    return time.perf_counter() - started


class RedisServer:
    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


def update_cost(store: Any, calls: list[dict[str, Any]], updates: int) -> float:
    """Microseconds of reactor time per call_updated (the writes to Redis happen later)."""
    started = time.perf_counter()
    for i in range(updates):
        store.call_updated(calls[i % len(calls)])
    return (time.perf_counter() - started) / updates * 1e6


async def main(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpu(s)")
    calls = [record(f"1700000000.{i}") for i in range(args.calls)]
    size = len(__import__("json").dumps(calls[0]))
    print(f"record: 10 turns, {size} bytes of JSON; {args.updates} updates over {args.calls} calls")

    memory = MemoryStore(reactor, StoreConfig(history_max=100000))
    memory_us = update_cost(memory, calls, args.updates)
    print(f"memory store   call_updated  {memory_us:8.1f} us   x1.00 (baseline)")

    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not installed: Redis figures skipped (apt-get install redis-server)")
        return
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(binary, directory)
        server.start()
        config = StoreConfig(redis_url=f"redis://127.0.0.1:{server.port}/0", prefix="bench", engine_id="bench",
                             history_max=100000, buffer_max=1_000_000)
        store = RedisStore(reactor, config)
        store.start()
        try:
            await until(lambda: store.stats()["connected"], 10, "the connection")
            # the queue coalesces updates of one call: measure the engine-side cost first, then the
            # write rate with every record distinct (the worst case for Redis)
            redis_us = update_cost(store, calls, args.updates)
            await until(lambda: store.stats()["buffered"] == 0, 60, "the updates to be written")
            print(f"redis store    call_updated  {redis_us:8.1f} us   x{redis_us / memory_us:.2f}")

            distinct = [record(f"1800000000.{i}") for i in range(args.updates // 4)]
            started = time.perf_counter()
            for live in distinct:
                store.call_updated(live)
            for live in distinct:
                store.call_finished(finished(live))
            seconds = await until(lambda: store.stats()["buffered"] == 0, 120, "the records to be written")
            seconds = time.perf_counter() - started
            count = 2 * len(distinct)
            print(f"redis writes   {count} records (live then finished) in {seconds:.2f} s: "
                  f"{count / seconds:,.0f} records/s")

            server.stop()
            await until(lambda: not store.stats()["connected"], 10, "the store to notice the outage")
            for live in [record(f"1900000000.{i}") for i in range(args.buffered)]:
                store.call_finished(finished(live))
            waiting = store.stats()["buffered"]
            server.start()
            started = time.perf_counter()
            await until(lambda: store.stats()["connected"], 30, "the reconnection")
            reconnect = time.perf_counter() - started
            await until(lambda: store.stats()["buffered"] == 0, 120, "the buffered records")
            total = time.perf_counter() - started
            print(f"after outage   {waiting} finished calls buffered: reconnected {reconnect:.2f} s after Redis "
                  f"returned, all written {total:.2f} s after ({total - reconnect:.2f} s of writing)")
        finally:
            await store.stop()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=20000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--buffered", type=int, default=5000)
    arguments = parser.parse_args()
    react(lambda _reactor: Deferred.fromCoroutine(main(arguments)))
