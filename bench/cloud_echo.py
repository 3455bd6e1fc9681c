"""Cloud voice agents on an echoing line: does the agent interrupt itself, and can the caller still?

The real engine (RTP, stream mode) against the built-in Asterisk simulator and the fake Deepgram
Voice Agent and OpenAI Realtime services (sim/deepgram.py, sim/openai_realtime.py), which take a
single 20 ms frame above their speech level for the caller's voice. The agent speaks with a real
voice (bench/barge_in.py's: the bundled question clip played backwards).

* **False barge-ins**: the agent greets, for ``--minutes``, a caller who says nothing, over a line
  that returns its echo (40 ms late, 300-3400 Hz, -10 dB), then the same with white noise at
  -40 dBFS too. Each run twice: as shipped (while the agent speaks, the engine's echo check sends
  the cloud agent silence in place of its echo: calls/interruptions.py) and without that check
  (every frame passed on, as before it existed: the baseline, in the same run). Target: none as
  shipped.
* **Barge-in latency**: ``--interruptions`` times the caller talks over the agent at a random
  point of its reply; from the phone's first voiced frame to the agent's last frame on the wire,
  p50/p95, on a clean line and on the echoing one (what the echo check costs the caller).

    .venv/bin/python bench/cloud_echo.py [--minutes 1] [--interruptions 20]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from bench.barge_in import CLIP, LEAD_S, SpeechVoice, percentile, start, stop  # noqa: E402
from twisted_agent.calls.interruptions import Interruptions  # noqa: E402
from twisted_agent.demo import APP, sleep, until  # noqa: E402
from twisted_agent.sim.deepgram import FakeDeepgram  # noqa: E402
from twisted_agent.sim.line import LineEcho, LineNoise  # noqa: E402
from twisted_agent.sim.openai_realtime import FakeRealtime  # noqa: E402

PROVIDERS = ("deepgram", "openai_realtime")
REPLY = " ".join(["bread"] * 40)  # 6.4 s of voice


class Run:
    """Both fake services, and the simulator with an engine (bench/barge_in.py's) whose calls go to
    ``provider``."""

    def __init__(self, reactor: Any, provider: str, greeting: str) -> None:
        self.reactor = reactor
        self.provider = provider
        self.greeting = greeting
        self.deepgram = FakeDeepgram(reactor, api_key="bench")
        self.openai = FakeRealtime(reactor, api_key="bench")
        for fake in (self.deepgram, self.openai):
            fake.voice = SpeechVoice()
        self.fake: Any = self.deepgram if provider == "deepgram" else self.openai

    async def __aenter__(self) -> Run:
        await self.deepgram.start()
        await self.openai.start()
        self.sim, self.service, self.media_dir = await start(
            self.reactor, self.greeting, "stream", AI_PROVIDER=self.provider,
            DEEPGRAM_API_KEY="bench", DEEPGRAM_URL=self.deepgram.url,
            OPENAI_API_KEY="bench", OPENAI_REALTIME_URL=self.openai.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop(self.sim, self.service, self.media_dir)
        await self.deepgram.stop()
        await self.openai.stop()

    async def call(self, echo: bool, noise: bool) -> tuple[Any, Any]:
        caller = self.sim.originate(APP)
        caller.line(echo=LineEcho(40, -10) if echo else None, noise=LineNoise(-40) if noise else None)
        await caller.answered
        await until(self.reactor, lambda: caller.first_heard_at() is not None, 10, "the greeting")
        return caller, self.service.engine.calls[caller.channel_id]


class Unchecked:
    """The baseline: every caller frame goes to the cloud agent, echo and all."""

    def __enter__(self) -> None:
        self._shipped = Interruptions.for_cloud
        Interruptions.for_cloud = lambda self, frame, agent_has_floor: frame  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        Interruptions.for_cloud = self._shipped  # type: ignore[method-assign]


async def false_barge_ins(reactor: Any, provider: str, minutes: float, noise: bool) -> tuple[int, float, int]:
    """Barge-ins, seconds the agent spoke before it stopped (or the time ran out), frames silenced."""
    words = int(minutes * 60 * 1000 / 160) + 1  # 160 ms a word
    async with Run(reactor, provider, " ".join(["bread"] * words)) as run:
        caller, call = await run.call(echo=True, noise=noise)
        await until(reactor, lambda: call.state == "speaking", 10, "the agent to speak")
        started = reactor.seconds()
        while call.state == "speaking" and reactor.seconds() - started <= minutes * 60:
            await sleep(reactor, 0.02)
        spoke = reactor.seconds() - started
        result = len(call.barge_ins), spoke, call.interruptions.cloud_suppressed
        await caller.hangup()
    return result


async def latency(reactor: Any, provider: str, count: int, echo: bool) -> tuple[list[float], list[str]]:
    """Milliseconds from the caller's first voiced frame to the agent's last frame, and what went
    wrong where the agent did not stop within 5 s (the state it stayed in)."""
    rng = random.Random(7)
    results: list[float] = []
    missed: list[str] = []
    interruption = CLIP[: int((LEAD_S + 0.56) * 16000)]
    async with Run(reactor, provider, REPLY) as run:
        run.fake.script = [{"say": REPLY}] * (count + 1)
        caller, call = await run.call(echo=echo, noise=False)
        while len(results) + len(missed) < count:
            await until(reactor, lambda: call.state == "speaking", 15, "the agent to speak")
            await sleep(reactor, rng.uniform(0.3, 1.5))
            if call.state != "speaking":
                continue  # what was speaking was the tail of the interrupted reply, not the next one
            wanted = len(call.barge_ins) + 1
            onset = reactor.seconds() + LEAD_S
            await caller.say(interruption)
            try:
                await until(reactor, lambda n=wanted: len(call.barge_ins) >= n, 5, "the barge-in")
            except TimeoutError:
                missed.append(f"{call.state}, {call.interruptions.cloud_suppressed} frames silenced")
                continue
            last_sent = call.session.last_sent_at
            assert last_sent is not None and last_sent <= call.barge_ins[-1] + 0.001
            results.append((last_sent - onset) * 1000)
        await caller.hangup()
    return results, missed


async def main(reactor: Any, minutes: float, interruptions: int) -> None:
    for provider in PROVIDERS:
        for label, noise in (("echo 40 ms, 300-3400 Hz, -10 dB", False), ("echo and white noise -40 dBFS", True)):
            count, spoke, silenced = await false_barge_ins(reactor, provider, minutes, noise)
            with Unchecked():
                base_count, base_spoke, _ = await false_barge_ins(reactor, provider, minutes, noise)
            print(f"false barge-ins, {provider}, {label}: {count} in {spoke:.0f} s of agent speech "
                  f"({silenced} echo frames sent as silence); without the echo check: {base_count}, "
                  f"the agent stopped after {base_spoke:.1f} s")
        for label, echo in (("clean line", False), ("echoing line", True)):
            values, missed = await latency(reactor, provider, interruptions, echo)
            print(f"barge-in, {provider}, {label}: caller's first voiced audio on the wire -> last agent frame "
                  f"on the wire, {len(values)} interruptions: p50 {statistics.median(values):.0f} ms, "
                  f"p95 {percentile(values, 0.95):.0f} ms, max {max(values):.0f} ms; missed {len(missed)} {missed}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--interruptions", type=int, default=20)
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.minutes, args.interruptions)))
