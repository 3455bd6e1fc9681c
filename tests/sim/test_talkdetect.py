"""TALK_DETECT as Asterisk 22 runs it (funcs/func_talkdetect.c, main/dsp.c), on task.Clock: the DSP's
integer mean per frame, Started on the first frame at the threshold, Finished on the frame that
completes the silence; and the simulated caller's channel emitting them as its phone sends frames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.sim.caller import SimulatedCaller
from twisted_agent.sim.control import Timers
from twisted_agent.sim.model import Channel
from twisted_agent.sim.talkdetect import TalkDetect, frame_energy, parse_setting


def level(mean: int, samples: int = 160) -> bytes:
    """A frame whose samples alternate +mean/-mean: mean absolute value ``mean``."""
    return (np.resize(np.array([mean, -mean], dtype="<i2"), samples)).tobytes()


def test_the_energy_is_the_integer_mean_absolute_value_of_the_decoded_frame() -> None:
    frame = np.array([300, -211] * 80, dtype="<i2").tobytes()  # mean 255.5
    assert frame_energy(frame) == 255, "accum /= len: an integer"
    decoded = np.frombuffer(ulaw_decode(ulaw_encode(frame)), dtype="<i2").astype(np.int64)
    assert frame_energy(frame, "ulaw") == int(np.abs(decoded).sum()) // 160 != 255, "a μ-law phone: after decoding"
    assert frame_energy(b"") == 0


def test_talk_starts_on_the_first_frame_at_the_threshold_and_finishes_after_its_silence_in_frames() -> None:
    talk = TalkDetect()
    said = []
    now = 10.0
    for mean in [255, 256, 900, 100, 100, 100, 100, 255]:  # silence 100 ms, threshold 256
        now += 0.02
        said.append(talk.frame(level(mean), now, 100, 256))
    assert said == [None, ("ChannelTalkingStarted", 0), None, None, None, None, None,
                    ("ChannelTalkingFinished", 20)], "Finished on the 5th silent frame: 120 ms after Started, less 100"


def test_loud_syllables_over_quieter_speech_start_and_finish_talk_again_and_again() -> None:
    """A threshold just under the agent's loudest audio: only the caller's loud syllables cross it."""
    talk = TalkDetect()
    speech = [3000, 2500] + [900] * 6 + [2800] + [900] * 3 + [2600] + [900] * 5
    said = [talk.frame(level(mean), 0.02 * n, 100, 1500) for n, mean in enumerate(speech, 1)]
    events = [(n, e[0]) for n, e in enumerate(said, 1) if e is not None]
    assert events == [(1, "ChannelTalkingStarted"), (7, "ChannelTalkingFinished"), (9, "ChannelTalkingStarted"),
                      (18, "ChannelTalkingFinished")], "a pause under 100 ms (frames 10-12) does not end the talk"


def test_silence_is_counted_in_frames_read_so_a_silent_phone_ends_no_talk() -> None:
    talk = TalkDetect()
    assert talk.frame(level(3000), 1.0, 100, 256) == ("ChannelTalkingStarted", 0)
    assert talk.frame(level(3000), 5.0, 100, 256) is None, "four seconds without a frame: the same talk"
    said = [talk.frame(level(0), 5.0 + 0.02 * n, 100, 256) for n in range(1, 6)]
    assert said == [None] * 4 + [("ChannelTalkingFinished", 4000)]


def test_short_frames_count_their_own_milliseconds() -> None:
    talk = TalkDetect()
    talk.frame(level(3000), 0.0, 30, 256)
    assert talk.frame(level(0, 120), 0.015, 30, 256) is None  # 15 ms
    assert talk.frame(level(0, 120), 0.03, 30, 256) == ("ChannelTalkingFinished", 0)


@pytest.mark.parametrize(("value", "expected"), [
    ("", (2500, 256)), ("100", (100, 256)), ("100,1500", (100, 1500)), (",300", (2500, 300)),
    ("100ms", (100, 256)), (" 200,+7", (200, 7)), ("abc", None), ("0", None), ("100,0", None), ("100,x", None)])
def test_the_setting_is_read_as_func_talkdetect_reads_it(value: str, expected: tuple[int, int] | None) -> None:
    assert parse_setting(value) == expected


# --- the simulated caller's channel ----------------------------------------------------------------


class Host:
    """The PBX side of one caller: what it relays and what it publishes, in order."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.log: list[tuple[Any, ...]] = []

    def caller_audio(self, channel: Channel, pcm: bytes) -> None:
        self.log.append(("frame", frame_energy(pcm)))

    def caller_dtmf(self, channel: Channel, digit: str, duration_ms: int) -> None:
        raise AssertionError("no keys pressed")

    def caller_hangup(self, channel: Channel) -> Deferred[None]:
        raise AssertionError("no hang-up")

    def caller_talking(self, channel: Channel, talking: bool, duration_ms: int) -> None:
        self.log.append(("Started",) if talking else ("Finished", duration_ms))


def caller(idle: str) -> tuple[Host, SimulatedCaller]:
    host = Host()
    channel = Channel(id="c1", name="PJSIP/100-1", tech="PJSIP", state="Up", app="app", created=0.0,
                      format="slin", talk_detect=(100, 1000))
    return host, SimulatedCaller(host, channel, idle)


def test_the_channel_publishes_talk_before_relaying_the_frame_and_only_while_the_phone_sends() -> None:
    host, phone = caller("silent")
    phone.say(level(3000) * 3 + level(400) * 2)
    host.clock.pump([0.02] * 20)
    assert host.log == [("Started",), ("frame", 3000), ("frame", 3000), ("frame", 3000), ("frame", 400),
                        ("frame", 400)], "40 ms of silence sent, then nothing: no Finished"
    phone.say(level(0) * 3)
    host.clock.pump([0.02] * 5)
    assert host.log[6:] == [("frame", 0), ("frame", 0), ("Finished", 340), ("frame", 0)], \
        "on the frame that completes 100 ms of silence (40 + 60), 440 ms after the talk began, less 100"


def test_a_phone_sending_silence_frames_finishes_the_talk() -> None:
    host, phone = caller("silence_frames")
    phone.on_answered()
    phone.say(level(3000) * 2)
    host.clock.pump([0.02] * 10)
    talk = [entry for entry in host.log if entry[0] != "frame"]
    assert talk == [("Started",), ("Finished", 20)], "2 loud frames, Finished at the 5th silent frame"
