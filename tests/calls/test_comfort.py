"""ComfortSounds on task.Clock with a recording player: when the filler, the pips and the ringback play,
when they stop, and how long their echo tail gates the caller."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twisted_agent.calls.comfort import ComfortSounds, is_comfort

FILLER, PIPS, RINGBACK = b"\x01\x00" * 800, b"\x02\x00" * 800, b"\x03\x00" * 800


class RecordingPlayer:
    def __init__(self) -> None:
        self.added: list[tuple[bytes, int, str]] = []
        self.dropped: list[str] = []
        self.idle = True

    def add(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.added.append((pcm, rate, utterance_id))
        self.idle = False

    def drop(self, utterance_id: str) -> Deferred[None]:
        self.dropped.append(utterance_id)
        self.idle = True
        return succeed(None)


def make(filler_ms: int = 1200, player: Any = None) -> tuple[Clock, ComfortSounds, RecordingPlayer, dict[str, Any]]:
    clock = Clock()
    clock.advance(50)
    player = player if player is not None else RecordingPlayer()
    state: dict[str, Any] = {"waiting": True, "fillers_started": 0, "player": player}

    def started() -> None:
        state["fillers_started"] += 1

    def play(pcm: bytes, rate: int, utterance_id: str) -> None:
        state["player"].add(pcm, rate, utterance_id)

    comfort = ComfortSounds(clock, "c1", filler=FILLER, pips=PIPS, filler_ms=filler_ms, guard_s=0.2,
                            player=lambda: state["player"], play=play, waiting=lambda: state["waiting"],
                            on_filler=started)
    return clock, comfort, player, state


def test_the_filler_comes_filler_ms_after_the_caller_stopped_not_after_the_turn_end() -> None:
    clock, comfort, player, state = make()
    comfort.turn_started(since_speech_end=0.5)  # the turn end came 500 ms after the last word
    clock.advance(0.69)
    assert player.added == [] and not comfort.playing
    clock.advance(0.02)
    assert player.added == [(FILLER, 8000, "comfort-filler-1")] and is_comfort(player.added[0][2])
    assert comfort.fillers == [50.71] and state["fillers_started"] == 1 and comfort.playing


def test_no_filler_once_the_answer_is_no_longer_awaited_or_cancelled() -> None:
    clock, comfort, player, state = make()
    comfort.turn_started(since_speech_end=0.0)
    state["waiting"] = False  # the answer came, or the caller went on
    clock.advance(2)
    comfort.turn_started(since_speech_end=0.0)
    state["waiting"] = True
    comfort.cancel_filler()  # the agent started speaking
    clock.advance(2)
    assert player.added == [] and comfort.fillers == [] and state["fillers_started"] == 0
    off = make(filler_ms=0)
    off[1].turn_started(since_speech_end=0.0)
    off[0].advance(10)
    assert off[2].added == [], "FILLER_MS=0: never"


def test_pips_follow_a_filler_that_played_out_while_the_answer_is_still_awaited() -> None:
    clock, comfort, player, state = make()
    comfort.turn_started(since_speech_end=1.2)  # already due
    clock.advance(0)
    player.idle = True
    comfort.played_out()
    assert [uid for _, _, uid in player.added] == ["comfort-filler-1", "comfort-tone-2"]
    assert player.added[1][0] == PIPS and comfort.utterance_id == "comfort-tone-2"


def test_a_sound_that_played_out_gates_the_caller_for_its_echo_tail() -> None:
    clock, comfort, player, state = make()
    comfort.start(RINGBACK, "ringback")
    comfort.played_out()
    assert comfort.utterance_id == "comfort-ringback-1", "still playing: nothing changes"
    state["waiting"] = False
    player.idle = True
    comfort.played_out()
    assert comfort.utterance_id is None and comfort.playing
    clock.advance(0.19)
    assert comfort.playing
    clock.advance(0.02)
    assert not comfort.playing and len(player.added) == 1


def test_real_audio_stops_the_sound_at_once_and_ends_its_tail() -> None:
    clock, comfort, player, state = make()
    comfort.stop()
    assert player.dropped == [], "nothing playing: nothing to drop"
    comfort.start(RINGBACK, "ringback")
    comfort.stop()
    assert player.dropped == ["comfort-ringback-1"] and not comfort.playing
    comfort.start(FILLER, "filler")
    comfort.forget()  # the player was stopped or replaced: nothing to drop
    assert player.dropped == ["comfort-ringback-1"] and not comfort.playing


def test_nothing_plays_without_a_player_or_a_sound() -> None:
    clock, comfort, player, state = make()
    comfort.start(b"", "ringback")
    state["player"] = None
    comfort.start(RINGBACK, "ringback")
    comfort.stop()
    comfort.played_out()
    assert player.added == [] and comfort.utterance_id is None and not comfort.playing
