"""File-mode barge-in: Asterisk's talk detection on the caller channel, kept deaf to the agent's echo.

While a file plays to a bridged channel, Asterisk suspends the channel from the bridge (PROTOCOLS.md
§6, sim/playback.py): the caller's voice does not reach the media leg, so stream mode's echo-aware
detector (media/echo.py) cannot hear it. ``TALK_DETECT`` (func_talkdetect.c) still measures the
channel's inbound audio: ``ChannelTalkingStarted`` when a 20 ms frame's mean magnitude reaches the
threshold, ``ChannelTalkingFinished`` once it has stayed below for ``SILENCE_MS``. On Started the
call pauses its file at once (FilePlayer.pause: the playbacks are stopped, the files kept), so
Asterisk passes the caller's voice to the media leg again from ~30 ms after its onset, and the
barge-in detector judges that voice as in stream mode, echo check included; a backchannel resumes
the file where it stopped (``offsetms``), and the new turn of a real barge-in starts with the
caller's first syllable. The threshold (below) is crossed by the caller's loud syllables only, so
``ChannelTalkingFinished`` often comes while they go on more quietly: once the media leg carries
their audio it never resumes the file by itself (calls/interruptions.py). Only when no audio
reaches the media leg does Asterisk's own measure decide: no Finished within
``BARGE_IN_MIN_MS + SILENCE_MS`` of the Started.

**Echo.** The line returns what the caller hears, 10 dB or more quieter, and talk detection cannot
tell it from the caller: at Asterisk's default threshold (256, about -42 dBFS) the agent's own echo
would interrupt it. The engine knows every sample it plays, so it keeps the threshold
``ECHO_MARGIN_DB`` (8 dB) under the loudest 20 ms frame of the call's agent audio so far: the echo
of that audio, at least 10 dB down, stays under it, while a caller who talks about as loud as the
agent clears it on every stressed syllable. It only rises (a louder reply raises it before it plays;
one ARI request), from ``FLOOR``; the echo's part stops at ``CEILING``. Talk detection measures the
echo and the line's noise together, so the noise of the line (measured while the caller has the
floor and Asterisk passes their audio: the frames the VAD finds no voice in, a one-second average)
is added, twice over for its peaks.

**Limits.** A caller much quieter than the agent (more than ~8 dB) cannot interrupt a file, and
echo returned less than 8 dB down (a handset on speaker at full volume) still can: stream mode,
which compares the inbound audio with what was sent, has neither limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_agent.ari.errors import ARIError

SILENCE_MS = 100
FLOOR = 256  # func_talkdetect's default: nothing quieter is ever talk
CEILING = 4000  # about -20 dBFS: a caller at a normal level can always interrupt
ECHO_MARGIN_DB = 8.0
#: raise the threshold only when it must rise by more than this share (fewer ARI requests)
_STEP = 1.1
#: a 20 ms frame of line noise measures up to about this many times the noise's mean magnitude
NOISE_PEAK = 2.0


def loudest_frame(pcm: bytes, rate: int) -> float:
    """The highest mean magnitude of a 20 ms frame of 16-bit ``pcm`` (func_talkdetect's measure)."""
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float32)
    size = max(1, rate // 50)
    whole = len(samples) // size * size
    if not whole:
        return float(np.abs(samples).mean()) if len(samples) else 0.0
    return float(np.abs(samples[:whole]).reshape(-1, size).mean(axis=1).max())


class TalkThreshold:
    """The TALK_DETECT threshold for one call: raised as louder agent audio is played, and over a
    noisier line (talk detection measures the echo and the line's noise together)."""

    def __init__(self) -> None:
        self.value = FLOOR
        self._echo = 0  # the loudest echo the agent's audio can make
        self.noise = 0.0  # the line's noise: mean magnitude of the frames with no voice (a slow average)
        self._noise_frames = 0

    def setting(self) -> str:
        """The value of ``TALK_DETECT(set)``: dsp silence ms, threshold."""
        return f"{SILENCE_MS},{self.value}"

    def played(self, pcm: bytes, rate: int) -> bool:
        """Agent audio about to play: True when the threshold rose (set it again before it plays)."""
        self._echo = max(self._echo, min(CEILING, round(loudest_frame(pcm, rate) * 10 ** (-ECHO_MARGIN_DB / 20))))
        return self._update()

    def heard_line(self, frame: bytes) -> bool:
        """A frame from the caller's line with no voice in it: True when the threshold rose."""
        level = float(np.abs(np.frombuffer(frame, dtype="<i2").astype(np.float32)).mean()) if frame else 0.0
        self._noise_frames += 1
        self.noise += (level - self.noise) / min(self._noise_frames, 50)  # ~1 s average once settled
        return self._noise_frames >= 25 and self._update()  # not on the first few frames alone

    def _update(self) -> bool:
        # noise peaks reach about twice its mean magnitude; on top of the loudest echo
        wanted = max(FLOOR, self._echo + round(NOISE_PEAK * self.noise))
        if wanted > self.value * _STEP:
            self.value = wanted
            return True
        return False


class TalkDetection:
    """TALK_DETECT on one caller channel: turned on once, its threshold raised as the call goes
    (one request in flight at a time; the latest value wins)."""

    log = Logger()

    def __init__(self, ari: Any, channel_id: str) -> None:
        self._ari = ari
        self.channel_id = channel_id
        self.threshold = TalkThreshold()
        self.on = False
        self.closed = False
        self._setting: Deferred[None] | None = None

    async def enable(self) -> None:
        if self.on or self.closed:
            return
        try:
            await self._ari.set_variable(self.channel_id, "TALK_DETECT(set)", self.threshold.setting())
            self.on = True
        except ARIError as e:
            self.log.warn("call {call_id}: TALK_DETECT could not be set ({error}): no barge-in over file playback",
                          call_id=self.channel_id, error=str(e))

    def playing(self, pcm: bytes, rate: int) -> None:
        """Agent audio about to play from a file: keep talk detection deaf to its echo."""
        if self.threshold.played(pcm, rate):
            self._raise()

    def heard_line(self, frame: bytes) -> None:
        """A frame of the caller's line with no voice: keep talk detection over its noise too."""
        if self.threshold.heard_line(frame):
            self._raise()

    def _raise(self) -> None:
        if self.on and not self.closed and self._setting is None:
            self._setting = Deferred.fromCoroutine(self._send())

    async def _send(self) -> None:
        sent = None
        try:
            while sent != self.threshold.value and not self.closed:
                sent = self.threshold.value
                await self._ari.set_variable(self.channel_id, "TALK_DETECT(set)", self.threshold.setting())
        except ARIError as e:
            self.log.warn("call {call_id}: TALK_DETECT threshold not raised ({error})", call_id=self.channel_id,
                          error=str(e))
        finally:
            self._setting = None

    def close(self) -> None:
        self.closed = True
