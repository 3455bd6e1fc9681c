"""Does Whisper inference disturb the 20 ms media pacing? Worker processes vs a thread vs nothing.

The engine's media plane (MediaService: the RTP socket and the shared pacer) paces the replies of
``--calls`` calls to a UDP sink on loopback, 50 packets/s each, and measures each frame's send
lateness against its 20 ms deadline (as bench/media_capacity.py does). Meanwhile Whisper
transcribes a 3 s espeak-ng clip over and over, back to back:

* ``none``: no inference, the baseline;
* ``thread``: in the engine process, on the reactor's thread pool (``deferToThread``): torch
  releases the GIL inside its kernels, but Whisper's decoding loop is Python and holds it;
* ``process``: in the :class:`~twisted_agent.providers.local.workers.WorkerPool` the agent uses:
  a worker process at nice 10;
* ``process-2`` / ``process-2-nice0``: two workers, each transcribing back to back, so both cores
  are busy with inference, at nice 10 and (to see what the nice buys) at nice 0.

Every mode runs in a fresh process, so a model loaded in-process for ``thread`` cannot affect the
others. Nothing is pinned: the OS schedules the reactor and the workers over all cores, as in
production. "p99" is the figure of merit (the media plane's budget is 5 ms).

    .venv/bin/python bench/inference_isolation.py [--model tiny.en|/path/to/model.pt] [--models-dir DIR] [--seconds 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODES = {
    # name: (where, workers, nice)
    "none": ("none", 0, 0),
    "thread": ("thread", 1, 0),
    "process": ("process", 1, 10),
    "process-2": ("process", 2, 10),
    "process-2-nice0": ("process", 2, 0),
}
CLIP_TEXT = "Hello, what are your opening hours on Saturday?"


def espeak_clip() -> bytes:
    """The 3 s espeak-ng question at 8 kHz s16le (the project's WAV parser and resampler)."""
    from twisted_agent.media.codecs import resample
    from twisted_agent.providers.local.tts import parse_wav

    wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us", "-s", "150", CLIP_TEXT],
                         capture_output=True, check=True).stdout
    pcm, rate = parse_wav(wav)
    return resample(pcm, rate, 8000)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_mode(mode: str, model: str, calls: int, seconds: float, threads: int) -> dict[str, Any]:
    import math

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.threads import deferToThread
    from zope.interface import implementer

    from twisted_agent.config import load_config
    from twisted_agent.media.interfaces import IMediaConsumer
    from twisted_agent.media.service import MediaService
    from twisted_agent.providers.local import stt
    from twisted_agent.providers.local.workers import WorkerPool

    where, workers, nice = MODES[mode]
    clip = espeak_clip()
    reply = struct.pack("<8000h", *(int(6000 * math.sin(2 * math.pi * 300 * i / 8000)) for i in range(8000)))

    @implementer(IMediaConsumer)
    class Talker:
        """Keeps the agent talking: each reply sent queues another."""

        def __init__(self) -> None:
            self.session: Any = None

        def audio_received(self, frame: bytes) -> None:
            pass

        def speech_started(self) -> None:
            pass

        def speech_ended(self) -> None:
            pass

        def utterance_sent(self, utterance_id: str, ms: int) -> None:
            self.session.play(reply, 8000, utterance_id + "+")

        def dtmf_received(self, digit: str) -> None:
            pass

        def media_closed(self, reason: str) -> None:
            pass

        def stream_failed(self, reason: str) -> None:
            pass

    sinks = []  # one peer per call; never read: the kernel drops what overflows their buffers
    for _ in range(calls):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sinks.append(sink)
    config = load_config(None, {"ARI_URL": "http://127.0.0.1:1/ari"})
    media = MediaService(reactor, dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=0))
    media.privilegedStartService()
    for n in range(calls):
        session = media.create_session(f"call-{n}")
        talker = Talker()
        talker.session = session
        session.set_consumer(talker)
        session.bind_peer("127.0.0.1", sinks[n].getsockname()[1])
        session.play(reply, 8000, f"reply-{n}")
        session.play(reply, 8000, f"reply-{n}-b")

    durations: list[float] = []
    load_started = time.monotonic()
    pool: WorkerPool | None = None
    if where == "process":
        pool = WorkerPool(reactor, stt.load_whisper, ("openai-whisper", model, threads), size=workers,
                          name="whisper", nice=nice)
    elif where == "thread":
        stt.load_whisper("openai-whisper", model, threads)  # before the measurement: it blocks

    def transcribe() -> Deferred[Any]:
        if pool is not None:
            return pool.submit(stt.recognise, clip, 8000, "en", 200)
        return deferToThread(stt.recognise, clip, 8000, "en", 200)

    async def keep_transcribing(until: float) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            result = await transcribe()
            assert "opening" in "".join(s.text for s in result.segments).lower()
            durations.append(time.monotonic() - started)

    async def main() -> dict[str, Any]:
        if pool is not None:
            await pool.start()
        load_s = time.monotonic() - load_started
        media.startService()
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        until = wall_before + seconds
        loops = [keep_transcribing(until) for _ in range(workers)]
        for loop in loops:
            await loop
        cpu = cpu_seconds() - cpu_before
        wall = time.monotonic() - wall_before
        lateness = media.lateness()
        media.pacer.stop()
        if pool is not None:
            await pool.stop()
        if not durations:  # "none": just wait the same time
            return {}
        return {"load_s": round(load_s, 2), "transcriptions": len(durations),
                "ms_per_transcription": round(1000 * sum(durations) / len(durations)),
                "cpu_percent": round(100 * cpu / wall, 1),
                "p50_ms": lateness.percentile_ms(0.5), "p99_ms": lateness.percentile_ms(0.99),
                "max_ms": round(lateness.maximum * 1000, 2), "frames": lateness.count,
                "skipped": media.pacer.skipped}

    async def baseline() -> dict[str, Any]:
        media.startService()
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        from twisted.internet.task import deferLater

        await deferLater(reactor, seconds, lambda: None)
        lateness = media.lateness()
        media.pacer.stop()
        return {"load_s": 0.0, "transcriptions": 0, "ms_per_transcription": 0,
                "cpu_percent": round(100 * (cpu_seconds() - cpu_before) / (time.monotonic() - wall_before), 1),
                "p50_ms": lateness.percentile_ms(0.5), "p99_ms": lateness.percentile_ms(0.99),
                "max_ms": round(lateness.maximum * 1000, 2), "frames": lateness.count,
                "skipped": media.pacer.skipped}

    outcome: dict[str, Any] = {}

    def finish(result: Any) -> None:
        outcome.update(result if isinstance(result, dict) else {"error": str(result)})
        reactor.stop()

    d = ensureDeferred(baseline() if where == "none" else main())
    d.addBoth(finish)
    reactor.run()
    outcome.update(mode=mode, workers=workers, threads=threads if where != "none" else 0, nice=nice, calls=calls)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en",
                        help="an openai-whisper .pt, or an installed name (tiny.en) in --models-dir")
    parser.add_argument("--models-dir", default=os.environ.get("MODELS_DIR", "/var/lib/ai-agent/models"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--calls", type=int, default=20, help="calls whose replies are paced meanwhile")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per inference (worker or thread)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the modes; >1 also prints medians")
    args = parser.parse_args()
    from twisted_agent.config import LocalProviderConfig
    from twisted_agent.providers.local.models import whisper_path

    model = whisper_path(dataclasses.replace(LocalProviderConfig(), models_dir=args.models_dir), args.model)
    print(f"inference isolation: {args.calls} calls paced (50 packets/s each) while Whisper "
          f"({os.path.basename(model)}, {args.threads} torch thread(s) per inference) transcribes a 3 s clip "
          f"back to back; {args.seconds:g} s per mode, python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"{'mode':<19} {'workers':>7} {'nice':>4} {'p50ms':>6} {'p99ms':>6} {'maxms':>7} {'frames':>7} "
          f"{'skipped':>7} {'turns':>5} {'ms/turn':>7} {'eng cpu%':>8}")
    results: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.repeat):
        for mode in args.modes.split(","):  # round-robin, so a burst of outside load hits one round of each
            r = measure(mode, model, args)
            if r is not None:
                results.setdefault(mode, []).append(r)
                print_row(mode if args.repeat == 1 else f"{mode} #{round_ + 1}", r)
    if args.repeat > 1:
        print(f"median of {args.repeat} rounds:")
        for mode, runs in results.items():
            middle = {key: statistics.median(run[key] for run in runs)
                      for key in runs[0] if isinstance(runs[0][key], (int, float))}
            print_row(mode, middle)


def measure(mode: str, model: str, args: argparse.Namespace) -> dict[str, Any] | None:
    command = [sys.executable, os.path.abspath(__file__), "run", mode, model, str(args.calls),
               str(args.seconds), str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"{mode:<16} failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    r: dict[str, Any] = json.loads(lines[-1])
    if "error" in r:
        print(f"{mode:<16} failed: {r['error']}")
        return None
    return r


def print_row(label: str, r: dict[str, Any]) -> None:
    print(f"{label:<19} {r['workers']:>7g} {r['nice']:>4g} {r['p50_ms']:>6.2f} {r['p99_ms']:>6.2f} "
          f"{r['max_ms']:>7.2f} {r['frames']:>7g} {r['skipped']:>7g} {r['transcriptions']:>5g} "
          f"{r['ms_per_transcription']:>7g} {r['cpu_percent']:>8g}", flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        _, _, mode, model, calls, seconds, threads = sys.argv
        print(json.dumps(run_mode(mode, model, int(calls), float(seconds), int(threads))), flush=True)
    else:
        main()
