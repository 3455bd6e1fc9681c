"""The simulator's pure parts, without sockets: strict RTP, the heard track, timers and queues."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_agent.sim.control import ChannelGone, CommandQueue, Timers
from twisted_agent.sim.core import Pbx
from twisted_agent.sim.events import EventHub
from twisted_agent.sim.external_media import parse_host_port
from twisted_agent.sim.heard import HeardTrack
from twisted_agent.sim.model import AriError, Ids, ari_timestamp
from twisted_agent.sim.playback import find_sound
from twisted_agent.sim.rtp import StrictRtp

TARGET = ("127.0.0.1", 4000)
OTHER = ("127.0.0.1", 5000)


def test_ari_timestamp_has_milliseconds_and_no_colon_in_the_offset() -> None:
    assert ari_timestamp(1782407832.3456) == "2026-06-25T17:17:12.345+0000"
    assert ari_timestamp(0) == "1970-01-01T00:00:00.000+0000"


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:4000", ("127.0.0.1", 4000)), ("[::1]:5000", ("::1", 5000)), ("host:1", ("host", 1))])
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "1.2.3.4:70000", "[::1]", ":80"])
def test_parse_host_port_rejects(value: str) -> None:
    with pytest.raises(AriError) as caught:
        parse_host_port(value)
    assert caught.value.code == 400


def test_strict_rtp_accepts_the_target_at_once() -> None:
    strict = StrictRtp(TARGET)
    assert strict.accept(TARGET, 9, 0.0)
    assert strict.locked == TARGET


def test_strict_rtp_learns_another_source_after_four_sequential_packets() -> None:
    strict = StrictRtp(TARGET)
    wrapping = [(65534 + i) & 0xFFFF for i in range(6)]
    assert [strict.accept(OTHER, seq, 0.0) for seq in wrapping] == [False] * 4 + [True] * 2
    assert strict.locked == OTHER


def test_strict_rtp_restarts_learning_on_a_gap_and_locks_after_five_seconds() -> None:
    strict = StrictRtp(TARGET)
    assert not any(strict.accept(OTHER, seq, 0.0) for seq in (1, 2, 4, 5, 6, 8, 9, 10))
    assert strict.locked is None
    assert not strict.accept(OTHER, 11, 0.0)
    assert strict.locked == OTHER and strict.accept(OTHER, 12, 0.0)
    late = ("127.0.0.1", 6000)
    assert not any(strict.accept(late, seq, 6.0) for seq in range(10))
    assert not strict.accept(TARGET, 1, 6.0)


@given(st.lists(st.tuples(st.sampled_from([OTHER, ("127.0.0.1", 6000)]), st.integers(0, 0xFFFF)), max_size=40))
def test_strict_rtp_never_accepts_a_stranger_before_four_in_a_row(packets: list[tuple[tuple[str, int], int]]) -> None:
    strict = StrictRtp(TARGET)
    run: tuple[tuple[str, int], int, int] | None = None
    for source, sequence in packets:
        if run is not None and run[0] == source and (run[1] + 1) & 0xFFFF == sequence:
            run = (source, sequence, run[2] + 1)
        else:
            run = (source, sequence, 1)
        accepted = strict.accept(source, sequence, 0.0)
        if accepted:
            assert strict.locked == source
        if strict.locked is None:
            assert not accepted and run[2] < 4


def test_heard_track_places_streams_at_arrival_with_a_jitter_allowance() -> None:
    track = HeardTrack()
    track.start(100.0)
    frame = b"\x10\x00" * 160
    track.hear_stream("a", frame, 100.5, "rtp")
    track.hear_stream("a", frame, 100.525, "rtp")   # 5 ms late: follows on, no gap
    track.hear_stream("a", frame, 101.0, "rtp")     # a pause: new talkspurt at its arrival
    assert track.segments(102.0) == [(0.5, 0.54, "rtp"), (1.0, 1.02, "rtp")]
    assert track.first_heard_at == 100.5
    pcm = track.pcm(102.0)
    assert len(pcm) == 2 * 16000
    assert pcm[7998:8000] == b"\x00\x00" and pcm[8000:8000 + 640] == frame * 2 and pcm[8640:8642] == b"\x00\x00"


def test_heard_track_drops_what_arrives_too_far_ahead_and_mixes_overlaps() -> None:
    track = HeardTrack()
    track.start(0.0)
    frame = b"\x00\x40" * 160
    for _ in range(20):
        track.hear_stream("burst", frame, 0.0, "rtp")
    assert track.overflow_dropped == 9
    track.hear_at(0, frame, "playback:x")
    pcm = track.pcm(1.0)
    assert pcm[:2] == b"\xff\x7f"  # 0x4000 + 0x4000 clipped to 32767
    assert ("playback:x" in {label for _, _, label in track.segments(1.0)})


def test_heard_track_ignores_audio_before_answer_and_after_the_end() -> None:
    track = HeardTrack()
    track.hear_stream("a", b"\x01\x00" * 160, 1.0, "rtp")
    track.start(2.0)
    track.stop(3.0)
    track.hear_stream("a", b"\x01\x00" * 160, 3.5, "rtp")
    assert track.segments(9.0) == [] and len(track.pcm(9.0)) == 16000


def test_playback_start_delay_follows_the_measured_distribution() -> None:
    pbx = Pbx(Clock(), Timers(Clock()), random.Random(7), Ids(random.Random(7)),  # type: ignore[arg-type]
              EventHub(Timers(Clock()), "id"), host="127.0.0.1", media_root=None)
    delays = sorted(pbx.playback_start_delay() for _ in range(2001))
    assert 0.0013 <= delays[0] and delays[-1] <= 0.0058
    assert abs(delays[1000] - 0.0027) < 0.0002
    steps = [pbx.hangup_step() for _ in range(1000)]
    assert 0.001 <= min(steps) and 3 * max(steps) <= 0.028


def test_timers_cancel_everything() -> None:
    clock = Clock()
    timers = Timers(clock)
    fired: list[str] = []
    timers.later(1.0, fired.append, "later")
    ticks: list[int] = []
    timers.loop(0.02, ticks.append)
    slept = timers.sleep(5.0)
    clock.pump([0.02, 0.02])
    assert ticks == [1, 1]
    clock.advance(0.1)
    assert ticks[-1] == 5  # a late tick reports how many intervals passed
    timers.cancel_all()
    clock.advance(10)
    assert fired == [] and len(ticks) == 3
    assert slept.called
    slept.addErrback(lambda f: None)


def test_command_queue_runs_commands_one_after_another() -> None:
    clock = Clock()
    queue = CommandQueue(Timers(clock))
    log: list[str] = []
    first: Deferred[None] = Deferred()

    def slow() -> Deferred[None]:
        log.append("slow started")
        return first

    def second() -> str:
        log.append("second")
        return "value"

    queue.post(slow, delay=0.003)
    result = queue.submit(second)
    assert log == [] and queue.busy
    clock.advance(0.003)
    assert log == ["slow started"]
    first.callback(None)
    assert log == ["slow started", "second"]
    assert result.result == "value"
    blocking: Deferred[None] = Deferred()
    queue.post(lambda: blocking)
    waiting = queue.submit(lambda: None)
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    queue.close()
    late = queue.submit(lambda: None)
    late.addErrback(failures.append)
    assert [failure.check(ChannelGone) for failure in failures] == [ChannelGone, ChannelGone]


def test_find_sound_prefers_the_channel_format(tmp_path: Path) -> None:
    for ext in (".wav", ".alaw", ".ulaw"):
        (tmp_path / f"clip{ext}").write_bytes(b"\xff" * 10)
    base = str(tmp_path / "clip")
    assert find_sound(base, "ulaw", "en", None) == base + ".ulaw"
    assert find_sound(base, "alaw", "en", None) == base + ".alaw"
    assert find_sound(base, "slin", "en", None) == base + ".wav"
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "hello.sln").write_bytes(b"\x00" * 10)
    assert find_sound("hello", "ulaw", "en", str(tmp_path)) == str(tmp_path / "en" / "hello.sln")
    assert find_sound("hello", "ulaw", "en", None) is None
    assert find_sound(str(tmp_path / "nothing"), "ulaw", "en", None) is None
