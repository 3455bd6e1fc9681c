"""How the agent's voice reaches the caller: files played through ARI, or streamed on the media leg.

File mode (the robust default): each chunk of synthesized audio (a sentence) is encoded for the
channel, written atomically to MEDIA_DIR under a unique name, and queued with
``POST /channels/{id}/play?media=sound:<path>`` at once, so the first sentence plays while later
ones are synthesized (Asterisk plays a channel's playbacks in order). ``PlaybackFinished`` deletes
the file; files a crash left behind are swept at start-up. Asterisk must be able to read MEDIA_DIR:
a remote Asterisk needs shared storage there, or stream mode.

Stream mode: the audio goes to the call's media session, which paces it onto the RTP/AudioSocket
leg; nothing touches the disk.
"""

from __future__ import annotations

import glob
import itertools
import os
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from twisted_agent.ari.errors import ARIError, ARINotFound
from twisted_agent.media.codecs import alaw_encode, resample, ulaw_encode

FILE_PREFIX = "ai-"
ENCODERS = {"ulaw": ulaw_encode, "alaw": alaw_encode}


def write_atomically(path: str, data: bytes) -> None:
    """Asterisk must never open a half-written file: write aside, then rename into place."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep(media_dir: str) -> list[str]:
    """Remove reply files a previous run left behind (a crash, a kill -9)."""
    removed = []
    for path in glob.glob(os.path.join(media_dir, FILE_PREFIX + "*")):
        remove_quietly(path)
        removed.append(path)
    return removed


class FilePlayer:
    log = Logger()

    def __init__(self, reactor: Any, ari: Any, call_id: str, channel_id: str, media_dir: str, codec: str,
                 register: Callable[[str, FilePlayer], None], unregister: Callable[[str], None],
                 on_idle: Callable[[], None], on_audio_started: Callable[[str], None],
                 blocking: Callable[..., Deferred[Any]]) -> None:
        self._reactor = reactor
        self._blocking = blocking
        self._ari = ari
        self.call_id = call_id
        self.channel_id = channel_id
        self._media_dir = media_dir
        self._codec = codec
        self._encode = ENCODERS[codec]
        self._register = register
        self._unregister = unregister
        self._on_idle = on_idle
        self._on_audio_started = on_audio_started
        self._chain: Deferred[Any] = succeed(None)
        self._pending = 0  # chunks not yet handed to Asterisk
        self._queued: dict[str, tuple[str, str, int]] = {}  # playback id -> (path, utterance, ms)
        self._started: dict[str, float] = {}
        self._files: set[str] = set()
        self._ids = itertools.count(1)
        self._dropped: set[str] = set()  # utterances not to play any more (their files are skipped)
        #: utterance -> its chunks being written or queued in Asterisk (what a stop() cuts off)
        self._unfinished: Counter[str] = Counter()
        self._token = secrets.token_hex(4)
        self.heard_ms: dict[str, int] = {}
        self.closed = False
        self.files_written = 0
        self.failed = 0
        #: paused (the caller may be interrupting): what is to play on resume, in order:
        #: (path, utterance, ms, offset ms already heard)
        self.paused = False
        self._held: list[tuple[str, str, int, int]] = []
        self._resume_wanted = False
        self._offsets: dict[str, int] = {}  # playback id -> ms of its file skipped (played before a pause)
        self.pauses = 0

    @property
    def idle(self) -> bool:
        return not self._pending and not self._queued and not self._held

    def add(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if self.closed or not pcm:
            return
        self._pending += 1
        self._unfinished[utterance_id] += 1
        self._chain.addCallback(lambda _: Deferred.fromCoroutine(self._write_and_play(pcm, rate, utterance_id)))
        self._chain.addErrback(lambda f: self.log.failure("call {call_id}: playback failed", f, call_id=self.call_id))

    async def _write_and_play(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        queued = False
        try:
            if self.closed or utterance_id in self._dropped:
                return
            n = next(self._ids)
            stem = os.path.join(self._media_dir, f"{FILE_PREFIX}{self.call_id}-{self._token}-{n}")
            path = f"{stem}.{self._codec}"
            data = await self._blocking(self._encode_chunk, pcm, rate)
            await self._blocking(write_atomically, path, data)
            self._files.add(path)
            self.files_written += 1
            if self.closed or utterance_id in self._dropped:
                self._delete(path)
                return
            queued = True
            if self.paused:
                self._held.append((path, utterance_id, len(data) // 8, 0))
                return
            await self._queue_file(path, utterance_id, len(data) // 8)
        finally:
            self._pending -= 1
            if not queued:
                self._chunk_done(utterance_id)
            self._check_idle()

    async def _queue_file(self, path: str, utterance_id: str, ms: int, offset_ms: int = 0) -> None:
        playback_id = f"{FILE_PREFIX}pb-{self.call_id}-{self._token}-{next(self._ids)}"
        self._queued[playback_id] = (path, utterance_id, ms - offset_ms)
        if offset_ms:
            self._offsets[playback_id] = offset_ms
        self._register(playback_id, self)
        try:
            await self._ari.play(self.channel_id, f"sound:{os.path.splitext(path)[0]}", playback_id=playback_id,
                                 offset_ms=offset_ms or None)
        except ARIError as e:
            self.failed += 1
            self._forget(playback_id)
            if not isinstance(e, ARINotFound):  # 404: the caller is gone; the call ends anyway
                self.log.warn("call {call_id}: could not play {path}: {error}", call_id=self.call_id,
                              path=path, error=str(e))

    def pause(self) -> Deferred[None]:
        """Stop what plays and what is queued, keeping the files to go on exactly where it stopped: the
        caller may be interrupting (Asterisk gives the agent their voice only while no file plays)."""
        self._resume_wanted = False
        if self.paused or self.closed:
            return succeed(None)
        self.paused = True
        self.pauses += 1
        now = self._reactor.seconds()
        stopping = []
        for playback_id, (path, utterance_id, ms) in list(self._queued.items()):  # in the order they play
            started = self._started.pop(playback_id, None)
            offset = min(ms, int((now - started) * 1000)) if started is not None else 0
            if offset:
                self.heard_ms[utterance_id] = self.heard_ms.get(utterance_id, 0) + offset
            del self._queued[playback_id]
            self._unregister(playback_id)  # its PlaybackFinished (state "done") is not the end of it
            earlier = self._offsets.pop(playback_id, 0)
            self._held.append((path, utterance_id, ms + earlier, offset + earlier))
            stopping.append(playback_id)
        return Deferred.fromCoroutine(self._stop_in_reverse(stopping))

    def resume(self) -> None:
        """The caller did not interrupt after all: play on from where it stopped."""
        if not self.paused or self.closed:
            return
        self._resume_wanted = True
        # through the chain: a chunk still being written joins the held ones, in order
        self._chain.addCallback(lambda _: Deferred.fromCoroutine(self._replay()))
        self._chain.addErrback(lambda f: self.log.failure("call {call_id}: resuming failed", f, call_id=self.call_id))

    async def _replay(self) -> None:
        if not self._resume_wanted or self.closed:
            return
        self._resume_wanted = False
        self.paused = False
        while self._held and not self.paused and not self.closed:
            path, utterance_id, ms, offset = self._held.pop(0)
            if offset >= ms - 20:  # it had (all but) played out
                self._delete(path)
                self._chunk_done(utterance_id)
                continue
            await self._queue_file(path, utterance_id, ms, offset)
        self._check_idle()

    async def _stop_in_reverse(self, playback_ids: list[str]) -> None:
        """Stop playbacks last first: stopping the one that plays makes Asterisk start the next at once."""
        for playback_id in reversed(playback_ids):
            try:
                await self._ari.stop_playback(playback_id)
            except ARIError:
                pass  # already finished or the channel is gone

    def _encode_chunk(self, pcm: bytes, rate: int) -> bytes:
        if rate != 8000:
            pcm = resample(pcm, rate, 8000)
        return self._encode(pcm)

    def playback_started(self, playback_id: str) -> None:
        if playback_id in self._queued and playback_id not in self._started:
            self._started[playback_id] = self._reactor.seconds()
            self._on_audio_started(self._queued[playback_id][1])

    def playback_finished(self, playback_id: str, state: str) -> None:
        entry = self._queued.get(playback_id)
        if entry is None:
            return
        _, utterance_id, ms = entry
        if state == "done":
            self.heard_ms[utterance_id] = self.heard_ms.get(utterance_id, 0) + ms
        else:
            self.failed += 1
            self.log.warn("call {call_id}: Asterisk could not play {path} ({state}); can it read MEDIA_DIR?",
                          call_id=self.call_id, path=entry[0], state=state)
        self._forget(playback_id)
        self._check_idle()

    def _forget(self, playback_id: str) -> None:
        entry = self._queued.pop(playback_id, None)
        self._started.pop(playback_id, None)
        self._offsets.pop(playback_id, None)
        self._unregister(playback_id)
        if entry is not None:
            self._delete(entry[0])
            self._chunk_done(entry[1])

    def _chunk_done(self, utterance_id: str) -> None:
        self._unfinished[utterance_id] -= 1
        if self._unfinished[utterance_id] <= 0:
            del self._unfinished[utterance_id]

    def _delete(self, path: str) -> None:
        self._files.discard(path)
        self._blocking(remove_quietly, path).addErrback(lambda f: self.log.failure("could not delete {path}", f,
                                                                                  path=path))

    def _check_idle(self) -> None:
        if self.idle and not self.closed:
            self._on_idle()

    async def reconcile(self) -> None:
        """After an ARI outage: playbacks that finished while no events arrived are finished now."""
        for playback_id in list(self._queued):
            try:
                await self._ari.get_playback(playback_id)
            except ARINotFound:
                self.playback_finished(playback_id, "done")
            except ARIError:
                pass  # still unreachable: the next reconnect tries again

    async def stop(self) -> dict[str, int]:
        """Stop everything queued or playing; for each utterance cut off, the ms the caller heard of it
        (utterances already played out are not reported: they were not interrupted)."""
        heard = {utterance_id: self.heard_ms.get(utterance_id, 0) for utterance_id in self._unfinished}
        now = self._reactor.seconds()
        for playback_id in list(self._queued):
            _, utterance_id, ms = self._queued[playback_id]
            started = self._started.get(playback_id)
            if started is not None:
                heard[utterance_id] = heard.get(utterance_id, 0) + min(ms, int((now - started) * 1000))
        held, self._held = self._held, []
        self.paused = self._resume_wanted = False
        for path, utterance_id, _, _ in held:  # paused: no playback to stop, only files to delete
            self._delete(path)
            self._chunk_done(utterance_id)
        playing = list(self._queued)
        await self._stop_in_reverse(playing)
        for playback_id in playing:
            self._forget(playback_id)
        return heard

    def heard(self, utterance_id: str) -> int:
        """The ms of an utterance played to the end so far."""
        return self.heard_ms.get(utterance_id, 0)

    def drop(self, utterance_id: str) -> Deferred[None]:
        """Stop one utterance (queued, playing, or still being written); the others play on."""
        self._dropped.add(utterance_id)
        held, self._held = self._held, []
        for entry in held:  # paused: its held files go too
            if entry[1] == utterance_id:
                self._delete(entry[0])
                self._chunk_done(utterance_id)
            else:
                self._held.append(entry)
        return Deferred.fromCoroutine(self._drop([playback_id for playback_id, entry in self._queued.items()
                                                  if entry[1] == utterance_id]))

    async def _drop(self, playback_ids: list[str]) -> None:
        await self._stop_in_reverse(playback_ids)
        for playback_id in playback_ids:
            self._forget(playback_id)
        self._check_idle()

    async def close(self) -> None:
        """Stop playing and delete every file this call wrote."""
        if self.closed:
            return
        await self.stop()
        self.closed = True
        for path in list(self._files):
            self._delete(path)


class StreamPlayer:
    """Replies through the media session's paced sender."""

    def __init__(self, session: Any, on_idle: Callable[[], None], on_audio_started: Callable[[str], None]) -> None:
        self._session = session
        self._on_idle = on_idle
        self._on_audio_started = on_audio_started
        self._in_flight: set[str] = set()
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self._in_flight

    def add(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if self.closed or not pcm:
            return
        self._in_flight.add(utterance_id)
        self._session.play(pcm, rate, utterance_id)
        self._on_audio_started(utterance_id)

    def utterance_sent(self, utterance_id: str, ms: int) -> None:
        self._in_flight.discard(utterance_id)
        if self.idle:
            self._on_idle()

    async def stop(self) -> dict[str, int]:
        """Flush the sender; for each utterance cut off, the ms that went on the wire."""
        heard = {utterance_id: self._session.outbound.sent_ms(utterance_id) for utterance_id in self._in_flight}
        heard.update(self._session.flush())
        self._in_flight.clear()
        return heard

    def heard(self, utterance_id: str) -> int:
        """The ms of an utterance on the wire so far."""
        return self._session.outbound.sent_ms(utterance_id)

    def drop(self, utterance_id: str) -> Deferred[None]:
        """Stop one utterance at once: its frames still queued never go on the wire."""
        self._session.outbound.drop(utterance_id)
        if utterance_id in self._in_flight:
            self._in_flight.discard(utterance_id)
            if self.idle:
                self._on_idle()
        return succeed(None)

    def take_unsent(self) -> list[tuple[str, bytes, int]]:
        """Streaming gave up: what was not sent yet, (utterance, PCM, rate), for another player; this
        one is closed."""
        taken = [(utterance_id, pcm, self._session.leg_rate) for utterance_id, pcm in self._session.outbound.take()]
        self._in_flight.clear()
        self.closed = True
        return taken

    async def close(self) -> None:
        if not self.closed:
            await self.stop()
            self.closed = True

