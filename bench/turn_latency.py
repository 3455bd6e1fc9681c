"""Voice-to-voice latency of the local pipeline, with the real models, over simulated calls.

The real engine with the local provider (Whisper -> language model -> Piper) against the built-in
Asterisk simulator. Each turn: the simulated caller asks the bundled question; measured from the
end of the caller's speech to the first reply audio the caller hears, broken into turn-end wait,
STT, LLM first token, first sentence, TTS of the first sentence, and the platform's share. While
the models run, a second call streams audio continuously and the p99 lateness of its outbound
frames is reported (the media pacing must stay on time while inference runs). Then five calls ask
at once. First, as a baseline in the same run, the same turns with naive sequencing (no
speculation, Whisper's full window, whole sentences to TTS, VAD_END_MS=300).

    .venv/bin/python bench/turn_latency.py [--turns 20] [--mode file|stream] [--models-dir DIR] [--no-baseline]
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

from twisted_agent.config import load_config  # noqa: E402
from twisted_agent.demo import APP, loopback, question_clip, sleep, until  # noqa: E402
from twisted_agent.service import AgentService  # noqa: E402
from twisted_agent.sim import AsteriskSimulator  # noqa: E402

STAGES = ["turn_end_wait_ms", "provider_speculation_head_start_ms",
          "provider_stt_ms", "provider_llm_first_token_ms", "provider_first_sentence_ms",
          "provider_tts_first_sentence_ms", "after_turn_end_ms", "voice_to_voice_ms"]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def ask(reactor: Any, service: AgentService, caller: Any) -> dict[str, float]:
    call = service.engine.calls[caller.channel_id]
    # the state is "listening" for a moment before the greeting starts: wait until it was heard
    await until(reactor, lambda: caller.first_heard_at() is not None, 60, "the greeting")
    await until(reactor, lambda: call.state == "listening", 60, "the agent to finish speaking")
    turns = len(call.turn_timings)
    await caller.say(question_clip())
    await until(reactor, lambda: len(call.turn_timings) > turns, 60, "the answer")
    timing = call.turn_timings[-1]
    if "failed" in timing:  # the caller got the apology, not an answer
        raise RuntimeError(f"the turn failed ({timing['failed']}): {call.end_reason or 'apologising'}")
    await until(reactor, lambda: call.state == "listening", 60, "the answer to finish")
    return {key: value for key, value in timing.items() if isinstance(value, float)}


#: naive sequencing: nothing starts before the turn ends, Whisper's full 30 s window, whole sentences
BASELINE = {"SPECULATE": "false", "STT_WINDOW": "30", "FIRST_PIECE_WORDS": "0", "VAD_END_MS": "300"}


async def main(reactor: Any, turns: int, mode: str, models_dir: str | None, baseline: bool) -> None:
    results = {}
    if baseline:
        print(f"== baseline (naive sequencing: {' '.join(f'{k}={v}' for k, v in BASELINE.items())})", flush=True)
        results["baseline"] = await run(reactor, turns, mode, models_dir, BASELINE, simultaneous=False)
        print("== the configured pipeline (defaults and the environment)", flush=True)
    results["pipeline"] = await run(reactor, turns, mode, models_dir, {}, simultaneous=True)
    if baseline:
        print(f"voice-to-voice p50: {results['pipeline']:.0f} ms vs {results['baseline']:.0f} ms naive "
              f"({results['pipeline'] / results['baseline']:.2f}x)")


async def run(reactor: Any, turns: int, mode: str, models_dir: str | None, overrides: dict[str, str],
              simultaneous: bool) -> float:
    media_dir = tempfile.mkdtemp(prefix="ai-agent-bench-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="bench")
    await sim.start()
    # settings from the environment apply (VAD_END_MS=200, SPECULATE=false, FIRST_PIECE_WORDS=0 ...)
    env = dict(os.environ, **({"MODELS_DIR": models_dir} if models_dir else {}), **overrides)
    config = loopback(load_config(None, env))
    config = dataclasses.replace(
        config,
        ari=dataclasses.replace(config.ari, url=sim.ari_url, username="ai-agent", password="bench", app=APP),
        media=dataclasses.replace(config.media, media_dir=media_dir, downstream_mode=mode),
        calls=dataclasses.replace(config.calls, default_provider="local", no_audio_seconds=0, drain_timeout=1,
                                  provider_timeout=30),
    )
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    try:
        await until(reactor, lambda: service.ari.connected, 10, "ARI")
        await until(reactor, lambda: service.providers.factories["local"].readiness().ready, 300, "the models")
        print(f"turn latency: {turns} turns, replies by {mode}, "
              f"{service.providers.factories['local'].readiness().detail}", flush=True)
        # a concurrent call whose outbound audio must stay on time while the models run
        background = sim.originate(APP)
        await background.answered
        await until(reactor, lambda: background.channel_id in service.media.sessions, 10, "the media session")
        # 10 minutes of audio: this call's paced frames keep going out while the other call's turns run
        service.media.sessions[background.channel_id].play(bytes(range(256)) * 37500, 8000, "background")
        caller = sim.originate(APP)
        await caller.answered
        timings: list[dict[str, float]] = []
        background_session = service.media.sessions[background.channel_id]
        frames_before = background_session.lateness.count
        for _ in range(turns):
            timings.append(await ask(reactor, service, caller))
        lateness = background_session.lateness
        print(f"{'stage':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for stage in STAGES:
            values = [t[stage] for t in timings if stage in t]
            if values:
                print(f"{stage[:-3]:<28} {statistics.median(values):>8.1f} {percentile(values, 0.95):>8.1f} "
                      f"{max(values):>8.1f}")
        print(f"outbound send lateness while the models ran: p99 {lateness.percentile_ms(0.99):.2f} ms, "
              f"max {lateness.maximum * 1000:.2f} ms over {lateness.count - frames_before} frames")
        provider = service.engine.calls[caller.channel_id].provider
        print(f"speculative turns: {provider.speculations_used} adopted, {provider.speculations_discarded} "
              f"discarded (the caller went on), {provider.speculations_skipped} skipped (models busy); "
              f"whisper: {service.providers.factories['local'].pipeline.stt.stats()}")
        answers = [text for speaker, text in service.engine.calls[caller.channel_id].conversation if speaker == "agent"]
        print(f"last answer: {answers[-1]!r}")
        await caller.hangup()
        await background.hangup()
        if not simultaneous:
            return statistics.median(t["voice_to_voice_ms"] for t in timings)
        # five callers ask at the same moment
        callers = [sim.originate(APP) for _ in range(5)]
        await gatherResults([c.answered for c in callers])
        await sleep(reactor, 0.1)
        started = reactor.seconds()
        results = await gatherResults([Deferred.fromCoroutine(ask(reactor, service, c)) for c in callers])
        v2v = sorted(r["voice_to_voice_ms"] for r in results if "voice_to_voice_ms" in r)
        print(f"5 simultaneous calls: all answered: {len(v2v) == 5}; voice-to-voice ms: "
              f"{', '.join(f'{v:.0f}' for v in v2v)}; wall {reactor.seconds() - started:.1f} s")
        for c in callers:
            await c.hangup()
        return statistics.median(t["voice_to_voice_ms"] for t in timings)
    finally:
        await service.stopService()
        await sim.stop()
        for name in os.listdir(media_dir):
            os.unlink(os.path.join(media_dir, name))
        os.rmdir(media_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--mode", choices=["file", "stream"], default="stream")
    parser.add_argument("--models-dir", default=os.environ.get("MODELS_DIR"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive-sequencing run")
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(
        main(reactor, args.turns, args.mode, args.models_dir, not args.no_baseline)))
