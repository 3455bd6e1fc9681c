"""Key presses reported twice: as ``ChannelDtmfReceived`` and on the media leg.

The engine joins the caller to the bridge with ``absorbDTMF``, so Asterisk reports a key once, as an
ARI event. Should a key still reach the media leg as well (an AudioSocket DTMF frame, a bridge set up
otherwise), the two reports of one press arrive within milliseconds of each other: a report from
one source that matches an unmatched one from the other within ``window`` seconds is the same press.
Two presses of one key from the same source are two presses.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

SOURCES = ("ari", "media")


class KeyPresses:
    def __init__(self, clock: IReactorTime, window: float = 0.5) -> None:
        self._clock = clock
        self.window = window
        #: per source, the presses it reported that the other has not: (digit, time)
        self._unmatched: dict[str, list[tuple[str, float]]] = {source: [] for source in SOURCES}

    def press(self, digit: str, source: str) -> bool:
        """A key reported by ``source``: True for a new press, False for the other report of one."""
        now = self._clock.seconds()
        for reports in self._unmatched.values():
            reports[:] = [(key, at) for key, at in reports if now - at < self.window]
        other = self._unmatched[SOURCES[1] if source == SOURCES[0] else SOURCES[0]]
        for index, (key, _) in enumerate(other):
            if key == digit:
                del other[index]
                return False
        self._unmatched[source].append((digit, now))
        return True
