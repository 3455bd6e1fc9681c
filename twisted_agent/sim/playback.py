"""File playback on a channel, the way res_stasis_playback.c (22.x) runs it.

A ``POST /channels/{id}/play`` queues one command on the channel's control queue, so playbacks on
one channel play one after another. For each media URI in turn: ``PlaybackStarted`` (state
``playing``, ``next_media_uri`` while more follow), then ``PlaybackContinuing`` between items and
``PlaybackFinished`` (``done``, or ``failed`` when the last item could not be played) at the end.
A ``DELETE`` of a playing playback stops it at once (``done``); of a queued one cancels it, and it
finishes ``done`` when its turn comes. A hang-up mid-file finishes it ``failed``.

While a file plays to a channel that is in a bridge, Asterisk suspends the channel from the bridge
(bridge_channel.c, ``BRIDGE_CHANNEL_ACTION_PLAY_FILE``): the caller hears only the file, and what
the caller says does not reach the ExternalMedia leg until the file ends.

``offsetms`` starts the first media item that far in (ast_seekstream). ``sound:/abs/path`` reads
``/abs/path.<ext>``, preferring the channel's own format as Asterisk does (``.ulaw`` first on a
μ-law channel), then A-law, then 8 kHz signed linear (``.sln``, ``.raw``) and WAV. A missing file
fails at once ("File does not exist"). Other URI schemes are skipped with "scheme is unsupported"
and, as in Asterisk, publish no final update of their own.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twisted_agent.media.codecs import alaw_decode, resample, ulaw_decode
from twisted_agent.media.interfaces import FRAME_BYTES, FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE
from twisted_agent.sim.control import Timers
from twisted_agent.sim.model import Channel, Playback

__all__ = ["PlaybackEngine", "find_sound", "load_sound"]

_ULAW_EXTS = (".ulaw", ".ul", ".mu", ".pcm")
_ALAW_EXTS = (".alaw", ".al")
_SLIN_EXTS = (".sln", ".raw")
_SLIN16_EXTS = (".sln16",)
_WAV_EXTS = (".wav", ".wav16")


def _preference(channel_format: str) -> tuple[str, ...]:
    if channel_format == "alaw":
        return _ALAW_EXTS + _ULAW_EXTS + _SLIN_EXTS + _WAV_EXTS + _SLIN16_EXTS
    if channel_format == "ulaw":
        return _ULAW_EXTS + _ALAW_EXTS + _SLIN_EXTS + _WAV_EXTS + _SLIN16_EXTS
    return _SLIN_EXTS + _WAV_EXTS + _SLIN16_EXTS + _ULAW_EXTS + _ALAW_EXTS


def find_sound(name: str, channel_format: str, language: str, media_root: str | None) -> str | None:
    """The file Asterisk would open for ``sound:<name>``, or None ("File does not exist")."""
    if os.path.isabs(name):
        bases = [name]
    elif media_root is not None:
        bases = [os.path.join(media_root, language, name), os.path.join(media_root, name)]
    else:
        bases = []
    for base in bases:
        for ext in _preference(channel_format):
            if os.path.isfile(base + ext):
                return base + ext
    return None


def load_sound(path: str) -> bytes:
    """The file as 8 kHz s16le (blocking: run it in a thread)."""
    ext = os.path.splitext(path)[1]
    if ext in _WAV_EXTS:
        with wave.open(path, "rb") as source:
            if source.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit WAV is supported")
            rate, channels = source.getframerate(), source.getnchannels()
            pcm = source.readframes(source.getnframes())
        if channels != 1:
            raise ValueError(f"{path}: only mono WAV is supported")
        return resample(pcm, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else pcm
    with open(path, "rb") as source:
        data = source.read()
    if ext in _ULAW_EXTS:
        return ulaw_decode(data)
    if ext in _ALAW_EXTS:
        return alaw_decode(data)
    data = data[: len(data) // 2 * 2]
    if ext in _SLIN16_EXTS:
        return resample(data, 16000, SAMPLE_RATE)
    return data


class PlaybackEngine:
    """Every playback of one simulator; ``deliver`` hands each 20 ms frame to the target channel."""

    log = Logger()

    def __init__(self, reactor: IReactorThreads, timers: Timers, media_root: str | None,
                 emit: Callable[..., None], deliver: Callable[[Channel, int, bytes, str], None],
                 suspend: Callable[[Channel, bool], None]) -> None:
        self._reactor = reactor
        self._timers = timers
        self._media_root = media_root
        self._emit = emit
        self._deliver = deliver
        self._suspend = suspend
        self.playbacks: dict[str, Playback] = {}
        self._streaming: dict[str, tuple[LoopingCall, Deferred[str]]] = {}

    def get(self, playback_id: str) -> Playback | None:
        return self.playbacks.get(playback_id)

    def register(self, playback: Playback) -> None:
        self.playbacks[playback.id] = playback

    def stop(self, playback: Playback) -> None:
        """DELETE /playbacks/{id}: cancel if queued, stop at once if playing."""
        if playback.state == "queued":
            playback.cancelled = True
            return
        playback.stopped = True
        self._end_stream(playback, "stopped")

    def hung_up(self, channel: Channel) -> None:
        """The channel is hanging up: what is playing on it stops (and finishes ``failed``)."""
        for playback in list(self.playbacks.values()):
            if playback.target is channel and playback.state == "playing":
                self._end_stream(playback, "hangup")

    def run(self, playback: Playback) -> Deferred[None]:
        """The control-queue command: play every media item, publishing the state changes."""
        return Deferred.fromCoroutine(self._run(playback))

    def _publish(self, playback: Playback) -> None:
        event_type = {"playing": "PlaybackStarted", "continuing": "PlaybackContinuing"}.get(
            playback.state, "PlaybackFinished")
        self._emit(playback.target, event_type, playback=playback.to_json())

    async def _run(self, playback: Playback) -> None:
        channel = playback.target
        suspended = False
        try:
            for index in range(len(playback.media)):
                playback.index = index
                if playback.cancelled:
                    self.log.info("{channel}: Playback canceled for {media}", channel=channel.id,
                                  media=playback.media_uri)
                    playback.state = "done"
                    self._publish(playback)
                    return
                playback.state = "playing"
                self._publish(playback)
                if channel.bridge is not None and not suspended:
                    suspended = True
                    self._suspend(channel, True)
                uri = playback.media_uri
                if not uri.startswith("sound:"):
                    self.log.error("Attempted to play URI '{uri}' on channel '{name}' but scheme is unsupported",
                                   uri=uri, name=channel.name)
                    continue
                result = await self._play_sound(playback, uri[len("sound:"):])
                hangup = channel.hanging_up
                last = index == len(playback.media) - 1
                if result == "ok":
                    playback.state = "done" if last or hangup else "continuing"
                elif playback.stopped:
                    playback.state = "done"
                else:
                    playback.state = "failed" if last or hangup else "continuing"
                self._publish(playback)
                if hangup or playback.stopped:
                    return
        finally:
            if suspended:
                self._suspend(channel, False)
            self.playbacks.pop(playback.id, None)

    async def _play_sound(self, playback: Playback, name: str) -> str:
        channel = playback.target
        path = find_sound(name, channel.format, playback.language, self._media_root)
        if path is None:
            self.log.warn("File {name} does not exist in any format", name=name)
            return "failed"
        try:
            pcm = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), load_sound, path)
        except (OSError, ValueError, EOFError, wave.Error) as error:
            self.log.warn("cannot play {path}: {error}", path=path, error=error)
            return "failed"
        if channel.hanging_up or playback.stopped:
            return "hangup" if channel.hanging_up else "stopped"
        if playback.index == 0 and playback.offset_ms:
            pcm = pcm[playback.offset_ms * SAMPLE_RATE // 1000 * 2:]  # offsetms: the first item starts there
        return await self._stream(playback, pcm)

    def _stream(self, playback: Playback, pcm: bytes) -> Deferred[str]:
        channel = playback.target
        label = f"playback:{playback.id}"
        start = channel.caller.playback_position() if channel.caller is not None else 0
        frames = (len(pcm) + FRAME_BYTES - 1) // FRAME_BYTES
        sent = 0
        finished: Deferred[str] = Deferred()

        def tick(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                if sent >= frames:
                    self._end_stream(playback, "ok")
                    return
                frame = pcm[sent * FRAME_BYTES:(sent + 1) * FRAME_BYTES]
                self._deliver(channel, start + sent * FRAME_SAMPLES, frame, label)
                sent += 1

        self._streaming[playback.id] = (self._timers.loop(FRAME_SECONDS, tick), finished)
        tick(1)
        return finished

    def _end_stream(self, playback: Playback, result: str) -> None:
        streaming = self._streaming.pop(playback.id, None)
        if streaming is None:
            return
        looping, finished = streaming
        self._timers.stop_loop(looping)
        finished.callback(result)

    def close(self) -> None:
        for playback_id in list(self._streaming):
            playback = self.playbacks.get(playback_id)
            if playback is not None:
                self._end_stream(playback, "hangup")
