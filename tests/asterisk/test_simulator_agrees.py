"""The simulator against the real Asterisk: the same call on both, the same requests and the same audio.

Where the two differ in what the engine can observe, Asterisk is right and the simulator is changed
(its docstrings say where). The call: greeting, a question, the answer, the caller hangs up; in both
playback modes. Compared: the ARI requests the engine made, in order, and the sentences the caller
heard, in order.
"""

from __future__ import annotations

import re
from itertools import zip_longest

import numpy as np
import pytest

from tests.asterisk import audio
from tests.asterisk.harness import call, nothing_left
from tests.asterisk.instance import Asterisk
from tests.asterisk.simulated import simulate
from tests.asterisk.test_calls import ANSWER, ASK, GREETING, Engines

#: ids that differ from run to run, and what they stand for
_IDS = [
    (re.compile(r"ai-media-[\w.-]+"), "{media}"),
    (re.compile(r"ai-pb-\{caller\}-[0-9a-f]+-\d+"), "{playback}"),
    (re.compile(r"ai-bridge-[\w.-]+"), "{bridge}"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "{uuid}"),
    (re.compile(r"\d+(?:\.\d+)?ms"), "{ms}"),
    (re.compile(r"127\.0\.0\.1(?::|%3A)\d+"), "{host}"),
    (re.compile(r"ai-[\w-]*reply[\w.-]*|ai-\w[\w.-]*\.(?:ulaw|alaw|sln\d*|wav)"), "{file}"),
]


def requests(messages: list[str], call_id: str) -> list[str]:
    """The engine's ARI requests ("ARI POST /channels/... -> 204 in 3ms"), with the ids made alike."""
    found = []
    for message in messages:
        if not message.startswith("ARI ") or "->" not in message:
            continue
        message = message.replace(call_id, "{caller}")
        for pattern, name in _IDS:
            message = pattern.sub(name, message)
        found.append(message)
    return found


def sentences(samples: np.ndarray) -> list[str]:
    words = audio.tone_words(samples)
    at = sorted([(i, "greeting") for i in audio.find_sentence(words, GREETING)]
                + [(i, "answer") for i in audio.find_sentence(words, ANSWER)])
    return [name for _, name in at]


@pytest.mark.parametrize("mode", ["stream", "file"])
def test_the_simulator_and_asterisk_agree_on_a_question_and_its_answer(asterisk: Asterisk, engines: Engines,
                                                                       mode: str) -> None:
    settings = {"DOWNSTREAM_MODE": mode, "LOG_LEVEL": "debug", "AI_PROVIDER": "echo"}
    engine = engines(**settings)
    caller = call(asterisk, ASK)
    caller.wait_gone(engine=engine)
    nothing_left(asterisk, engine)
    real = (requests(engine.messages(), caller.agent_channel_id), sentences(caller.heard()))
    simulated = simulate(settings, ASK)[0]
    call_id = next(m.split()[1] for m in simulated["messages"] if m.startswith("call ") and " from " in m)
    sim = (requests(simulated["messages"], call_id), sentences(np.frombuffer(simulated["heard"], "<i2")))
    assert real[1] == ["greeting", "answer"], "on Asterisk: the greeting, then the answer"
    assert sim[1] == real[1], "the caller heard the same sentences"
    assert sim[0] == real[0], "the engine made the same requests, in the same order:\n" + "\n".join(
        f"{a!s:<90} {b}" for a, b in zip_longest(real[0], sim[0]))
