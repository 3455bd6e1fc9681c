"""How long the caller waited for each answer: the marks of one turn and the timings made of them.

A turn is timed from the caller's last voiced audio (``speech_end``), through the moment the engine
decided the turn was over (``turn_end``) and the moment the provider's work on it started
(``work_started``: until then it waited in the shared models' queues, ``queue_ms``), to the moment
the first audio of the answer started playing to the caller (``heard``); a filler that stood in for
a slow answer and the provider's own stage timings are marked on the way. The timings are recorded
once per turn: when the answer is heard, or when the turn failed (the caller got the apology
instead; ``failed`` says why, one of :data:`TURN_FAILURES`, and ``failed_after_ms`` how long the
caller had waited since their last word). A failed turn has no ``voice_to_voice_ms``: the voice
to voice latency is that of answered turns, and failed turns are counted beside it. A turn whose
answer is dropped (the caller went on, or barged in over the filler) records nothing, and the
agent's own initiatives (the greeting, "are you still there?") are not turns.

Plain logic on a clock; the call says what happened, the clock says when.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

#: why a turn ended in the apology: its work did not start within QUEUE_TIMEOUT, its answer did not
#: start within PROVIDER_TIMEOUT of that, the provider failed, or the call's media leg did
TURN_FAILURES = ("queue_timeout", "provider_timeout", "provider_error", "media_error")

#: one turn's timings: milliseconds by name, and ``failed`` (a TURN_FAILURES reason) if it failed
TurnTiming = dict[str, float | str]


class TurnClock:
    def __init__(self, clock: IReactorTime, on_recorded: Callable[[TurnTiming], None]) -> None:
        self._clock = clock
        self._on_recorded = on_recorded
        #: reactor times of the current turn's moments, and the provider's ``provider_<stage>_ms``
        self.marks: dict[str, float] = {}
        #: the current turn's answer has not been heard yet: its first audio completes the timings
        self.awaiting_reply = False
        #: one dict per answered or failed turn, in order (the live record's turns, the metrics)
        self.timings: list[TurnTiming] = []

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

    def work_started(self) -> None:
        """The provider started working on the awaited answer (its wait in the queue is over)."""
        if self.awaiting_reply and self.marks and "work_started" not in self.marks:
            self.marks["work_started"] = self._clock.seconds()

    def failed(self, reason: str) -> None:
        """The awaited answer will never come: the caller gets the apology. The turn is recorded as
        failed (``reason``: one of TURN_FAILURES); nothing if no answer was awaited."""
        if self.awaiting_reply and self.marks:
            self.awaiting_reply = False
            self.marks["failed_at"] = self._clock.seconds()
            self._record(failed=reason)

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

    def _record(self, failed: str = "") -> None:
        marks = self.marks

        def ms(later: str, earlier: str) -> float:
            return round((marks[later] - marks[earlier]) * 1000, 1)

        timing: TurnTiming = {key: value for key, value in marks.items() if key.endswith("_ms")}
        if "speech_end" in marks:
            timing["turn_end_wait_ms"] = ms("turn_end", "speech_end")
            if "work_started" in marks:
                # work a speculation started before the turn end waited for nothing
                timing["queue_ms"] = max(0.0, ms("work_started", "turn_end"))
            if "heard" in marks:
                timing["voice_to_voice_ms"] = ms("heard", "speech_end")
                timing["after_turn_end_ms"] = ms("heard", "turn_end")
            if "filler" in marks:
                timing["filler_ms"] = ms("filler", "speech_end")
            if failed:
                timing["failed"] = failed
                timing["failed_after_ms"] = ms("failed_at", "speech_end")
        self.timings.append(timing)
        self._on_recorded(timing)
