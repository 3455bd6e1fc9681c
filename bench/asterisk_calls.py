"""Whole calls on a real Asterisk 22, measured as the caller hears them, beside the simulator's figures.

The same scenarios run twice in one run: on a private real Asterisk (``tests/asterisk``: Local-channel
callers that play speech and record what they hear with MixMonitor, the engine as ``twistd -n
ai-agent``) and on the built-in simulator (the engine in a child process of this script, with the
simulator's caller). Both produce the caller's recording (what it heard, what it said, from the
moment the call was answered), and one function reads the figures off both:

* **start-up** (local provider, real Asterisk only): a call a second for the first 10 s after the
  engine's Stasis app registers, while the models load: how many are sent back to the dialplan;
* **greeting**: answer -> the first agent audio the caller hears (local provider, and echo);
* **voice-to-voice** (local provider, both transports): the caller's last word -> first agent audio,
  and -> the *answer's* onset (the filler, "one moment, please", is told apart by its length);
* **barge-in** (echo provider, long greeting; stream and file mode): the caller's first syllable ->
  the last agent audio the caller hears. The echo cases (false stops on the agent's own echo) stay
  in bench/barge_in.py: a Local channel has no echo path.

Without an Asterisk (``AST_PREFIX``, default ``../shared/asterisk``) it says why and exits 0.

    .venv/bin/python bench/asterisk_calls.py [--calls 5] [--only startup,greeting,v2v,barge-in] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from tests.asterisk import audio  # noqa: E402
from tests.asterisk.harness import CLIPS  # noqa: E402

LONG_GREETING = ("Thank you for calling the bakery on the corner of Main Street where the bread is fresh every "
                 "morning and the coffee is always hot today")


@dataclass
class Scenario:
    name: str  # greeting, v2v, barge-in
    label: str
    settings: dict[str, str]
    #: the caller's steps: ("wait", seconds) or ("play", clip)
    script: list[tuple[str, Any]] = field(default_factory=list)
    local: bool = False


def scenarios(calls: int) -> list[Scenario]:
    rng = random.Random(7)
    found = [
        Scenario("greeting", "greeting, local provider, RTP, stream",
                 {"AI_PROVIDER": "local", "AUDIO_TRANSPORT": "externalmedia"}, [("wait", 3.0)], local=True),
        Scenario("greeting", "greeting, echo provider, RTP, stream",
                 {"AI_PROVIDER": "echo", "AUDIO_TRANSPORT": "externalmedia"}, [("wait", 3.0)]),
    ]
    found.append(Scenario("startup", "calls in the first 10 s after the engine starts, local provider",
                          {"AI_PROVIDER": "local"}, [("wait", 14.0)], local=True))
    for transport in ("externalmedia", "audiosocket"):
        found.append(Scenario("v2v", f"voice-to-voice, local provider, {transport}, stream",
                              {"AI_PROVIDER": "local", "AUDIO_TRANSPORT": transport},
                              [("wait", 4.0), ("play", "question"), ("wait", 7.0)], local=True))
    # two callers: "Hello, what are ..." at the clip's level, and a softer one, 6 dB down, whose first
    # words ("Wait, wait, ...") are quieter than the rest (talk detection, set above the agent's echo,
    # may miss them in file mode)
    for mode, clip in (("stream", "question"), ("file", "question"), ("stream", "interrupt-soft"),
                       ("file", "interrupt-soft")):
        said = f"{CLIPS[clip.removesuffix('-soft')]!r}" + (", 6 dB softer" if clip.endswith("-soft") else "")
        found.append(Scenario("barge-in", f"barge-in, echo provider, {mode} mode, caller: {said}",
                              {"AI_PROVIDER": "echo", "DOWNSTREAM_MODE": mode,
                               "CONTEXT_DEFAULT_GREETING": LONG_GREETING},
                              [("wait", round(0.8 + rng.random() * 0.8, 2)), ("play", clip), ("wait", 2.5)]))
    return found


def script_text(steps: list[tuple[str, Any]]) -> str:
    return ",".join(f"{kind}:{value}" for kind, value in steps) + ",hangup"


# --- reading the figures off a recording --------------------------------------------------------

_FILLER: np.ndarray | None = None


def filler_spans(heard: np.ndarray, after: float) -> list[tuple[float, float]]:
    """Where the filler ("one moment, please") is in ``heard`` after ``after`` seconds: found by
    cross-correlating its first 300 ms (it arrives μ-law coded, so not bit-exact)."""
    global _FILLER
    if _FILLER is None:
        from twisted_agent.calls.comfort import load_filler

        _FILLER = np.frombuffer(load_filler("phrase"), "<i2").astype(np.float64)
    probe = _FILLER[: int(0.3 * audio.RATE)]
    start = int(after * audio.RATE)
    track = heard[start:].astype(np.float64)
    if len(track) < len(probe):
        return []
    size = 1 << int(np.ceil(np.log2(len(track) + len(probe))))
    corr = np.fft.irfft(np.fft.rfft(track, size) * np.conj(np.fft.rfft(probe, size)), size)[: len(track) - len(probe)]
    energy = np.sqrt(np.convolve(track ** 2, np.ones(len(probe)), "valid")[: len(corr)]) * np.linalg.norm(probe)
    # (windows quieter than -50 dBFS RMS are not the filler, whatever their shape)
    score = np.where(energy > 100 * np.sqrt(len(probe)) * np.linalg.norm(probe), corr / np.maximum(energy, 1e-9), 0)
    spans: list[tuple[float, float]] = []
    chunk = int(0.05 * audio.RATE)
    for at in np.nonzero(score > 0.8)[0]:
        if spans and (start + at) / audio.RATE < spans[-1][1]:
            continue
        # how much of it played: 50 ms pieces of the filler that are still there (it stops for the answer)
        begin, played = start + at, 0
        while played + chunk <= len(_FILLER) and begin + played + chunk <= len(heard):
            a = _FILLER[played:played + chunk]
            b = heard[begin + played:begin + played + chunk].astype(np.float64)
            if np.linalg.norm(a) > 1 and float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9) < 0.8:
                break
            played += chunk
        spans.append((begin / audio.RATE, (begin + played) / audio.RATE))
    return spans


def figures(kind: str, heard: np.ndarray, said: np.ndarray) -> dict[str, float]:
    """Seconds, from what the caller heard and said (both from the answer on)."""
    sounds = audio.sounds(heard, gap_ms=60)
    spoken = audio.sounds(said, gap_ms=300)
    out: dict[str, float] = {}
    if kind == "greeting":
        if sounds:
            out["greeting"] = sounds[0].start
    elif kind == "v2v" and spoken:
        end = spoken[-1].end
        after = [s for s in audio.sounds(heard, gap_ms=20) if s.start > end]
        if after:
            out["first_audio"] = after[0].start - end
            fillers = filler_spans(heard, end)
            # the answer: the first agent audio that is not the filler (which stops where the answer starts)
            onsets = [s.start for s in after if not any(a - 0.02 <= s.start < b for a, b in fillers)]
            onsets += [b for a, b in fillers if any(s.start < b - 0.02 and s.end > b + 0.02 for s in after)]
            if onsets:
                out["answer"] = min(onsets) - end
            if fillers:
                out["filler"] = fillers[0][0] - end
    elif kind == "barge-in" and spoken:
        onset, end = spoken[0].start, spoken[-1].end
        over = [s for s in sounds if s.start < end]
        if over:
            out["stop"] = max(0.0, max(s.end for s in over) - onset)
    return out


# --- the real Asterisk ----------------------------------------------------------------------------

def run_asterisk(chosen: list[Scenario], calls: int, models: str) -> dict[str, list[dict[str, float]]]:
    from tests.asterisk import harness
    from tests.asterisk.instance import Asterisk, check, short_workdir
    from tests.helpers import free_port

    root = check()
    workdir = short_workdir()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        harness.write_clips(workdir / "clips")
        base = random.randrange(20000, 29000, 200)
        asterisk = Asterisk(workdir, free_port(), (base, base + 198), harness.dialplan(workdir / "clips"),
                            root=root).start()
        print(f"real Asterisk {asterisk.version} ({root})", flush=True)
        try:
            for n, scenario in enumerate(chosen):
                settings = {"MODELS_DIR": models, "DOWNSTREAM_MODE": "stream", **scenario.settings}
                engine = harness.Engine(asterisk, workdir / f"engine-{n}", settings).start()
                try:
                    engine.wait_registered()
                    if scenario.name == "startup":
                        results[scenario.label] = first_seconds(asterisk, engine, scenario)
                        continue
                    engine.wait_ready(300)
                    rows = []
                    for _ in range(calls):
                        caller = harness.call(asterisk, script_text(scenario.script))
                        caller.wait_gone(timeout=90, engine=engine)
                        rows.append(figures(scenario.name, caller.heard(), caller.said()))
                        harness.nothing_left(asterisk, engine)
                    results[scenario.label] = rows
                    print(f"  {scenario.label}: {rows}", flush=True)
                finally:
                    engine.stop()
        finally:
            asterisk.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def first_seconds(asterisk: Any, engine: Any, scenario: Scenario) -> list[dict[str, float]]:
    """A call a second from the moment the engine's Stasis app is registered, for 10 s: sent back?"""
    from tests.asterisk import harness

    placed = []
    for k in range(10):
        placed.append(harness.call(asterisk, script_text(scenario.script)))
        time.sleep(max(0.0, placed[0].placed_at + k + 1 - time.monotonic()))
    rows = []
    for caller in placed:
        caller.wait_gone(timeout=90, engine=engine)
        heard = caller.heard()
        rows.append({"sent_back": float(audio.handed_back(heard)), "heard": float(bool(audio.sounds(heard)))})
    harness.nothing_left(asterisk, engine)
    print(f"  {scenario.label}: {rows}", flush=True)
    return rows


