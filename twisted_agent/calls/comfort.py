"""What the caller hears instead of dead air: the filler, the comfort tone, the ringback.

All three are plain 8 kHz PCM made once per engine: the filler phrase is a recording (so it plays
whatever the provider, even while its TTS is busy with the reply it stands in for), the tones are
generated. A call plays them through its player like any agent audio, under utterance ids of their
own (:func:`is_comfort`), and drops them the moment real audio is ready.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from twisted_agent.media.codecs import resample, ulaw_decode
from twisted_agent.media.wav import parse_wav

RATE = 8000
COMFORT_PREFIX = "comfort-"


def is_comfort(utterance_id: str) -> bool:
    return utterance_id.startswith(COMFORT_PREFIX)


def _tone(frequencies: tuple[float, ...], on_ms: int, off_ms: int, cycles: int, dbfs: float) -> bytes:
    """``cycles`` of ``on_ms`` of the summed sines then ``off_ms`` of silence, 10 ms ramps (no clicks)."""
    on = RATE * on_ms // 1000
    t = np.arange(on) / RATE
    wave = sum(np.sin(2 * np.pi * f * t) for f in frequencies) / len(frequencies)
    ramp = min(on // 2, RATE // 100)
    envelope = np.ones(on)
    envelope[:ramp] = np.linspace(0, 1, ramp)
    envelope[on - ramp:] = np.linspace(1, 0, ramp)
    burst = (wave * envelope * 32767 * 10 ** (dbfs / 20)).astype("<i2").tobytes()
    return (burst + bytes(RATE * off_ms // 1000 * 2)) * cycles


def comfort_tone() -> bytes:
    """Two soft 440 Hz pips a second apart, -24 dBFS: "still working", not a ring or a busy signal."""
    return _tone((440.0,), 150, 850, 2, -24.0)


def ringback_tone(seconds: float = 30.0) -> bytes:
    """North American ringback (ITU-T E.180: 440 + 480 Hz, 2 s on, 4 s off), -16 dBFS."""
    return _tone((440.0, 480.0), 2000, 4000, max(1, int(seconds // 6) + 1), -16.0)


def filler_phrase() -> bytes:
    """The recorded "One moment, please." (Piper en_US joe, 8 kHz μ-law, in the package)."""
    return ulaw_decode(resources.files("twisted_agent").joinpath("sounds/one-moment.ulaw").read_bytes())


def load_filler(choice: str) -> bytes:
    """The filler FILLER names, as 8 kHz PCM (empty for none). A path was checked at config load."""
    if choice == "none":
        return b""
    if choice == "tone":
        return comfort_tone()
    if choice == "phrase":
        return filler_phrase()
    with open(choice, "rb") as stream:
        pcm, rate = parse_wav(stream.read())
    return resample(pcm, rate, RATE) if rate != RATE else pcm
