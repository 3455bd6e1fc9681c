"""Is an inbound frame the caller, or the agent's own voice coming back (line echo)?

A telephone line returns part of what it carries: the hybrid in an analogue leg, or a handset's
acoustic path, sends the agent's audio back on the inbound stream 20-60 ms later, band-limited to
the telephone band (300-3400 Hz) and 10 dB or more quieter. A VAD calls that speech, and an agent
that takes it for the caller interrupts itself.

**Method.** :class:`EchoReference` keeps the last few hundred milliseconds of what the agent sent,
laid out on the timeline the far end plays it on (below). For the latest 40 ms of inbound audio it
computes the normalised cross-correlation with every stretch of the sent audio that could have
come back (delays 0 to ``max_delay_ms``), both band-limited to 300-3400 Hz (an FFT mask), and takes
the best: ``rho``. Echo is a filtered, scaled copy of something sent, so ``rho`` is close to 1
whatever the echo's level (measured through the simulated line, -10 dB, 40 ms, with 0-2 ms of send
jitter: p1 0.93, p5 0.96, median 0.997). Frames with ``rho`` >= 0.95 are echo beyond doubt and
their delay is the echo path's: once three agree (median of the last nine), only delays within
25 ms of it count, which removes chance correlations of the caller's voice with some stretch of
the agent's (pure caller speech, no echo: 16 % of frames over 0.6 searching all delays, none with
the learnt delay). A match of 0.9 or better at any delay is still echo: the far end's jitter
buffer may shift the path by a frame or more after a stall, while it is still the agent's audio.
Over the echo, caller speech drags ``rho`` down with the share of inbound energy the echo does not
explain. A frame counts as the caller's when ``rho`` is under ``threshold`` (0.8), or when the
agent sent nothing in the last ``max_delay_ms`` (nothing can come back). Measured with the caller
as loud as the agent and the echo at -10 dB: every echo-only frame is echo; 4-10 % of the
caller's frames over the echo are still taken for echo (where the caller's syllables are weak and
the echo strong), which delays a barge-in by a frame at most now and then.

**The timeline.** The agent's frames leave on the pacer's 20 ms ticks and the far end plays them
by their RTP timestamps: back to back, with silence only for ticks that carried no frame. What
:meth:`sent` is told is the time the frame left, which is the tick plus the reactor's lateness: a
millisecond or two as a rule, more when the reactor is busy, and after a stall the overdue frames
leave together under one stamp. So the reference does not lay frames out by their stamps: each
frame follows the previous one, unless its stamp is half a frame or more past its place (ticks
went by without a frame: that many whole frames of silence go in first). As no frame leaves
before its tick, a frame stamped half a frame or more *before* its place is an overdue one of a
burst, which shows that the silence just put in was a stall, not a pause: it is taken out again.
The earliest stamps mark the ticks (lateness is never negative), so the layout follows them.
Laying frames out by their stamps instead (as this module first did) turned every bit of
lateness into a sliver of silence between two frames: the reference was spliced every frame or
two, and a 40 ms window across a splice matches no single delay. In ``bench/barge_in.py`` a third
of the pure echo frames scored under 0.8 and a fifth were taken for the caller's, and now and
then six of eight in a row made a false barge-in.

**Noise.** A VAD also takes steady line noise for speech. :meth:`is_caller` therefore also asks
that what the echo does not explain be as loud as a voice: ``floor_dbfs`` (-35 dBFS RMS over the
40 ms; callers talk at about -30 to -15 dBFS, line noise sits at -40 dBFS and below).

**Limits.** Non-linear echo (a handset's clipping loudspeaker, heavy compression), echo delayed
beyond ``max_delay_ms`` (default 200 ms: satellite or long VoIP chains), and a caller who talks
much more quietly than the echo (``rho`` stays high) are taken for echo; a caller on a very quiet
line (under -35 dBFS) cannot interrupt. The timeline is inferred from stamps: a stall of half a
frame or more with nothing overdue behind it reads as a pause until the next frame takes it back,
and a far end whose jitter buffer runs dry in a stall plays silence the reference does not have;
either way a frame or two around the splice may be misjudged, which the barge-in detector's
density rule absorbs (calls/bargein.py). Passing the tick's deadline instead of the time sent
would make the layout exact. Time-varying echo paths are fine: nothing is adapted beyond the
delay, every frame is judged afresh. Cost: seven 4096-point real FFTs per voiced inbound frame
while the agent speaks (~0.2 ms on a 2-core Xeon VM).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

SAMPLE_RATE = 8000
BAND = (300.0, 3400.0)
#: a frame this well explained is echo beyond doubt: its delay is the echo path's
LEARN_RHO = 0.95
#: away from the learnt delay, a match this good is still echo (chance matches of a voice stay far below)
ANYWHERE_RHO = 0.9


class Judgement(NamedTuple):
    """One inbound frame judged (for logs and ``bench/barge_in.py --verbose``)."""

    at: float
    rho: float
    delay_ms: float  #: the delay of the best match
    residual_dbfs: float  #: what the echo does not explain, RMS
    offset_ms: float  #: how far ``at`` is past the end of the reference (negative: frames not yet played)
    caller: bool


class EchoReference:
    def __init__(self, leg_rate: int = SAMPLE_RATE, max_delay_ms: int = 200, window_ms: int = 40,
                 threshold: float = 0.8) -> None:
        self.leg_rate = leg_rate
        self.max_delay_s = max_delay_ms / 1000
        self.window = window_ms * SAMPLE_RATE // 1000
        self.threshold = threshold
        span = self.window + max_delay_ms * SAMPLE_RATE // 1000 + 2 * SAMPLE_RATE // 50  # + 2 frames of slack
        self._span = span
        self._ring = np.zeros(span, dtype=np.float32)
        #: the time the ring's last sample has played by: the tick the next frame is due on
        self._next: float | None = None
        #: frames of silence last put in that overdue frames may still show to have been a stall
        self._retractable = 0
        self._after = 0  # samples pushed since that silence
        self._nfft = 1 << int(np.ceil(np.log2(span + self.window)))
        freqs = np.fft.rfftfreq(self._nfft, 1 / SAMPLE_RATE)
        self._mask = ((freqs >= BAND[0]) & (freqs <= BAND[1])).astype(np.float32)
        self.judged = 0
        self.echoes = 0
        self.too_quiet = 0
        #: frames of silence put in for ticks without a frame, and taken out again as a stall's
        self.silence_frames = 0
        self.stall_frames = 0
        self.last_rho = 0.0
        self.last_delay = 0
        self.history: deque[Judgement] = deque(maxlen=16)
        #: the echo path's delay in samples once learnt from unmistakable echo; then only delays near it count
        self.delay: int | None = None
        self.delay_tolerance = 25 * SAMPLE_RATE // 1000  # the far end's jitter buffer, the arrival stamps
        self._clear_delays: list[int] = []

    def sent(self, frame: bytes, now: float) -> None:
        """A frame the agent put on the wire at ``now`` (at the leg's rate): it goes on the timeline
        right after the previous one, or after whole frames of silence (see the module docstring)."""
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        if self.leg_rate != SAMPLE_RATE:
            step = self.leg_rate // SAMPLE_RATE
            samples = samples[: len(samples) // step * step].reshape(-1, step).mean(axis=1)
        n = len(samples)
        if not n:
            return
        duration = n / SAMPLE_RATE
        place = now if self._next is None else self._next  # where it goes: right after the last one
        offset = now - place  # how late it was sent for that place
        if self._next is None or offset > self.max_delay_s:
            # the first frame, or the first after a pause longer than any echo: silence before it
            self._push(np.zeros(self._span, dtype=np.float32))
            place, self._retractable = now, 0
        elif offset >= duration / 2:
            # ticks went by without a frame: a pause, or a stall that overdue frames will show up
            idle = int(offset / duration + 0.5)
            self._push(np.zeros(min(idle * n, self._span), dtype=np.float32))
            place += idle * duration
            self._retractable, self._after = idle, 0
            self.silence_frames += idle
        elif offset <= -duration / 2 and self._retractable:
            # stamped a tick or more before its place, and no frame leaves before its tick: an
            # overdue frame, so the silence just put in was the stall that made it overdue
            back = min(self._retractable, max(1, int(-offset / duration + 0.5)))
            self._retract(back * n)
            place -= back * duration
            self._retractable -= back
            self.stall_frames += back
        else:
            self._retractable = 0  # on its tick: the silence before it, if any, was a pause
            if offset < 0:
                place = now  # lateness is never negative: the earliest stamps are the ticks
        self._push(samples)
        self._after += n
        self._next = place + duration

    def _push(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n >= self._span:
            self._ring[:] = samples[-self._span:]
        else:
            self._ring[:-n] = self._ring[n:]
            self._ring[-n:] = samples

    def _retract(self, samples: int) -> None:
        """Take ``samples`` of silence out from before the latest ``self._after`` samples."""
        end = self._span - self._after
        if end - samples <= 0:
            return
        self._ring[samples:end] = self._ring[: end - samples].copy()
        self._ring[:samples] = 0.0

    def rho(self, inbound: bytes, now: float) -> float:
        """How well the sent audio explains ``inbound`` (the latest inbound audio, 8 kHz, ending at
        ``now``): the best normalised band-limited correlation over the possible delays, 0..1."""
        if self._next is None or now - self._next > self.max_delay_s:
            return 0.0
        x = np.frombuffer(inbound, dtype="<i2").astype(np.float32)[-self.window:]
        # the reference up to `now`: silence after the ring's end; what the ring holds past `now`
        # (the rest of the frame just sent) has not played yet, so cannot have come back
        lag = round((now - self._next) * SAMPLE_RATE)
        if lag > 0:
            ref = np.concatenate([self._ring[lag:], np.zeros(min(lag, self._span), dtype=np.float32)])
        elif self._span + lag >= len(x):
            ref = self._ring[: self._span + lag]
        else:
            return 0.0
        nfft = self._nfft
        xb = np.fft.irfft(np.fft.rfft(x, nfft) * self._mask, nfft)[: len(x)]
        yb = np.fft.irfft(np.fft.rfft(ref, nfft) * self._mask, nfft)[: len(ref)]
        x_energy = float(np.dot(xb, xb))
        if x_energy <= 1e-3:
            return 0.0
        # c[k] = sum_n xb[n] * yb[n + k]: xb against every stretch of the reference
        corr = np.fft.irfft(np.conj(np.fft.rfft(xb, nfft)) * np.fft.rfft(yb, nfft), nfft)[: len(ref) - len(x) + 1]
        energy = np.concatenate([[0.0], np.cumsum(yb.astype(np.float64) ** 2)])
        windows = energy[len(x):] - energy[: len(energy) - len(x)]
        rho = np.abs(corr) / np.sqrt(x_energy * np.maximum(windows, 1e-3))
        if not len(rho):
            return 0.0
        # index k lines the inbound window up with reference samples [k, k + len(x)): a delay of
        # len(ref) - len(x) - k samples
        delays = len(ref) - len(x) - np.arange(len(rho))
        best = int(rho.argmax())
        anywhere = float(rho[best])
        if anywhere >= LEARN_RHO:  # unmistakable echo: it tells the echo path's delay
            self._clear_delays.append(int(delays[best]))
            del self._clear_delays[:-9]
            if len(self._clear_delays) >= 3:
                self.delay = int(np.median(self._clear_delays))
        self.last_delay = int(delays[best])
        if self.delay is not None:
            near = np.abs(delays - self.delay) <= self.delay_tolerance
            if anywhere >= ANYWHERE_RHO and not near[best]:
                # a near-perfect match away from the learnt delay: the far end's playout moved (a
                # stall, its jitter buffer), not the echo path; it is still echo
                return min(1.0, anywhere)
            rho = np.where(near, rho, 0.0)
            best = int(rho.argmax())
            self.last_delay = int(delays[best])
        return float(min(1.0, rho[best]))

    def is_echo(self, inbound: bytes, now: float) -> bool:
        self.judged += 1
        self.last_rho = self.rho(inbound, now)
        echo = self.last_rho >= self.threshold
        self.echoes += echo
        return echo

    def is_caller(self, inbound: bytes, now: float, floor_dbfs: float = -35.0) -> bool:
        """Whether the latest inbound audio holds the caller's voice: not echo, and what the echo
        does not explain (energy x (1 - rho^2)) is at least ``floor_dbfs`` (RMS), as a voice is and
        line noise (-40 dBFS and below) is not."""
        echo = self.is_echo(inbound, now)
        x = np.frombuffer(inbound, dtype="<i2").astype(np.float64)[-self.window:]
        residual = float(np.mean(x * x)) * (1.0 - self.last_rho ** 2) if len(x) else 0.0
        caller = not echo and residual >= (32768.0 * 10 ** (floor_dbfs / 20)) ** 2
        self.too_quiet += not echo and not caller
        self.history.append(Judgement(
            now, round(self.last_rho, 3), self.last_delay * 1000 / SAMPLE_RATE,
            round(10 * np.log10(max(residual, 1e-3) / 32768.0 ** 2), 1),
            round((now - self._next) * 1000, 1) if self._next is not None else float("nan"), caller))
        return caller