# --- the simulator (tests/asterisk/simulated.py: the same script, in a process of its own) ---------

def run_simulator(chosen: list[Scenario], calls: int, models: str) -> dict[str, list[dict[str, float]]]:
    from tests.asterisk.simulated import simulate

    results = {}
    for scenario in chosen:
        if scenario.name == "startup":  # (the simulator's engine starts before its caller rings)
            continue
        runs = simulate({"MODELS_DIR": models, "DOWNSTREAM_MODE": "stream", **scenario.settings},
                        script_text(scenario.script), calls)
        results[scenario.label] = [figures(scenario.name, np.frombuffer(r["heard"], "<i2"),
                                           np.frombuffer(r["said"], "<i2")) for r in runs]
        print(f"  simulator: {scenario.label}: {results[scenario.label]}", flush=True)
    return results


# --- the report ------------------------------------------------------------------------------------

def summary(rows: list[dict[str, float]], key: str) -> str:
    if key == "sent_back":
        return f"{sum(r[key] for r in rows):.0f} of {len(rows)}" if rows else "—"
    values = sorted(r[key] * 1000 for r in rows if key in r)
    if not values:
        return "—"
    p95 = values[min(len(values) - 1, max(0, round(0.95 * len(values)) - 1))]
    missing = len(rows) - len(values)
    return f"{statistics.median(values):.0f} / {p95:.0f} / {values[-1]:.0f}" + (f" ({missing} none)" if missing else "")


