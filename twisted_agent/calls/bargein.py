"""When caller speech over the agent is an interruption (barge-in), and which audio starts the new turn.

The call feeds every inbound frame while the agent has the floor (it is speaking, or its last audio
ended less than GATE_GUARD_MS ago), saying whether it is the caller's voice: voiced for the VAD and
not the agent's own echo (media/echo.py). The first such frame is the onset; the interruption is
due when the caller is voicing and ``min_ms`` of the caller's voice fall within the last
``min_ms`` + 40 ms (6 of the last 8 frames at 120 ms): dense, as speech is. Frames the echo check
gets wrong are sparse and do not add up to that, however long the agent talks. Speech that stops
sooner (a cough, a short "mm") is a backchannel: counted, and the agent goes on. The end of a
backchannel is seen on the next frame, or from the clock (:meth:`expire`) when none comes:
Asterisk sends nothing while a Local channel is silent, and nothing while a file plays to the
caller; speech after such a gap never adds up with what came before it. The frames since the onset
are kept, so the caller's new turn starts with its first syllable.

Plain logic with times passed in; the call owns the reactor and the VAD.
"""

from __future__ import annotations

from collections import deque

from twisted_agent.media.interfaces import FRAME_MS


class BargeInDetector:
    def __init__(self, min_ms: int, keep_ms: int = 1000, gap_ms: int = 100) -> None:
        if min_ms < 0:
            raise ValueError(f"min_ms must be >= 0, got {min_ms}")
        self.min_frames = max(1, -(-min_ms // FRAME_MS))
        self.window = self.min_frames + 2
        self.gap_s = gap_ms / 1000
        self._frames: deque[tuple[float, bytes]] = deque(maxlen=max(1, keep_ms // FRAME_MS))
        self._recent: deque[bool] = deque(maxlen=self.window)
        self.onset: float | None = None
        self._last_voiced = 0.0
        self.backchannels = 0

    @property
    def armed(self) -> bool:
        return self.onset is not None

    def frame(self, pcm: bytes, now: float, caller_voice: bool) -> bool:
        """An inbound frame that arrived at ``now`` (the end of its 20 ms); ``caller_voice``: the
        caller's voice is in it. True when it ends a backchannel (speech too short to interrupt)."""
        ended = False
        if self._frames and now - self._frames[-1][0] >= self.gap_s + FRAME_MS / 1000 - 1e-6:
            # nothing came for a while (Asterisk sends nothing while a Local channel is silent, or
            # while a file plays): what was before is over, and does not add up with what comes now
            ended = self.expire(now)
            self._recent.clear()
        self._frames.append((now, pcm))
        self._recent.append(caller_voice)
        if caller_voice:
            if self.onset is None:
                self.onset = now - FRAME_MS / 1000
            self._last_voiced = now
            return ended
        return self.expire(now) or ended

    def expire(self, now: float) -> bool:
        """The caller's voice has stopped by ``now`` (from the clock, when no frame comes to say so):
        True when that ends a backchannel."""
        if self.onset is not None and now - self._last_voiced >= self.gap_s - 1e-6:
            self.onset = None
            self.backchannels += 1
            return True
        return False

    def due(self) -> bool:
        return (self.onset is not None and bool(self._recent) and self._recent[-1]
                and sum(self._recent) >= self.min_frames)

    def recent(self, frames: int) -> bytes:
        """The latest ``frames`` inbound frames, joined (what the echo check looks at)."""
        return b"".join(pcm for _, pcm in list(self._frames)[-frames:])

    def take(self) -> list[bytes]:
        """The caller takes the floor: the frames from the onset on (their turn's start); disarms."""
        onset = self.onset if self.onset is not None else float("inf")
        # a frame stamped at its arrival holds the 20 ms before it
        frames = [pcm for arrived, pcm in self._frames if arrived > onset + 1e-6]
        self.reset()
        return frames

    def reset(self) -> None:
        self.onset = None
        self._recent.clear()
        self._frames.clear()
