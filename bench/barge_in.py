"""Barge-in: how fast the agent stops when the caller talks over it, and how often it stops for nothing.

The real engine (RTP) against the built-in Asterisk simulator, in stream mode and in file mode,
with the echo provider so the barge-in path alone is measured; the agent speaks with a real voice
(the bundled Piper clip backwards, repeated to the length of each reply), not a tone, so the echo
check sees speech.

* **Latency**: ``--interruptions`` times (default 50) the caller starts talking over the agent
  at a random point of its reply (the first 0.8 s of the bundled question); measured from the
  moment the caller's phone sends its first voiced frame to the moment the agent's audio stops on
  the wire (stream mode: the engine sends its last agent frame; file mode: the simulated Asterisk
  stops the playback, which the engine pauses at ChannelTalkingStarted), p50/p95. Target: p95 <=
  150 ms.
* **False barge-ins**: the agent talks for ``--minutes`` (default 1) to a caller who says nothing,
  over a line that returns (a) its echo: 40 ms late, band-limited 300-3400 Hz, -10 dB; (b) white
  noise at -40 dBFS; (c) both. Barge-ins per minute (file mode: and the pauses talk detection
  caused). Target: none.

``--verbose`` adds, per false-barge-in run, the echo check's counts (frames judged echo, too quiet
or the caller's, the learnt echo delay, silence put in for pauses and taken out as stalls), the
send lateness, and for each false barge-in the echo check's figures for the frames before it.

    .venv/bin/python bench/barge_in.py [--interruptions 50] [--minutes 1] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
from datetime import datetime
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from twisted_agent.calls.call import Call  # noqa: E402
from twisted_agent.config import load_config  # noqa: E402
from twisted_agent.demo import APP, free_port, question_clip, sleep, until  # noqa: E402
from twisted_agent.media.echo import Judgement  # noqa: E402
from twisted_agent.providers.echo import EchoFactory, EchoProvider  # noqa: E402
from twisted_agent.providers.voices import ToneVoice  # noqa: E402
from twisted_agent.service import AgentService  # noqa: E402
from twisted_agent.sim import AsteriskSimulator  # noqa: E402
from twisted_agent.sim.line import LineEcho, LineNoise  # noqa: E402

CLIP = question_clip()
# the clip's first voiced frame is its 13th; the simulated phone sends frame n at n x 20 ms
LEAD_S = 0.26


class SpeechVoice(ToneVoice):
    """Speaks any text as speech: the bundled clip played backwards (a voice, but not the caller's
    words: the echo check must not find the caller's speech in the agent's), tiled to the tone
    voice's length for the text."""

    voice = np.frombuffer(CLIP, dtype="<i2")[::-1].astype("<i2").tobytes()

    def render(self, text: str) -> bytes:
        size = self.duration_ms(text) * 16
        return (self.voice * (size // len(self.voice) + 1))[:size]


class SpeechEchoFactory(EchoFactory):
    def create(self) -> EchoProvider:
        provider = EchoProvider(self._clock, voice=SpeechVoice())
        self.created.append(provider)
        return provider


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def start(reactor: Any, greeting: str, mode: str = "stream",
                **env: str) -> tuple[AsteriskSimulator, AgentService, str]:
    """The simulator and an engine (echo provider unless ``env`` says otherwise) on loopback."""
    media_dir = tempfile.mkdtemp(prefix="ai-agent-bench-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="bench")
    await sim.start()
    config = load_config(None, {
        "ARI_URL": sim.ari_url, "ARI_USERNAME": "ai-agent", "ARI_PASSWORD": "bench", "ARI_APP": APP,
        "RTP_HOST": "127.0.0.1", "RTP_PORT": str(free_port(socket.SOCK_DGRAM)), "RTP_ADVERTISE_HOST": "127.0.0.1",
        "AUDIOSOCKET_HOST": "127.0.0.1", "AUDIOSOCKET_PORT": str(free_port()), "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": str(free_port()), "MEDIA_DIR": media_dir, "AI_PROVIDER": "echo", "NO_AUDIO_SECONDS": "0",
        "DOWNSTREAM_MODE": mode, "DRAIN_TIMEOUT": "1", "CONTEXT_DEFAULT_GREETING": greeting, **env,
    })
    service = AgentService(config, reactor)
    service.providers.factories["echo"] = SpeechEchoFactory(reactor)
    service.privilegedStartService()
    service.startService()
    await until(reactor, lambda: service.ari.connected, 10, "ARI")
    return sim, service, media_dir


async def stop(sim: AsteriskSimulator, service: AgentService, media_dir: str) -> None:
    await service.stopService()
    await sim.stop()
    for name in os.listdir(media_dir):
        os.unlink(os.path.join(media_dir, name))
    os.rmdir(media_dir)


def playback_stopped_at(sim: AsteriskSimulator, since: float) -> float | None:
    """When the first playback that ended after ``since`` ended (the simulator's event time)."""
    for event in sim.events_sent():
        if event["type"] == "PlaybackFinished":
            at = datetime.strptime(event["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            if at >= since:
                return at
    return None


async def latency(reactor: Any, count: int, mode: str = "stream") -> list[float]:
    sim, service, media_dir = await start(reactor, "Hello, thank you for calling the bakery on the corner, "
                                                   "how can we help you today?", mode)
    rng = random.Random(7)
    results: list[float] = []
    try:
        caller = sim.originate(APP)
        await caller.answered
        await until(reactor, lambda: caller.first_heard_at() is not None, 10, "the greeting")
        call = service.engine.calls[caller.channel_id]
        interruption = CLIP[: int((LEAD_S + 0.56) * 16000)]
        for _ in range(count):
            await until(reactor, lambda: call.state == "speaking", 10, "the agent to speak")
            await sleep(reactor, rng.uniform(0.15, 0.6))
            wanted = len(call.barge_ins) + 1
            onset = reactor.seconds() + LEAD_S
            await caller.say(interruption)
            await until(reactor, lambda n=wanted: len(call.barge_ins) >= n, 5, "the barge-in")
            if mode == "stream":
                last_sent = call.session.last_sent_at
                assert last_sent is not None and last_sent <= call.barge_ins[-1] + 0.001
            else:  # the file stopped playing (paused at the caller's first syllable, then deleted)
                last_sent = playback_stopped_at(sim, onset - 0.5)
                assert last_sent is not None and last_sent <= call.barge_ins[-1] + 0.001
            results.append((last_sent - onset) * 1000)
        await caller.hangup()
    finally:
        await stop(sim, service, media_dir)
    return results


class EchoWatch:
    """``--verbose``: what the echo check said about the frames before each barge-in."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.started = 0.0
        self.before: list[tuple[float, list[Judgement]]] = []

    def poll(self) -> None:
        barge_ins, history = self.call.barge_ins, self.call.session.echo.history
        while len(self.before) < len(barge_ins):
            at = barge_ins[len(self.before)]
            self.before.append((at, [j for j in history if j.at <= at + 1e-6][-8:]))

    def report(self) -> None:
        echo, lateness = self.call.session.echo, self.call.session.lateness.summary()
        delay = f"{echo.delay * 1000 / 8000:.0f} ms" if echo.delay is not None else "not learnt"
        callers = echo.judged - echo.echoes - echo.too_quiet
        print(f"  echo check: {echo.judged} voiced frames judged, {echo.echoes} echo, {echo.too_quiet} too quiet, "
              f"{callers} the caller's; echo delay {delay}; {echo.silence_frames} frames of silence put in, "
              f"{echo.stall_frames} taken out (stalls); send lateness p50 {lateness['p50_ms']} ms, "
              f"p99 {lateness['p99_ms']} ms, max {lateness['max_ms']} ms")
        for at, judged in self.before:
            print(f"  barge-in {at - self.started:.2f} s into the reply; the frames before it "
                  f"(ms before, rho, delay ms, residual dBFS, ms past the reference's end, caller):")
            for j in judged:
                print(f"    {(j.at - at) * 1000:6.0f} {j.rho:6.3f} {j.delay_ms:6.1f} {j.residual_dbfs:6.1f} "
                      f"{j.offset_ms:6.1f}  {'caller' if j.caller else '-'}")


async def false_barge_ins(reactor: Any, minutes: float, echo: bool, noise: bool, verbose: bool = False,
                          mode: str = "stream") -> tuple[int, float, EchoWatch | None, int]:
    words = int(minutes * 60 * 1000 / 160) + 1  # the tone voice: 160 ms a word
    sim, service, media_dir = await start(reactor, " ".join(["bread"] * words), mode)
    try:
        caller = sim.originate(APP)
        caller.line(echo=LineEcho(40, -10) if echo else None, noise=LineNoise(-40) if noise else None)
        await caller.answered
        await until(reactor, lambda: caller.first_heard_at() is not None, 10, "the greeting")
        call = service.engine.calls[caller.channel_id]
        watch = EchoWatch(call) if verbose and mode == "stream" else None
        started = reactor.seconds()
        while call.state == "speaking" and reactor.seconds() - started <= minutes * 60:
            if watch is not None:
                watch.poll()
            await sleep(reactor, 0.01)
        spoke = reactor.seconds() - started
        count = len(call.barge_ins)
        pauses = getattr(call.player, "pauses", 0)  # file mode: talk detection paused the reply
        if watch is not None:
            watch.poll()
            watch.started = started
        await caller.hangup()
    finally:
        await stop(sim, service, media_dir)
    return count, spoke, watch, pauses


async def main(reactor: Any, interruptions: int, minutes: float, verbose: bool) -> None:
    for mode, how in (("stream", "stream mode, RTP"), ("file", "file mode, RTP, TALK_DETECT")):
        values = await latency(reactor, interruptions, mode)
        print(f"barge-in: caller's first voiced audio on the wire -> last agent frame on the wire, "
              f"{len(values)} interruptions ({how}, BARGE_IN_MIN_MS=120)")
        print(f"  p50 {statistics.median(values):.0f} ms, p95 {percentile(values, 0.95):.0f} ms, "
              f"max {max(values):.0f} ms")
    for mode in ("stream", "file"):
        for label, echo, noise in (("echo 40 ms, 300-3400 Hz, -10 dB", True, False),
                                   ("white noise -40 dBFS", False, True), ("echo and noise", True, True)):
            count, spoke, watch, pauses = await false_barge_ins(reactor, minutes, echo, noise, verbose, mode)
            paused = f", {pauses} pauses" if mode == "file" else ""
            print(f"false barge-ins ({mode} mode), {label}: {count} in {spoke:.0f} s of agent speech "
                  f"({count / (spoke / 60):.1f} per minute){paused}")
            if watch is not None:
                watch.report()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interruptions", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--verbose", action="store_true",
                        help="the echo check's figures for each false-barge-in run and before each false barge-in")
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.interruptions, args.minutes, args.verbose)))
