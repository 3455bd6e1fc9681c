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