KEYS = {"startup": ["sent_back"], "greeting": ["greeting"], "v2v": ["answer", "first_audio", "filler"],
        "barge-in": ["stop"]}
NAMES = {"sent_back": "calls sent back to the dialplan", "greeting": "answer -> greeting heard",
         "answer": "last word -> answer onset",
         "first_audio": "last word -> first agent audio", "filler": "last word -> filler (when played)",
         "stop": "caller onset -> last agent audio"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="calls per scenario and side")
    parser.add_argument("--only", default="startup,greeting,v2v,barge-in")
    parser.add_argument("--models-dir", default=os.environ.get("MODELS_DIR", str(HERE.parent / ".models")))
    parser.add_argument("--no-local", action="store_true", help="skip the scenarios of the local provider")
    args = parser.parse_args()
    only = set(args.only.split(","))
    chosen = [s for s in scenarios(args.calls) if s.name in only and not (s.local and args.no_local)]
    if not (Path(args.models_dir) / "piper").is_dir() and any(s.local for s in chosen):
        print(f"asterisk_calls: no local models in {args.models_dir}: the local provider's scenarios are skipped")
        chosen = [s for s in chosen if not s.local]
    from tests.asterisk.instance import AsteriskUnavailable, check

    try:
        check()
    except AsteriskUnavailable as e:
        print(f"asterisk_calls: skipped: {e}")
        return
    started = time.monotonic()
    real = run_asterisk(chosen, args.calls, args.models_dir)
    simulated = run_simulator(chosen, args.calls, args.models_dir)
    print(f"\n{args.calls} calls per scenario and side, {os.cpu_count()} cores, {time.monotonic() - started:.0f} s; "
          f"ms p50 / p95 / max, as the caller hears it")
    print("| scenario | figure | real Asterisk | simulator |\n|---|---|---|---|")
    for scenario in chosen:
        for key in KEYS[scenario.name]:
            print(f"| {scenario.label} | {NAMES[key]} | {summary(real.get(scenario.label, []), key)} | "
                  f"{summary(simulated.get(scenario.label, []), key)} |")
    print(json.dumps({"real": real, "simulator": simulated, "settings": [asdict(s) for s in chosen]}))


if __name__ == "__main__":
    main()
