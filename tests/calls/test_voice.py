"""AgentVoice on the engine rig (fake ARI, task.Clock): the player it picks, the guard after the last
audio, the actions that wait for the agent to finish, a barge-in's cut-off, the fall back to files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred

from tests.calls.rig import CALLER, Rig
from twisted_agent.calls.playback import FilePlayer, StreamPlayer
from twisted_agent.calls.voice import AgentVoice

LOUD = (np.sin(np.arange(1600) / 3) * 12000).astype("<i2").tobytes()


class FakePlayer:
    def __init__(self, heard: dict[str, int] | None = None) -> None:
        self.idle = True
        self.added: list[str] = []
        self._heard = heard or {}
        self.unsent: list[tuple[str, bytes, int]] = []

    def add(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        self.added.append(utterance_id)

    async def stop(self) -> dict[str, int]:
        return {"u1": 300, "comfort-filler-1": 200}

    def heard(self, utterance_id: str) -> int:
        return self._heard.get(utterance_id, 0)

    def take_unsent(self) -> list[tuple[str, bytes, int]]:
        return self.unsent


class Voice:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.rig = Rig(tmp_path, **env)
        self.rig.ari.add_caller(CALLER)
        self.heard = 0
        self.voice = AgentVoice(self.rig.engine, CALLER, on_idle=lambda: None, on_audio_started=lambda _: None,
                                on_heard=self.on_heard)

    def on_heard(self) -> None:
        self.heard += 1


def test_the_player_follows_downstream_mode(tmp_path: Path) -> None:
    files = Voice(tmp_path)
    files.voice.start(None)
    assert isinstance(files.voice.player, FilePlayer)
    stream = Voice(tmp_path, DOWNSTREAM_MODE="stream", STREAM_STALL_MS="700")
    session: Any = stream.rig.media.create_session(CALLER)
    stream.voice.start(session)
    assert isinstance(stream.voice.player, StreamPlayer) and session.stall_seconds == 0.7


def test_the_caller_has_heard_it_all_gate_guard_ms_after_the_last_audio_played(tmp_path: Path) -> None:
    v = Voice(tmp_path, GATE_GUARD_MS="200")
    voice, done = v.voice, []
    voice.player = FakePlayer()
    voice.open.add("u1")
    voice.played_out(speaking=True)
    voice.after_speaking(lambda: done.append("hang up"), speaking=True)
    assert not voice.guarding, "the provider is still producing u1"
    voice.open.discard("u1")
    voice.played_out(speaking=False)
    assert not voice.guarding, "not speaking: nothing to guard"
    voice.played_out(speaking=True)
    voice.played_out(speaking=True)
    assert voice.guarding
    v.rig.clock.advance(0.19)
    assert v.heard == 0 and done == []
    v.rig.clock.advance(0.02)
    assert v.heard == 1 and done == ["hang up"] and not voice.guarding
    v.rig.clock.advance(1)
    assert v.heard == 1 and done == ["hang up"], "each action runs once"


def test_new_audio_cancels_the_guard_and_an_agent_that_says_nothing_acts_at_once(tmp_path: Path) -> None:
    v = Voice(tmp_path)
    voice, done = v.voice, []
    voice.player = FakePlayer()
    voice.played_out(speaking=True)
    voice.cancel_guard()
    v.rig.clock.advance(1)
    assert v.heard == 0 and not voice.guarding
    voice.after_speaking(lambda: done.append("now"), speaking=False)
    assert done == ["now"]


def test_a_barge_in_cuts_off_what_is_still_coming_and_reports_what_was_heard(tmp_path: Path) -> None:
    v = Voice(tmp_path)
    voice = v.voice
    voice.player = FakePlayer(heard={"u2": 1200})
    voice.open |= {"u1", "u2"}
    cut_off = voice.cut_off_open()
    assert cut_off == {"u1", "u2"} and voice.open == set() and voice.cut_off == {"u1", "u2"}
    heard: list[dict[str, int]] = []
    voice.stop(cut_off).addCallback(heard.append)
    assert heard == [{"u1": 300, "u2": 1200}], "u2 played out before the stop; comfort sounds are not reported"
    voice.player = None
    later: list[dict[str, int]] = []
    voice.stop({"u3"}).addCallback(later.append)
    assert later == [{"u3": 0}]


def test_streaming_that_fails_goes_on_with_files_from_what_was_not_sent(tmp_path: Path) -> None:
    v = Voice(tmp_path, DOWNSTREAM_MODE="stream")
    voice = v.voice
    stream = FakePlayer()
    stream.unsent = [("u0", LOUD, 8000), ("comfort-filler-3", LOUD, 8000), ("u1", LOUD, 8000)]
    voice.player = stream
    voice.cut_off.add("u0")
    voice.fall_back("no frame could be sent for 1.2 s")
    assert isinstance(voice.player, FilePlayer) and voice.fallback.startswith("no frame")
    assert v.rig.engine.counters["playback_fallbacks"] == 1
    plays = [r for r in v.rig.ari.requests if r[0] == "play"]
    assert len(plays) == 1, "only u1: the cut-off reply and the filler are not worth a file"
    assert voice.talk.threshold.value > 256, "talk detection is kept deaf to the echo of what is to play"


def test_talk_detection_is_for_file_playback_with_barge_in(tmp_path: Path) -> None:
    def enabled(player: Any, **env: str) -> bool:
        v = Voice(tmp_path, **env)
        v.voice.player = player(v) if callable(player) else player
        Deferred.fromCoroutine(v.voice.detect_talking())
        return v.voice.talk.on

    def files(v: Voice) -> Any:
        v.voice.start(None)
        return v.voice.player

    assert enabled(files)
    # without barge-in the file plays on: the caller, off the media leg, reaches no provider meanwhile
    assert not enabled(files, BARGE_IN="false")
    assert not enabled(FakePlayer()), "streams need no talk detection"
