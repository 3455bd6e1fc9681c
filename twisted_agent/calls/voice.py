"""The agent's voice on its way to the caller, until the caller has heard all of it.

The player is chosen once per call (DOWNSTREAM_MODE): stream, paced onto the media leg, or files
played through ARI, with Asterisk's talk detection kept deaf to the agent's echo (file-mode
barge-in, calls/talkdetect.py). A call whose streaming fails goes on with files, starting with the
audio that was never sent.

The provider produces a reply as utterances: one still open means more of the reply is coming. A
barge-in cuts the open ones off, and late audio of theirs is dropped. Once the provider is done
and the player has played everything, the caller's audio is still gated for GATE_GUARD_MS (the
echo of the agent's last words is still coming back); then the caller has heard it all
(``on_heard``), and the actions that waited for the agent to finish speaking (a hang-up, a
transfer) run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from twisted_agent.calls.comfort import is_comfort
from twisted_agent.calls.playback import FilePlayer, StreamPlayer
from twisted_agent.calls.talkdetect import TalkDetection
from twisted_agent.calls.timer import Timer


class AgentVoice:
    log = Logger()

    def __init__(self, engine: Any, call_id: str, *, on_idle: Callable[[], None],
                 on_audio_started: Callable[[str], None], on_heard: Callable[[], None]) -> None:
        self._engine = engine
        self._clock = engine.reactor
        self._config = engine.config
        self.call_id = call_id
        self._on_idle = on_idle
        self._on_audio_started = on_audio_started
        self._on_heard = on_heard
        #: file-mode barge-in: Asterisk's talk detection on the caller channel
        self.talk = TalkDetection(engine.ari, call_id)
        self.player: Any = None
        #: utterances the provider is still producing
        self.open: set[str] = set()
        #: utterances cut off by a barge-in: late audio of theirs is not played
        self.cut_off: set[str] = set()
        #: why streaming gave up and the call went on with file playback ("" = it did not)
        self.fallback = ""
        self._guard = Timer(self._clock)
        self._after: list[Callable[[], Any]] = []

    def start(self, session: Any) -> None:
        if self._config.media.downstream_mode == "stream":
            session.stall_seconds = self._config.calls.stream_stall_ms / 1000
            self.player = StreamPlayer(session, self._on_idle, self._on_audio_started)
        else:
            self.player = self._file_player()

    def _file_player(self) -> FilePlayer:
        engine, media = self._engine, self._config.media
        return FilePlayer(self._clock, engine.ari, self.call_id, self.call_id, media.media_dir, media.codec,
                          engine.register_playback, engine.unregister_playback, self._on_idle,
                          self._on_audio_started, engine.blocking)

    async def detect_talking(self) -> None:
        """File mode: Asterisk takes the caller out of the bridge while it plays a file to them, so
        their voice does not reach the media leg; its talk detection still hears them (barge-in).
        Without barge-in nobody, the local pipeline nor a cloud agent, hears them over a file."""
        if isinstance(self.player, FilePlayer) and self._config.calls.barge_in:
            await self.talk.enable()

    def play(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if isinstance(self.player, FilePlayer):
            self.talk.playing(pcm, rate)
        self.player.add(pcm, rate, utterance_id)

    def fall_back(self, reason: str) -> None:
        """Streaming failed: files for the rest of the call, from what was not sent yet."""
        self.fallback = reason
        self._engine.count("playback_fallbacks")
        self.log.warn("call {call_id}: streaming to the caller failed ({reason}); file playback for the rest of "
                      "the call", call_id=self.call_id, reason=reason)
        unsent = self.player.take_unsent()
        self.player = self._file_player()
        for utterance_id, pcm, rate in unsent:
            if not is_comfort(utterance_id) and utterance_id not in self.cut_off:
                self.play(pcm, rate, utterance_id)

    # --- the end of the agent's speech ----------------------------------------------------------

    @property
    def guarding(self) -> bool:
        """All was played less than GATE_GUARD_MS ago: its echo may still be coming back."""
        return self._guard.pending

    def played_out(self, speaking: bool) -> None:
        """The player ran dry: when the provider is done too, the guard time starts."""
        if not speaking or self.open or self.player is None or not self.player.idle or self._guard.pending:
            return
        self._guard.start(self._config.calls.gate_guard_ms / 1000, self._guard_over)

    def cancel_guard(self) -> None:
        self._guard.cancel()

    def _guard_over(self) -> None:
        self._on_heard()
        for action in self._after:
            action()
        self._after.clear()

    def after_speaking(self, action: Callable[[], Any], speaking: bool) -> None:
        """Run ``action`` once the caller has heard all the agent is saying (now, if it says nothing)."""
        if speaking or self.open:
            self._after.append(action)
        else:
            action()

    # --- a barge-in ----------------------------------------------------------------------------

    def cut_off_open(self) -> set[str]:
        """The caller interrupts: the utterances still being produced are cut off (returned)."""
        cut_off = set(self.open)
        self.cut_off |= cut_off
        self.open.clear()
        return cut_off

    def stop(self, cut_off: set[str]) -> Deferred[dict[str, int]]:
        """Stop all playing; fires with the ms the caller heard of each utterance it cut short."""
        player = self.player
        stopping = Deferred.fromCoroutine(player.stop()) if player is not None else succeed({})

        def heard(ms_by_utterance: dict[str, int]) -> dict[str, int]:
            for utterance_id in cut_off:  # e.g. its first sentence played out, the next not ready yet
                ms_by_utterance.setdefault(utterance_id, player.heard(utterance_id) if player is not None else 0)
            return {utterance_id: ms for utterance_id, ms in ms_by_utterance.items() if not is_comfort(utterance_id)}

        return stopping.addCallback(heard)

    def close(self) -> None:
        """The call ends: nothing more is waited for (the player is closed on its own, later)."""
        self._guard.cancel()
        self.talk.close()
