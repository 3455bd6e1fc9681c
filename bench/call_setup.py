"""Call set-up and platform overhead, over whole simulated calls.

The real engine (AgentService) against the built-in Asterisk simulator on loopback, with the echo
provider (instant: no model), so what is measured is the platform itself:

(a) set-up: StasisStart -> the first greeting audio reaching the simulated caller;
(b) platform overhead: the end of the caller's speech -> the first reply audio reaching the caller,
    minus the configured turn-end pause (TURN_END_MS), i.e. what the engine, ARI and the media path
    add on top of the pause that decides the turn is over.

Both in file mode (reply files played through ARI) and in stream mode (RTP). Calls run ``--concurrency``
at a time.

Then the cloud providers (Deepgram Voice Agent, OpenAI Realtime) against their fakes, which answer
at once, in stream mode, one call at a time:

(c) set-up: StasisStart -> greeting heard, which now includes opening the WebSocket and the
    Settings / session.update handshake on loopback;
(d) the latency the adapter adds: the fake sends the first chunk of a reply -> the engine has it
    as agent audio (WebSocket frame, JSON or binary, base64 and μ-law decoding, the provider's
    bookkeeping, events to the call). Target: p95 <= 20 ms.

    .venv/bin/python bench/call_setup.py [--calls 100] [--concurrency 10] [--cloud-calls 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402

from twisted_agent.calls.call import Call  # noqa: E402
from twisted_agent.config import load_config  # noqa: E402
from twisted_agent.demo import APP, loopback, question_clip, until  # noqa: E402
from twisted_agent.service import AgentService  # noqa: E402
from twisted_agent.sim import AsteriskSimulator  # noqa: E402
from twisted_agent.sim.deepgram import DeepgramServerProtocol, FakeDeepgram  # noqa: E402
from twisted_agent.sim.openai_realtime import FakeRealtime, FakeSession  # noqa: E402

SPEECH = question_clip()[: 16000 * 1]  # the first second of the question: "Hello, what are..."


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def greeted(reactor: Any, sim: AsteriskSimulator, service: AgentService) -> tuple[Any, Any, float]:
    """A call, once its greeting has played out: (caller, call, StasisStart -> greeting heard in s)."""
    rang = reactor.seconds()  # the simulator sends StasisStart as it originates
    caller = sim.originate(APP)
    await caller.answered
    await until(reactor, lambda: caller.first_heard_at() is not None, 10, "the greeting")
    heard = caller.first_heard_at()
    assert heard is not None
    call = service.engine.calls[caller.channel_id]
    await until(reactor, lambda: call.state == "listening", 10, "the greeting to end")
    return caller, call, heard - rang


async def one_call(reactor: Any, sim: AsteriskSimulator, service: AgentService, pause_s: float) -> tuple[float, float]:
    caller, call, setup = await greeted(reactor, sim, service)
    origin = caller.answered_at  # heard_segments() count from here
    assert origin is not None
    await caller.say(SPEECH)
    before = len(caller.heard_segments())
    await until(reactor, lambda: len(caller.heard_segments()) > before, 10, "the answer")
    answered = caller.heard_segments()[before][0] + origin
    # the caller's speech ended at its last voiced frame, which the engine timed: use that moment
    speech_end = call.turns.speech_ended_at
    assert speech_end is not None
    overhead = answered - speech_end - pause_s
    await caller.hangup()
    return setup, overhead


async def run_mode(reactor: Any, mode: str, calls: int, concurrency: int) -> dict[str, list[float]]:
    media_dir = tempfile.mkdtemp(prefix="ai-agent-bench-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="bench")
    await sim.start()
    config = loopback(load_config(None, {}))
    config = dataclasses.replace(
        config,
        ari=dataclasses.replace(config.ari, url=sim.ari_url, username="ai-agent", password="bench", app=APP),
        media=dataclasses.replace(config.media, media_dir=media_dir, downstream_mode=mode),
        calls=dataclasses.replace(config.calls, default_provider="echo", no_audio_seconds=0, drain_timeout=1),
    )
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    setups: list[float] = []
    overheads: list[float] = []
    try:
        await until(reactor, lambda: service.ari.connected, 10, "ARI")
        pause = config.calls.turn_end_ms / 1000
        done = 0
        while done < calls:
            batch = min(concurrency, calls - done)
            results = await gatherResults([Deferred.fromCoroutine(one_call(reactor, sim, service, pause))
                                           for _ in range(batch)])
            for setup, overhead in results:
                setups.append(setup * 1000)
                overheads.append(overhead * 1000)
            done += batch
        await until(reactor, lambda: not service.engine.calls and not sim.live_channels(), 10, "clean-up")
        leftovers = [n for n in os.listdir(media_dir) if n.startswith("ai-")]
        assert not leftovers, leftovers
    finally:
        await service.stopService()
        await sim.stop()
        for name in os.listdir(media_dir):
            os.unlink(os.path.join(media_dir, name))
        os.rmdir(media_dir)
    return {"setup": setups, "overhead": overheads}


class Marks:
    """When the fakes sent reply audio, and when calls got it (one call at a time: no ambiguity)."""

    def __init__(self, reactor: Any) -> None:
        self.sent: list[float] = []
        self.received: list[float] = []
        clock = reactor
        marks = self
        send_audio, send_event, agent_audio = DeepgramServerProtocol.send_audio, FakeSession.send, Call.agent_audio

        def deepgram_audio(protocol: Any, chunk: bytes) -> None:
            marks.sent.append(clock.seconds())
            send_audio(protocol, chunk)

        def openai_event(fake_session: Any, event_type: str, /, **fields: Any) -> None:
            if event_type.endswith("audio.delta"):
                marks.sent.append(clock.seconds())
            send_event(fake_session, event_type, **fields)

        def engine_audio(call: Any, pcm: bytes, rate: int, utterance_id: str) -> None:
            marks.received.append(clock.seconds())
            agent_audio(call, pcm, rate, utterance_id)

        DeepgramServerProtocol.send_audio = deepgram_audio  # type: ignore[method-assign,assignment]
        FakeSession.send = openai_event  # type: ignore[method-assign,assignment]
        Call.agent_audio = engine_audio  # type: ignore[method-assign,assignment]

    def clear(self) -> None:
        self.sent.clear()
        self.received.clear()


async def cloud_call(reactor: Any, sim: AsteriskSimulator, service: AgentService, marks: Marks) -> tuple[float, float]:
    caller, _, setup = await greeted(reactor, sim, service)
    marks.clear()
    before = len(caller.heard_segments())
    await caller.say(SPEECH)
    await until(reactor, lambda: len(caller.heard_segments()) > before, 10, "the answer")
    added = marks.received[0] - marks.sent[0]
    await caller.hangup()
    await until(reactor, lambda: not service.engine.calls, 10, "the call to end")
    return setup, added


async def run_cloud(reactor: Any, provider: str, calls: int, marks: Marks) -> dict[str, list[float]]:
    media_dir = tempfile.mkdtemp(prefix="ai-agent-bench-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="bench")
    fake: Any = FakeDeepgram(reactor) if provider == "deepgram" else FakeRealtime(reactor)
    await sim.start()
    await fake.start()
    env = {"DEEPGRAM_API_KEY": "test-key", "DEEPGRAM_URL": fake.url} if provider == "deepgram" else \
        {"OPENAI_API_KEY": "test-key", "OPENAI_REALTIME_URL": fake.url}
    config = loopback(load_config(None, {"AI_PROVIDER": provider, "DOWNSTREAM_MODE": "stream", **env}))
    config = dataclasses.replace(
        config,
        ari=dataclasses.replace(config.ari, url=sim.ari_url, username="ai-agent", password="bench", app=APP),
        media=dataclasses.replace(config.media, media_dir=media_dir),
        calls=dataclasses.replace(config.calls, no_audio_seconds=0, drain_timeout=1),
    )
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    result: dict[str, list[float]] = {"setup": [], "added": []}
    try:
        await until(reactor, lambda: service.ari.connected, 10, "ARI")
        for _ in range(calls):
            setup, added = await cloud_call(reactor, sim, service, marks)
            result["setup"].append(setup * 1000)
            result["added"].append(added * 1000)
        assert not fake.violations, fake.violations
    finally:
        await service.stopService()
        await fake.stop()
        await sim.stop()
        for name in os.listdir(media_dir):
            os.unlink(os.path.join(media_dir, name))
        os.rmdir(media_dir)
    return result


def row(label: str, metric: str, values: list[float]) -> None:
    print(f"{label:<16} {metric:<34} {statistics.median(values):>8.1f} {percentile(values, 0.95):>8.1f} "
          f"{max(values):>8.1f}", flush=True)


async def main(reactor: Any, calls: int, concurrency: int, cloud_calls: int) -> None:
    print(f"call set-up and platform overhead: {calls} calls per mode, {concurrency} at a time, echo provider, "
          f"simulator and engine in one process, python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"{'mode':<16} {'metric':<34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for mode in ("file", "stream"):
        result = await run_mode(reactor, mode, calls, concurrency)
        row(mode, "(a) StasisStart -> greeting heard", result["setup"])
        row(mode, "(b) platform overhead", result["overhead"])
    if not cloud_calls:
        return
    marks = Marks(reactor)
    for provider in ("deepgram", "openai_realtime"):
        result = await run_cloud(reactor, provider, cloud_calls, marks)
        row(provider, "(c) StasisStart -> greeting heard", result["setup"])
        row(provider, "(d) adapter: sent -> engine has it", result["added"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cloud-calls", type=int, default=30, help="calls per cloud provider (0: none)")
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.calls, args.concurrency, args.cloud_calls)))
