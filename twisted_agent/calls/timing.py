"""How long the caller waited for each answer: the marks of one turn and the timings made of them.

A turn is timed from the caller's last voiced audio (``speech_end``), through the moment the engine
decided the turn was over (``turn_end``), to the moment the first audio of the answer started
playing to the caller (``heard``); a filler that stood in for a slow answer and the provider's own
stage timings are marked on the way. The timings are recorded when the answer is heard, once per
turn: a turn whose answer is dropped (the caller went on, or barged in over the filler) records
nothing, and the agent's own initiatives (the greeting, "are you still there?") are not turns.

Plain logic on a clock; the call says what happened, the clock says when.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime


class TurnClock:
    def __init__(self, clock: IReactorTime, on_recorded: Callable[[dict[str, float]], None]) -> None:
        self._clock = clock
        self._on_recorded = on_recorded
        #: reactor times of the current turn's moments, and the provider's ``provider_<stage>_ms``
        self.marks: dict[str, float] = {}
        #: the current turn's answer has not been heard yet: its first audio completes the timings
        self.awaiting_reply = False
        #: one dict per answered turn, in order (the live record's turns, the metrics' histograms)
        self.timings: list[dict[str, float]] = []

    def turn_ended(self, speech_end: float | None) -> None:
        """The turn is over now; the caller's voice stopped at ``speech_end`` (now if unknown)."""
        now = self._clock.seconds()
        self.marks = {"speech_end": speech_end or now, "turn_end": now}

    def since_speech_end(self) -> float:
        now = self._clock.seconds()
        return now - self.marks.get("speech_end", now)

    def answer_awaited(self) -> None:
        """The provider is answering the turn."""
        self.awaiting_reply = True

    def answer_dropped(self) -> None:
        """The answer will never be heard: the turn records nothing."""
        self.awaiting_reply = False

    def filler(self) -> None:
        self.marks["filler"] = self._clock.seconds()

    def provider_stage(self, stage: str, ms: float) -> None:
        self.marks[f"provider_{stage}_ms"] = ms

    def reply_audio(self) -> None:
        """The answer's first audio came from the provider (it may wait behind a filler)."""
        if self.awaiting_reply and "reply_audio" not in self.marks and self.marks:
            self.marks["reply_audio"] = self._clock.seconds()

    def heard(self) -> None:
        """Audio of the answer started playing to the caller: the turn's timings are complete."""
        if self.awaiting_reply and self.marks:
            self.awaiting_reply = False
            self.marks["heard"] = self._clock.seconds()
            self._record()

    def _record(self) -> None:
        marks = self.marks
        timing = {key: value for key, value in marks.items() if key.endswith("_ms")}
        if "speech_end" in marks and "heard" in marks:
            timing["turn_end_wait_ms"] = round((marks["turn_end"] - marks["speech_end"]) * 1000, 1)
            timing["voice_to_voice_ms"] = round((marks["heard"] - marks["speech_end"]) * 1000, 1)
            timing["after_turn_end_ms"] = round((marks["heard"] - marks["turn_end"]) * 1000, 1)
            if "filler" in marks:
                timing["filler_ms"] = round((marks["filler"] - marks["speech_end"]) * 1000, 1)
        self.timings.append(timing)
        self._on_recorded(timing)
