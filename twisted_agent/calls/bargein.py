"""When caller speech over the agent is an interruption (barge-in), and which audio starts the new turn.

The call feeds every inbound frame while the agent has the floor (it is speaking, or its last audio
ended less than GATE_GUARD_MS ago). The VAD's speech start arms the detector with the speech's onset;
once the caller has been speaking ``min_ms`` from that onset (and still is) the interruption is
due. Speech that ends sooner ("mm-hm", "yes", a cough) is a backchannel: counted, and the agent goes
on. The frames since the onset are kept, so the caller's new turn starts with its first syllable.

Plain logic with times passed in; the call owns the reactor and the VAD.
"""

from __future__ import annotations

from collections import deque

from twisted_agent.media.interfaces import FRAME_MS


class BargeInDetector:
    def __init__(self, min_ms: int, keep_ms: int = 1000) -> None:
        if min_ms < 0:
            raise ValueError(f"min_ms must be >= 0, got {min_ms}")
        self.min_s = min_ms / 1000
        self._frames: deque[tuple[float, bytes]] = deque(maxlen=max(1, keep_ms // FRAME_MS))
        self.onset: float | None = None
        self.backchannels = 0

    @property
    def armed(self) -> bool:
        return self.onset is not None

    def frame(self, pcm: bytes, now: float) -> None:
        """An inbound frame that arrived at ``now`` (the end of its 20 ms)."""
        self._frames.append((now, pcm))

    def speech_started(self, onset: float) -> None:
        """The VAD heard the caller start, with audio from ``onset``."""
        self.onset = onset

    def speech_ended(self) -> bool:
        """The VAD heard the caller stop; True if that was a backchannel (speech too short to interrupt)."""
        if self.onset is None:
            return False
        self.onset = None
        self.backchannels += 1
        return True

    def due(self, now: float) -> bool:
        return self.onset is not None and now - self.onset >= self.min_s - 1e-6

    def take(self) -> list[bytes]:
        """The caller takes the floor: the frames from the onset on (their turn's start); disarms."""
        onset = self.onset if self.onset is not None else float("inf")
        # a frame stamped at its arrival holds the 20 ms before it
        frames = [pcm for arrived, pcm in self._frames if arrived > onset + 1e-6]
        self.reset()
        return frames

    def reset(self) -> None:
        self.onset = None
        self._frames.clear()
