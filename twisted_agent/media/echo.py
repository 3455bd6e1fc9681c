"""Is an inbound frame the caller, or the agent's own voice coming back (line echo)?

A telephone line returns part of what it carries: the hybrid in an analogue leg, or a handset's
acoustic path, sends the agent's audio back on the inbound stream 20-60 ms later, band-limited to
the telephone band (300-3400 Hz) and 10 dB or more quieter. A VAD calls that speech, and an agent
that takes it for the caller interrupts itself.

**Method.** :class:`EchoReference` keeps the last few hundred milliseconds of what the agent sent,
stamped with the time each frame went on the wire. For the latest 40 ms of inbound audio it
computes the normalised cross-correlation with every stretch of the sent audio that could have
come back (delays 0 to ``max_delay_ms``), both band-limited to 300-3400 Hz (an FFT mask), and takes
the best: ``rho``. Echo is a filtered, scaled copy of something sent, so ``rho`` is close to 1
whatever the echo's level (measured: p5 0.97 for a -10 dB band-limited echo 40 ms late). Frames
with ``rho`` >= 0.95 are echo beyond doubt and their delay is the echo path's: once three agree
(median of the last nine), only delays within 25 ms of it count (the send and arrival stamps
jitter by a frame or so), which removes chance correlations
of the caller's voice with some stretch of the agent's (pure caller speech, no echo: 16 % of
frames over 0.6 searching all delays, none with the learnt delay). A match of 0.9 or better at
any delay is still echo: when the reactor stalls, frames are stamped late and in bursts and the
apparent delay jumps, while the echo path has not changed. Over the echo, caller speech
drags ``rho`` down with the share of inbound energy the echo does not explain. A frame counts as
the caller's when ``rho`` is under ``threshold`` (0.8), or when the agent sent nothing in the last
``max_delay_ms`` (nothing can come back). Measured on the bundled question clip with the caller
as loud as the agent and the echo at -10 dB: every echo-only frame is echo, 9 % of the caller's
frames over the echo are still taken for echo (where the caller's syllables are weak and the
echo strong), which delays a barge-in by a frame at most now and then.

**Noise.** A VAD also takes steady line noise for speech. :meth:`is_caller` therefore also asks
that what the echo does not explain be as loud as a voice: ``floor_dbfs`` (-35 dBFS RMS over the
40 ms; callers talk at about -30 to -15 dBFS, line noise sits at -40 dBFS and below).

**Limits.** Non-linear echo (a handset's clipping loudspeaker, heavy compression), echo delayed
beyond ``max_delay_ms`` (default 200 ms: satellite or long VoIP chains), and a caller who talks
much more quietly than the echo (``rho`` stays high) are taken for echo; a caller on a very quiet
line (under -35 dBFS) cannot interrupt. Time-varying echo paths
are fine: nothing is adapted, every frame is judged afresh. Cost: two 1024-point FFTs per voiced
inbound frame while the agent speaks (~30 us).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 8000
BAND = (300.0, 3400.0)
#: a frame this well explained is echo beyond doubt: its delay is the echo path's
LEARN_RHO = 0.95
#: away from the learnt delay, a match this good is still echo (chance matches of a voice stay far below)
ANYWHERE_RHO = 0.9


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
        self._last_sent: float | None = None
        self._nfft = 1 << int(np.ceil(np.log2(span + self.window)))
        freqs = np.fft.rfftfreq(self._nfft, 1 / SAMPLE_RATE)
        self._mask = ((freqs >= BAND[0]) & (freqs <= BAND[1])).astype(np.float32)
        self.judged = 0
        self.echoes = 0
        self.too_quiet = 0
        self.last_rho = 0.0
        self.last_delay = 0
        #: the echo path's delay in samples once learnt from unmistakable echo; then only delays near it count
        self.delay: int | None = None
        self.delay_tolerance = 25 * SAMPLE_RATE // 1000  # jitter between send and arrival stamps
        self._clear_delays: list[int] = []

    def sent(self, frame: bytes, now: float) -> None:
        """A frame the agent put on the wire at ``now`` (at the leg's rate)."""
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        if self.leg_rate != SAMPLE_RATE:
            step = self.leg_rate // SAMPLE_RATE
            samples = samples[: len(samples) // step * step].reshape(-1, step).mean(axis=1)
        if self._last_sent is not None:
            # a gap in sending (the agent was silent): what would have come back is silence
            gap = round((now - self._last_sent) * SAMPLE_RATE) - len(samples)
            if gap > 0:
                self._push(np.zeros(min(gap, self._span), dtype=np.float32))
        self._push(samples)
        self._last_sent = now

    def _push(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n >= self._span:
            self._ring[:] = samples[-self._span:]
        else:
            self._ring[:-n] = self._ring[n:]
            self._ring[-n:] = samples

    def rho(self, inbound: bytes, now: float) -> float:
        """How well the sent audio explains ``inbound`` (the latest inbound audio, 8 kHz, ending at
        ``now``): the best normalised band-limited correlation over the possible delays, 0..1."""
        if self._last_sent is None or now - self._last_sent > self.max_delay_s:
            return 0.0
        x = np.frombuffer(inbound, dtype="<i2").astype(np.float32)[-self.window:]
        # the reference up to `now`: the ring ends at the last frame sent, silence after it
        lag = round((now - self._last_sent) * SAMPLE_RATE)
        ref = np.concatenate([self._ring[lag:], np.zeros(min(lag, self._span), dtype=np.float32)]) if lag > 0 \
            else self._ring
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
        if rho[best] >= LEARN_RHO:  # unmistakable echo: it tells the echo path's delay
            self._clear_delays.append(int(delays[best]))
            del self._clear_delays[:-9]
            if len(self._clear_delays) >= 3:
                self.delay = int(np.median(self._clear_delays))
        anywhere = float(rho[best])
        if self.delay is not None:
            near = np.abs(delays - self.delay) <= self.delay_tolerance
            rho = np.where(near, rho, 0.0)
            best = int(rho.argmax())
            if rho[best] < anywhere and anywhere >= ANYWHERE_RHO:
                # a near-perfect match away from the learnt delay: the stamps jumped (a reactor stall
                # delivers frames late and in bursts), not the echo path; it is still echo
                return min(1.0, anywhere)
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
        if self.is_echo(inbound, now):
            return False
        x = np.frombuffer(inbound, dtype="<i2").astype(np.float64)[-self.window:]
        if not len(x):
            return False
        residual = float(np.mean(x * x)) * (1.0 - self.last_rho ** 2)
        caller = residual >= (32768.0 * 10 ** (floor_dbfs / 20)) ** 2
        self.too_quiet += not caller
        return caller
