"""TALK_DETECT on a simulated caller's channel, frame by frame, as Asterisk 22 runs it.

``TALK_DETECT(set)=[dsp_silence_threshold][,dsp_talking_threshold]`` (funcs/func_talkdetect.c)
hooks the read side of the channel: every voice frame Asterisk reads from the caller goes through
``talk_detect_audiohook_cb``, which asks the DSP whether it is silent (``ast_dsp_silence``,
main/dsp.c ``__ast_dsp_silence_noise``):

- the frame's energy is the mean absolute sample value of the frame as signed linear, an integer
  (``accum /= len``): a μ-law or A-law phone's frame is measured after decoding
  (``AST_MULAW``/``AST_ALAW``), so here after the channel format's round trip;
- energy under ``dsp_talking_threshold`` is silence: the frame's milliseconds
  (``len / (sample_rate / 1000)``) add to the DSP's ``totalsilence``; energy at or above it is
  talk, and ``totalsilence`` goes back to 0;
- the first frame of talk while not talking publishes ``ChannelTalkingStarted`` and stamps the
  talk's start (``ast_tvnow()``, the frame's arrival);
- a silent frame that brings ``totalsilence`` to ``dsp_silence_threshold`` or more while talking
  publishes ``ChannelTalkingFinished`` with ``duration`` = now - start - ``dsp_silence_threshold``
  (not clamped: frames read in a burst can make it negative).

So only frames at or above the threshold are talk: with the threshold just under the agent's
loudest audio (calls/talkdetect.py) a caller's loud syllables cross it and their quieter speech
does not, and one sentence can give Started, Finished, Started, ... ``TALK_DETECT(set)`` again
changes the thresholds only (``ast_dsp_set_threshold``: the talk under way and the silence
counted so far are kept); ``TALK_DETECT(remove)`` drops the DSP, and with it both.

Changed to match Asterisk (the simulator used to run a timer restarted by every loud frame):

- silence is counted in the frames read, not on a clock. A phone that sends nothing while its
  user is silent (``idle="silent"``; Asterisk sends nothing for a silent Local channel, PROTOCOLS.md
  §6) gets no ``ChannelTalkingFinished`` until it sends frames again; talk after such a gap goes on
  the same talk (no new Started);
- the energy is Asterisk's integer mean of the decoded frame, not a float mean of the raw samples;
- ``duration`` is no longer clamped at 0;
- ``remove`` forgets the talk under way (a later ``set`` starts from silence);
- a value Asterisk cannot read (``TALK_DETECT(set)=abc``, or a threshold under 1) keeps the
  settings the channel had, with a warning and a 204, where the simulator used to take the defaults
  (the ARI request only queues the write on the channel: res/stasis/control.c ignores its result).
"""

from __future__ import annotations

import re

import numpy as np

from twisted_agent.media.codecs import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from twisted_agent.media.interfaces import SAMPLE_RATE

__all__ = ["DEFAULT_SILENCE_MS", "DEFAULT_TALKING_THRESHOLD", "TalkDetect", "frame_energy", "parse_setting"]

DEFAULT_SILENCE_MS = 2500  # func_talkdetect.c DEFAULT_SILENCE_THRESHOLD
DEFAULT_TALKING_THRESHOLD = 256  # dsp.conf silencethreshold, absent
_SCANF_INT = re.compile(r"\s*([+-]?\d+)")

_ROUND_TRIP = {"ulaw": lambda pcm: ulaw_decode(ulaw_encode(pcm)), "alaw": lambda pcm: alaw_decode(alaw_encode(pcm))}


def parse_setting(value: str) -> tuple[int, int] | None:
    """``(dsp_silence_threshold, dsp_talking_threshold)`` of a ``TALK_DETECT(set)`` value as
    ``talk_detect_fn_write`` reads it (``sscanf("%30d")``, each at least 1, an empty one its default),
    or None when Asterisk refuses it (it logs a warning and keeps the settings it had)."""
    silence_text, _, rest = value.partition(",")
    talking_text = rest.partition(",")[0]
    settings = []
    for text, default in ((silence_text, DEFAULT_SILENCE_MS), (talking_text, DEFAULT_TALKING_THRESHOLD)):
        if not text:
            settings.append(default)
            continue
        match = _SCANF_INT.match(text)
        if match is None or int(match.group(1)) < 1:
            return None
        settings.append(int(match.group(1)))
    return settings[0], settings[1]


def frame_energy(pcm: bytes, channel_format: str = "slin") -> int:
    """``__ast_dsp_silence_noise``'s measure of one 8 kHz s16le frame read from a channel in ``channel_format``."""
    round_trip = _ROUND_TRIP.get(channel_format)
    if round_trip is not None:
        pcm = round_trip(pcm)
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
    if not len(samples):
        return 0
    return int(np.abs(samples.astype(np.int64)).sum()) // len(samples)


class TalkDetect:
    """The talk detection state of one channel: fed every frame Asterisk reads from it."""

    def __init__(self) -> None:
        self.talking_since: float | None = None
        self.total_silence_ms = 0

    def reset(self) -> None:
        """``TALK_DETECT(remove)``: the datastore and its DSP are gone."""
        self.talking_since = None
        self.total_silence_ms = 0

    def frame(self, pcm: bytes, now: float, silence_ms: int, threshold: int,
              channel_format: str = "slin") -> tuple[str, int] | None:
        """A frame read at ``now``: ``("ChannelTalkingStarted", 0)``, ``("ChannelTalkingFinished",
        duration_ms)`` or None."""
        samples = len(pcm) // 2
        # __ast_dsp_silence_noise answers "not silent" for an empty frame without touching its counts
        if not samples or frame_energy(pcm, channel_format) >= threshold:
            if samples:
                self.total_silence_ms = 0
            if self.talking_since is None:
                self.talking_since = now
                return ("ChannelTalkingStarted", 0)
            return None
        self.total_silence_ms += samples // (SAMPLE_RATE // 1000)
        if self.talking_since is not None and self.total_silence_ms >= silence_ms:
            duration = int((now - self.talking_since) * 1000 + 1e-6) - silence_ms  # ast_tvdiff_ms: whole ms
            self.talking_since = None
            return ("ChannelTalkingFinished", duration)
        return None
