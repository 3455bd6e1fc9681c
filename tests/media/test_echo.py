"""EchoReference: the agent's own voice coming back on the line is echo; the caller's voice is not."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from twisted_agent.media.echo import EchoReference
from twisted_agent.sim.line import LineEcho, LineNoise

CLIP = np.frombuffer(resources.files("twisted_agent.sim").joinpath("clips/question.sl").read_bytes(), dtype="<i2")
AGENT = np.tile(CLIP, 2)
CALLER = np.roll(AGENT[::-1], 1000)  # other speech, as loud as the agent


def frames(signal: np.ndarray) -> list[bytes]:
    return [signal[i:i + 160].astype("<i2").tobytes() for i in range(0, len(signal) - 159, 160)]


def run(extra: np.ndarray | None, echo_db: float | None = -10.0, noise_dbfs: float | None = None
        ) -> dict[str, list[bool]]:
    """The agent says AGENT; the line returns its echo (and the caller's voice, and noise)."""
    reference = EchoReference()
    line = LineEcho(delay_ms=40, gain_db=echo_db) if echo_db is not None else None
    noise = LineNoise(noise_dbfs) if noise_dbfs is not None else None
    judged: dict[str, list[bool]] = {"agent_talking": [], "caller_talking": []}
    previous = bytes(320)
    for n, sent in enumerate(frames(AGENT)):
        now = 0.02 * (n + 1)
        reference.sent(sent, now)
        parts = [line.take(now, 160)] if line is not None else []
        if line is not None:
            line.heard(sent, now)
        if noise is not None:
            parts.append(noise.take(160))
        caller = extra[n * 160:(n + 1) * 160].astype(np.float64) if extra is not None else np.zeros(160)
        inbound = np.clip(sum(parts, caller), -32768, 32767).astype("<i2").tobytes()
        if n > 2 and np.abs(np.frombuffer(sent, "<i2")).mean() > 300:
            caller_voice = reference.is_caller(previous + inbound, now)
            speaking = extra is not None and np.abs(caller).mean() > 1000
            judged["caller_talking" if speaking else "agent_talking"].append(caller_voice)
        previous = inbound
    judged["delay"] = [reference.delay is not None]
    return judged


def test_the_agents_echo_is_never_the_caller_and_its_delay_is_learnt() -> None:
    judged = run(None)
    assert judged["agent_talking"] and not any(judged["agent_talking"]), "echo taken for the caller"
    assert judged["delay"] == [True]


@pytest.mark.parametrize("noise", [-40.0, -45.0])
def test_line_noise_under_the_echo_is_not_the_caller(noise: float) -> None:
    judged = run(None, noise_dbfs=noise)
    assert sum(judged["agent_talking"]) == 0


def test_the_caller_over_the_echo_is_mostly_the_caller() -> None:
    judged = run(CALLER)["caller_talking"]
    assert len(judged) > 50
    assert sum(judged) / len(judged) >= 0.8, "the caller talking over the agent is heard as the caller"


def test_without_echo_the_callers_voice_is_the_caller() -> None:
    judged = run(CALLER, echo_db=None)["caller_talking"]
    assert sum(judged) / len(judged) >= 0.9


def test_nothing_sent_lately_means_no_echo() -> None:
    reference = EchoReference(max_delay_ms=200)
    reference.sent(AGENT[:160].astype("<i2").tobytes(), 1.0)
    inbound = AGENT[:320].astype("<i2").tobytes()
    assert reference.rho(inbound, 1.5) == 0.0
    assert EchoReference().rho(inbound, 1.0) == 0.0, "nothing sent at all"


def over_a_line(agent: np.ndarray, jitter_ms: float = 0.0, stalls: dict[int, float] | None = None,
                pauses: dict[int, int] | None = None, phone_buffer_ms: float = 60.0, caller: np.ndarray | None = None,
                seed: int = 1) -> list[tuple[float, bool, bool]]:
    """The agent sends ``agent`` a frame per 20 ms tick, each stamped when the sender got round to it:
    up to ``jitter_ms`` late; a stall of ``stalls[k]`` ms holds up frame k and the overdue frames go
    together after it (as the pacer sends them); ``pauses[k]`` ticks go by without a frame before
    frame k. The caller's phone, another machine on its own clock, plays what arrives on the RTP
    timestamps' timeline (silence for the pauses) ``phone_buffer_ms`` after the tick, or as soon as
    it arrives when the buffer ran dry, and sends a frame every 20 ms with the echo (40 ms, -10 dB,
    300-3400 Hz) of what it played, plus ``caller``. Returns, per inbound frame holding voice:
    (arrival, the caller's voice is in it, judged the caller's)."""
    rng = np.random.default_rng(seed)
    stalls, pauses = stalls or {}, pauses or {}
    sends: list[tuple[float, bytes, int]] = []  # (stamp, frame, tick)
    tick, stalled_until = 0, -1.0
    for n, frame in enumerate(frames(agent)):
        tick += pauses.get(n, 0)
        deadline = 0.02 * tick
        if n in stalls:
            stalled_until = deadline + stalls[n] / 1000
        stamp = stalled_until if deadline < stalled_until else deadline + rng.uniform(0, jitter_ms) / 1000
        sends.append((stamp, frame, tick))
        tick += 1
    # what the phone plays: each frame at its tick + buffer, or on arrival if later (the buffer ran dry)
    played = np.zeros(160 * (tick + 400))
    cursor = 0
    for stamp, frame, n in sends:
        start = max(round((0.02 * n + phone_buffer_ms / 1000) * 8000), round((stamp + 0.001) * 8000), cursor)
        played[start:start + 160] = np.frombuffer(frame, "<i2")
        cursor = start + 160
    line = LineEcho(delay_ms=40, gain_db=-10.0)
    line.heard(played.astype("<i2").tobytes(), 0.0)
    echo = line.take(0.0, len(played))
    if caller is not None:
        echo[:len(caller)] += caller[:len(echo)]
    reference = EchoReference()
    events: list[tuple[float, int, bytes]] = [(stamp, 0, frame) for stamp, frame, _ in sends]
    for j in range(len(played) // 160 - 1):
        inbound = np.clip(echo[j * 160:(j + 1) * 160], -32768, 32767).astype("<i2").tobytes()
        arrival = 0.02 * (j + 1) + 0.0073 + rng.uniform(0, 0.001)  # the phone's clock, plus the network
        events.append((arrival, 1, inbound))
    judged: list[tuple[float, bool, bool]] = []
    previous = bytes(320)
    for at, kind, pcm in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 0:
            reference.sent(pcm, at)
            continue
        x = np.frombuffer(pcm, "<i2").astype(np.float64)
        if np.sqrt(np.mean(x * x)) > 32768 * 10 ** (-45 / 20):  # what a VAD would call voiced
            j = round((at - 0.0073) / 0.02) - 1
            speaking = caller is not None and np.abs(caller[j * 160:(j + 1) * 160]).mean() > 1000
            judged.append((at, speaking, reference.is_caller(previous + pcm, at)))
        previous = pcm
    return judged


def test_the_senders_stamp_jitter_is_not_a_gap_in_the_echo() -> None:
    """The pacer's wake-ups are late by a millisecond or two: frames stamped 20.4 ms apart are still
    back to back on the wire's timeline (the RTP timestamps say so; the phone plays them so)."""
    judged = over_a_line(AGENT, jitter_ms=2.0)
    assert len(judged) > 150
    wrong = sum(caller for _, _, caller in judged)
    assert wrong == 0, f"{wrong} echo frames taken for the caller"


@pytest.mark.parametrize("buffer_ms", [60.0, 20.0], ids=["deep-phone-buffer", "buffer-runs-dry"])
def test_a_reactor_stall_and_its_burst_of_overdue_frames_are_still_echo(buffer_ms: float) -> None:
    lengths = [25.0, 45.0, 65.0, 15.0, 90.0, 35.0]  # ms: 15 ms is late without overdue frames behind it
    stalls = {40 + 37 * i: lengths[i % len(lengths)] for i in range(10)}
    judged = over_a_line(AGENT, jitter_ms=2.0, stalls=stalls, phone_buffer_ms=buffer_ms)
    # a stall's splice may cost a frame or two; never a run of them (see test_bargein)
    wrong = [at for at, _, caller in judged if caller]
    assert len(wrong) <= len(stalls), wrong


def test_the_agents_pauses_are_silence_in_the_echo() -> None:
    ticks = [1, 2, 3, 5, 8, 1, 12, 2, 4]
    pauses = {30 + 23 * i: ticks[i % len(ticks)] for i in range(16)}
    judged = over_a_line(AGENT, jitter_ms=2.0, pauses=pauses)
    assert not any(caller for _, _, caller in judged)


def test_the_caller_over_jittered_echo_is_mostly_the_caller() -> None:
    judged = [caller for _, speaking, caller in over_a_line(AGENT, jitter_ms=2.0, caller=CALLER) if speaking]
    assert len(judged) > 50
    assert sum(judged) / len(judged) >= 0.8


def rhos_across(stamps: list[float], ticks: list[int], delay_s: float = 0.04) -> tuple[EchoReference, list[float]]:
    """Frame n of AGENT leaves at ``stamps[n]`` for tick ``ticks[n]``; its exact echo (the frames on
    their ticks, silence between, ``delay_s`` late) comes back: rho for each 40 ms window of it."""
    timeline = np.zeros(160 * (ticks[-1] + 1))
    for n, tick in enumerate(ticks):
        timeline[160 * tick:160 * (tick + 1)] = AGENT[160 * n:160 * (n + 1)]
    reference, rhos = EchoReference(), []
    sends = list(zip(stamps, frames(AGENT), strict=False))
    for end in range(4, ticks[-1] + 1):  # windows ending on each tick
        now = 0.02 * end + delay_s
        while sends and sends[0][0] <= now:
            reference.sent(sends[0][1], sends[0][0])
            sends.pop(0)
        window = timeline[160 * (end - 2):160 * end]
        if np.abs(window).mean() > 300:
            rhos.append(reference.rho(window.astype("<i2").tobytes(), now))
    return reference, rhos


def test_a_burst_of_overdue_frames_after_a_stall_follows_on_without_a_gap() -> None:
    ticks = list(range(60))
    stamps = [0.02 * t + 0.0005 * (t % 3) for t in ticks]
    stamps[20:24] = [0.02 * 20 + 0.065] * 4  # a 65 ms stall: ticks 20-23 leave together, late
    stamps[30] += 0.015  # 15 ms late, nothing overdue behind it
    reference, rhos = rhos_across(stamps, ticks, delay_s=0.1)  # the far end's jitter buffer rides out the stall
    assert min(rhos) > 0.99, "the reference is the audio as played, back to back"
    assert reference.silence_frames == reference.stall_frames == 4, "the stalls' silence was taken out again"


def test_ticks_without_a_frame_are_silence_on_the_timeline() -> None:
    ticks = list(range(20)) + list(range(21, 30)) + list(range(33, 60))  # pauses of 1 and 3 ticks
    stamps = [0.02 * t + 0.0015 * (t % 2) for t in ticks]
    reference, rhos = rhos_across(stamps, ticks)
    assert min(rhos) > 0.99
    assert reference.silence_frames == 4 and reference.stall_frames == 0
