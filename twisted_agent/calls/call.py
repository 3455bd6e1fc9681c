"""One phone call: an explicit state machine that owns every resource the call holds.

Connecting → Listening → Thinking → Speaking → Ended (automat). Whatever ends the call — the caller
hanging up, the provider failing, an agent hang-up or transfer, the engine shutting down — goes
through :meth:`Call.finish`, which releases everything exactly once: the provider, the reply files,
the media session, the ExternalMedia channel and the bridge (Asterisk keeps both alive otherwise),
and then the caller (hung up, sent back to the dialplan, or left alone if already gone).
"""

from __future__ import annotations

import uuid
from typing import Any

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.ari.errors import ARIError, ARINotFound, ARIUnprocessable
from twisted_agent.calls.bargein import BargeInDetector
from twisted_agent.calls.comfort import COMFORT_PREFIX, is_comfort
from twisted_agent.calls.keys import KeyPresses
from twisted_agent.calls.playback import FilePlayer, StreamPlayer
from twisted_agent.calls.registry import ICallHandle
from twisted_agent.calls.talkdetect import SILENCE_MS as TALK_SILENCE_MS
from twisted_agent.calls.talkdetect import TalkDetection
from twisted_agent.calls.turns import TurnTaker
from twisted_agent.calls.watchdog import InactivityWatchdog
from twisted_agent.media.interfaces import IMediaConsumer
from twisted_agent.media.rtp_endpoint import PeerNotAllowed
from twisted_agent.providers.base import ICallInfo, IProviderEvents, ProviderError, ToolResult

PRIME_SILENCE = bytes(320)  # one 20 ms frame ends Asterisk's wait for a first media frame after Answer()


class SetupFailed(Exception):
    """The call could not be brought up; the text says which step."""


@implementer(ICallHandle, ICallInfo, IMediaConsumer, IProviderEvents)
class Call:
    log = Logger()
    _machine = MethodicalMachine()

    def __init__(self, engine: Any, channel: Any) -> None:
        self.engine = engine
        self.config = engine.config
        self.reactor = engine.reactor
        self.call_id: str = channel.id
        self.caller_number: str = channel.caller.number
        self.caller_name: str = channel.caller.name
        self.channel = channel
        self.events = self
        self.state = "connecting"
        self.provider_name = self.config.calls.default_provider
        self.context_name = self.config.calls.default_context
        #: where the provider and context came from: "default", "channel variable" or "context"
        self.provider_source = self.context_source = "default"
        self.context = self.config.contexts[self.context_name]
        self.bridge_id = f"ai-bridge-{self.call_id}"
        self.media_channel_id = f"ai-media-{self.call_id}"
        self.session_uuid = uuid.uuid4()
        self.session: Any = None
        self.provider: Any = None
        self.player: Any = None
        self.media_started: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self.end_reason = ""
        #: how the call ended (one of calls.record.OUTCOMES; set by finish() unless set before)
        self.outcome = ""
        #: Asterisk's hang-up cause text, when the caller's side ended the call
        self.hangup_cause = ""
        self.conversation: list[tuple[str, str]] = []  # (speaker, text), turn by turn
        self.turn_timings: list[dict[str, float]] = []
        self.started_at = self.reactor.seconds()
        self._created_bridge = False
        self._requested_media = False
        self._pending_actions: list[Any] = []
        self._audio_frames = 0
        self._open_utterances: set[str] = set()
        self._turn: Deferred[Any] | None = None
        self._setup: Deferred[Any] | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self._failing = False
        self._finishing: Deferred[str] | None = None
        self._awaiting_reply_audio = False
        self._turn_marks: dict[str, float] = {}
        self.turns = TurnTaker(self.reactor, self.config.calls.turn_end_ms / 1000, self._turn_over)
        self.barge = BargeInDetector(self.config.calls.barge_in_min_ms)
        self._duck_gain = 10 ** (-self.config.calls.barge_in_duck_db / 20)
        #: utterances cut off by a barge-in: late audio of theirs is not played
        self._interrupted: set[str] = set()
        #: reactor times of barge-ins (the agent's audio was stopped then)
        self.barge_ins: list[float] = []
        #: the filler or ringback playing now (an utterance id of its own), and until when its
        #: echo tail still gates the caller's audio
        self._comfort_id: str | None = None
        self._comfort_count = 0
        self._comfort_until = 0.0
        #: reactor times the filler started playing, one per slow turn
        self.fillers: list[float] = []
        self.watchdog = InactivityWatchdog(
            self.reactor, self.config.calls.inactivity_prompt_seconds, self.config.calls.inactivity_hangup_seconds,
            self._ask_still_there, self._say_goodbye,
            lambda: self.session is not None and bool(self.session.detector.in_speech))
        #: file-mode barge-in: Asterisk's talk detection on the caller channel
        self.talk = TalkDetection(engine.ari, self.call_id)
        #: the reply was paused for the caller's talk (at this count of inbound frames); None: not paused
        self._talk_paused_at: int | None = None
        #: why streaming gave up and the call went on with file playback ("" = it did not)
        self.stream_fallback = ""
        #: the next caller transcript continues the previous one (its answer was dropped unheard)
        self._merge_transcript = False
        self._keys = KeyPresses(self.reactor)

    # --- the state machine --------------------------------------------------------------------

    @_machine.state(initial=True)
    def connecting(self) -> None:
        "Answering, bridging and bringing up the media."

    @_machine.state()
    def listening(self) -> None:
        "The caller has the floor."

    @_machine.state()
    def thinking(self) -> None:
        "The caller's turn ended; the provider is working on the answer."

    @_machine.state()
    def speaking(self) -> None:
        "The agent's audio is going to the caller (caller audio is gated)."

    @_machine.state()
    def done(self) -> None:
        "Everything is released."

    @_machine.input()
    def set_up(self) -> None:
        "The media is bridged."

    @_machine.input()
    def turn_over(self) -> None:
        "The caller's turn ended."

    @_machine.input()
    def audio_out(self) -> None:
        "Agent audio is going out."

    @_machine.input()
    def reply_done(self) -> None:
        "The caller has heard all the agent had to say."

    @_machine.input()
    def caller_took_floor(self) -> None:
        "The caller spoke over the agent (barge-in), or went on speaking before the reply began."

    @_machine.input()
    def end(self) -> None:
        "The call is over."

    @_machine.output()
    def _now_listening(self) -> None:
        self.state = "listening"
        self.engine.call_changed(self)
        self.turns.reset()
        self._cancel_timer("filler")
        if self._finishing is None:
            self.watchdog.waiting()

    @_machine.output()
    def _now_thinking(self) -> None:
        self.state = "thinking"
        self.engine.call_changed(self)
        self.watchdog.busy()
        self._start_turn()

    @_machine.output()
    def _now_speaking(self) -> None:
        self.state = "speaking"
        self.engine.call_changed(self)
        self.turns.reset()
        self._cancel_timer("reply")
        self._cancel_timer("filler")
        self.watchdog.busy()

    @_machine.output()
    def _now_done(self) -> None:
        self.state = "ended"

    connecting.upon(set_up, enter=listening, outputs=[_now_listening])
    connecting.upon(end, enter=done, outputs=[_now_done])
    connecting.upon(audio_out, enter=connecting, outputs=[])
    connecting.upon(reply_done, enter=connecting, outputs=[])
    connecting.upon(turn_over, enter=connecting, outputs=[])
    listening.upon(turn_over, enter=thinking, outputs=[_now_thinking])
    listening.upon(audio_out, enter=speaking, outputs=[_now_speaking])
    listening.upon(reply_done, enter=listening, outputs=[])
    listening.upon(end, enter=done, outputs=[_now_done])
    thinking.upon(audio_out, enter=speaking, outputs=[_now_speaking])
    thinking.upon(reply_done, enter=listening, outputs=[_now_listening])
    thinking.upon(turn_over, enter=thinking, outputs=[])
    thinking.upon(end, enter=done, outputs=[_now_done])
    speaking.upon(audio_out, enter=speaking, outputs=[])
    speaking.upon(reply_done, enter=listening, outputs=[_now_listening])
    speaking.upon(turn_over, enter=speaking, outputs=[])
    speaking.upon(end, enter=done, outputs=[_now_done])
    speaking.upon(caller_took_floor, enter=listening, outputs=[_now_listening])
    thinking.upon(caller_took_floor, enter=listening, outputs=[_now_listening])
    connecting.upon(caller_took_floor, enter=connecting, outputs=[])
    listening.upon(caller_took_floor, enter=listening, outputs=[])
    for _input in (set_up, turn_over, audio_out, reply_done, end, caller_took_floor):
        done.upon(_input, enter=done, outputs=[])
    del _input

    # --- bringing the call up -----------------------------------------------------------------

    def start(self) -> Deferred[Any]:
        self._setup = Deferred.fromCoroutine(self._bring_up())
        self._setup.addErrback(self._setup_failed)
        return self._setup

    async def _bring_up(self) -> None:
        engine, ari, config = self.engine, self.engine.ari, self.config
        await self._choose_provider_and_context()
        try:
            self.provider = engine.providers.create(self.provider_name)
        except ProviderError as e:
            # Not answered yet: the caller goes straight back to the dialplan, hearing nothing odd.
            self.log.warn("call {call_id}: provider {provider} unavailable ({error}); back to the dialplan",
                          call_id=self.call_id, provider=self.provider_name, error=str(e))
            engine.count("provider_unavailable")
            self.finish("provider unavailable", caller="continue")
            return
        await ari.answer(self.call_id)
        await ari.create_bridge(self.bridge_id, "mixing", name=f"ai-agent {self.call_id}")
        self._created_bridge = True
        self.session = engine.media.create_session(self.call_id, session_uuid=self.session_uuid)
        self.session.set_consumer(self)
        engine.expect_media_channel(self.media_channel_id, self)
        media = config.media
        self._requested_media = True  # from here on, teardown deletes the media channel (404 if never made)
        if media.transport == "externalmedia":
            host = f"{media.advertise_host}:{engine.media_port()}"
            response = await ari.external_media(app=config.ari.app, channel_id=self.media_channel_id,
                                                external_host=host, format=media.codec)
            variables = response.get("channelvars") or {}
            try:
                peer = variables["UNICASTRTP_LOCAL_ADDRESS"], int(variables["UNICASTRTP_LOCAL_PORT"])
            except (KeyError, ValueError):
                raise SetupFailed(f"the externalMedia answer has no usable UNICASTRTP_LOCAL_ADDRESS/PORT: "
                                  f"{variables!r}") from None
            try:
                self.session.bind_peer(*peer)
            except (ValueError, PeerNotAllowed) as e:
                raise SetupFailed(str(e)) from None
        else:
            host = f"{media.advertise_host}:{engine.media_port()}"
            await ari.external_media(app=config.ari.app, channel_id=self.media_channel_id, external_host=host,
                                     format=media.audiosocket_format, encapsulation="audiosocket",
                                     transport="tcp", data=str(self.session_uuid))
        # Adding the media channel before its own StasisStart gives 422 (PROTOCOLS.md §6).
        self.media_started.addTimeout(config.calls.setup_timeout, self.reactor)
        try:
            await self.media_started
        except TimeoutError:
            raise SetupFailed(f"Asterisk did not start the media channel within {config.calls.setup_timeout:g}s") \
                from None
        for attempt in range(5):
            try:
                # the caller's keys come as ChannelDtmfReceived; kept out of the bridge, they do not
                # reach the media leg as well (RFC 4733 packets, or AudioSocket DTMF frames: twice)
                await ari.add_channel(self.bridge_id, [self.call_id, self.media_channel_id], absorb_dtmf=True)
                break
            except ARIUnprocessable:
                # "not in Stasis": only possible when its start was inferred after an ARI outage
                if attempt == 4:
                    raise
                await deferLater(self.reactor, 0.05, lambda: None)
        self.session.play(PRIME_SILENCE, 8000, "prime")
        if self.config.calls.no_audio_seconds:
            self._timers["no_audio"] = self.reactor.callLater(self.config.calls.no_audio_seconds, self._no_audio)
        self.player = self._make_player()
        if isinstance(self.player, FilePlayer):
            await self._detect_talking()
        self.set_up()
        if config.calls.ringback and self.context.greeting and self.engine.ringback_pcm:
            self._start_comfort(self.engine.ringback_pcm, "ringback")
        start = self.provider.start(self)
        start.addTimeout(config.calls.provider_timeout, self.reactor)
        try:
            await start
        except TimeoutError:
            raise ProviderError(f"provider {self.provider_name} did not start within "
                                f"{config.calls.provider_timeout:g}s") from None
        self.log.info("call {call_id} from {caller} up: provider {provider}, context {context}, {transport}",
                      call_id=self.call_id, caller=self.caller_number, provider=self.provider_name,
                      context=self.context_name, transport=self.config.media.transport)

    async def _choose_provider_and_context(self) -> None:
        variables = dict(self.channel.channelvars or {})
        wanted = [name for name in ("AI_PROVIDER", "AI_CONTEXT") if name not in variables]
        if wanted:
            results = await DeferredList([self.engine.ari.get_variable(self.call_id, name) for name in wanted],
                                         consumeErrors=True)
            for name, (ok, value) in zip(wanted, results, strict=True):
                if ok and value:
                    variables[name] = value
        provider = (variables.get("AI_PROVIDER") or "").strip()
        if provider:
            if provider in self.engine.providers.factories:
                self.provider_name = provider
                self.provider_source = "channel variable"
            else:
                self.log.warn("call {call_id}: AI_PROVIDER={value!r} is not a provider; using {default}",
                              call_id=self.call_id, value=provider, default=self.provider_name)
        context = (variables.get("AI_CONTEXT") or "").strip()
        if context:
            if context in self.config.contexts:
                self.context_name = context
                self.context_source = "channel variable"
            else:
                self.log.warn("call {call_id}: AI_CONTEXT={value!r} is not a context; using {default}",
                              call_id=self.call_id, value=context, default=self.context_name)
        self.context = self.config.contexts[self.context_name]
        if self.provider_source == "default" and self.context.provider:
            self.provider_name = self.context.provider
            self.provider_source = "context"
        self.engine.call_changed(self)

    def _make_player(self) -> Any:
        if self.config.media.downstream_mode == "stream":
            self.session.stall_seconds = self.config.calls.stream_stall_ms / 1000
            return StreamPlayer(self.session, self._player_idle, self._audio_started)
        return self._file_player()

    def _file_player(self) -> FilePlayer:
        return FilePlayer(self.reactor, self.engine.ari, self.call_id, self.call_id, self.config.media.media_dir,
                          self.config.media.codec, self.engine.register_playback, self.engine.unregister_playback,
                          self._player_idle, self._audio_started, self.engine.blocking)

    async def _detect_talking(self) -> None:
        """File mode: Asterisk takes the caller out of the bridge while it plays a file to them, so
        their voice does not reach the media leg; its talk detection still hears them (barge-in)."""
        if self.config.calls.barge_in and self.provider.wants_turn_taking:
            await self.talk.enable()

    def _setup_failed(self, failure: Any) -> None:
        if failure.check(CancelledError) or self._finishing is not None:
            return None
        if failure.check(ARINotFound):
            self.outcome = "setup_failed"
            self.finish("caller left during set-up", caller=None)
        elif failure.check(ProviderError, SetupFailed):
            self.fail(failure.getErrorMessage())
        else:
            self.log.failure("call {call_id}: set-up failed", failure, call_id=self.call_id)
            self.fail(f"set-up failed: {failure.getErrorMessage()}")
        return None

    @property
    def waiting_for_media(self) -> bool:
        return self._requested_media and not self.media_started.called

    def media_channel_started(self) -> None:
        if not self.media_started.called:
            self.media_started.callback(None)

    # --- the caller's audio (IMediaConsumer) ----------------------------------------------------

    @property
    def gated(self) -> bool:
        """The agent has the floor: caller audio is not a new turn (the agent never hears itself)."""
        return self.state in ("speaking", "connecting") or "guard" in self._timers or self.comfort_playing

    @property
    def comfort_playing(self) -> bool:
        """The filler or the ringback is playing (or its echo tail is still coming back)."""
        return self._comfort_id is not None or self.reactor.seconds() < self._comfort_until

    @property
    def agent_has_floor(self) -> bool:
        """The agent is speaking, or finished less than GATE_GUARD_MS ago, or a filler stands in for
        its reply: caller speech may barge in."""
        return (self.state == "speaking" or (self.state == "listening" and "guard" in self._timers)
                or (self.state == "thinking" and self.comfort_playing))

    def audio_received(self, frame: bytes) -> None:
        self._audio_frames += 1
        provider = self.provider
        if provider is None or self._failing:
            return
        if self.talk.on and self.state == "listening" and not self.gated and not self.session.detector.in_speech:
            self.talk.heard_line(frame)
        if not provider.wants_turn_taking or not self.gated:
            provider.push_audio(frame)
        elif self.agent_has_floor and self.config.calls.barge_in:
            self._barge_frame(frame)

    def _barge_frame(self, frame: bytes) -> None:
        """A caller frame while the agent has the floor: the caller's voice, or its echo, or nothing?"""
        now = self.reactor.seconds()
        session = self.session
        last_voiced = session.detector.last_voiced_at
        # the VAD judged this frame just before us: voiced if its last voiced frame is this one
        voice = last_voiced is not None and now - last_voiced < 0.015
        if voice and not session.echo.is_caller(self.barge.recent(1) + frame, now):
            voice = False  # the agent's own voice coming back on the line, or line noise
        if self.barge.frame(frame, now, voice):
            self._backchannel()
        if self.barge.due():
            self._barge_in()
        else:
            self._duck(self.barge.armed)

    def _duck(self, duck: bool) -> None:
        """Stream mode: the caller may be interrupting: the agent's voice drops at once (and comes
        back if it was only a backchannel)."""
        session = self.session
        if session is None:
            return
        gain = self._duck_gain if duck and isinstance(self.player, StreamPlayer) else 1.0
        if session.gain != gain:
            session.gain = gain
            if duck:
                self.engine.count("ducks")

    def _backchannel(self) -> None:
        """The caller's voice over the agent stopped too soon to interrupt: the agent goes on (from
        where it paused, in file mode)."""
        self._duck(False)
        if not self._resume_after_talk():
            self.engine.count("backchannels")

    def speech_started(self) -> None:
        provider = self.provider
        if provider is None or self._failing:
            return
        if not self.gated:
            self._caller_active()  # while the agent speaks, only a confirmed barge-in counts (echo)
        if not provider.wants_turn_taking:
            provider.speech_started()
        elif self.state == "listening" and not self.gated:
            provider.speech_started()
            self.turns.speech_started()
        elif self.state == "thinking" and not self.comfort_playing:
            self._caller_went_on()

    def speech_ended(self) -> None:
        provider = self.provider
        if provider is None or self._failing:
            return
        if self.barge.expire(self.reactor.seconds()):  # no frame came to end it (a silent Local channel)
            self._backchannel()
        if not provider.wants_turn_taking:
            provider.speech_ended()
        elif self.state == "listening" and not self.gated:
            self.turns.speech_ended(getattr(self.session.detector, "last_voiced_at", None))
            if self.turns.waiting:  # a turn end is pending: the provider may start on the answer
                provider.speech_ended()

    def utterance_sent(self, utterance_id: str, ms: int) -> None:
        if isinstance(self.player, StreamPlayer):
            self.player.utterance_sent(utterance_id, ms)

    def stream_failed(self, reason: str) -> None:
        """The media leg stopped taking the agent's audio: file playback for the rest of the call."""
        old = self.player
        if not isinstance(old, StreamPlayer) or self._finishing is not None:
            return
        self.stream_fallback = reason
        self.engine.count("playback_fallbacks")
        self.log.warn("call {call_id}: streaming to the caller failed ({reason}); file playback for the rest of "
                      "the call", call_id=self.call_id, reason=reason)
        unsent = old.take_unsent()
        self.player = self._file_player()
        self._comfort_id = None  # a filler is not worth a file
        for utterance_id, pcm, rate in unsent:
            if not is_comfort(utterance_id) and utterance_id not in self._interrupted:
                self.talk.playing(pcm, rate)
                self.player.add(pcm, rate, utterance_id)
        self._player_idle()
        Deferred.fromCoroutine(self._detect_talking())

    def dtmf_received(self, digit: str) -> None:
        """A key on the media leg (an AudioSocket DTMF frame): the same press as a ChannelDtmfReceived
        that came or will come, unless the bridge let it through only one way."""
        self._key(digit, "media")

    def dtmf(self, digit: str) -> None:
        self._key(digit, "ari")

    def _key(self, digit: str, source: str) -> None:
        if self._keys.press(digit, source):  # (not the other report of a press already handled)
            self._pressed(digit)

    def _pressed(self, digit: str) -> None:
        self._caller_active()
        if self.config.calls.transfer_digit and digit == self.config.calls.transfer_digit:
            self.log.info("call {call_id}: the caller pressed {digit}: transfer to a human", call_id=self.call_id,
                          digit=digit)
            self.engine.count("transfers_by_key")
            self.finish("caller asked for a human", caller="transfer")
            return
        if self.provider is not None and not self._failing:
            self.provider.dtmf(digit)

    def media_closed(self, reason: str) -> None:
        self.finish(f"media leg closed ({reason})", caller="hangup")

    # --- the caller takes the floor ------------------------------------------------------------

    def _barge_in(self) -> None:
        """The caller spoke over the agent for BARGE_IN_MIN_MS: stop its audio and its reply, keep
        what the caller heard, and give the caller the floor from their first syllable."""
        provider = self.provider
        frames = self.barge.take()
        now = self.reactor.seconds()
        self.barge_ins.append(now)
        self._caller_active()
        self.engine.count("barge_ins")
        self.log.info("call {call_id}: barge-in after {ms:.0f} ms of caller speech", call_id=self.call_id,
                      ms=self.config.calls.barge_in_min_ms)
        self._cancel_timer("guard")
        self._cancel_timer("reply")
        self._cancel_timer("talk")
        self._talk_paused_at = None
        self._duck(False)
        if self.state == "thinking":
            # over the filler: no word of the answer was heard, so this is the same turn going on
            self.engine.count("turns_resumed")
            self._merge_transcript = True
        self._awaiting_reply_audio = False
        self._comfort_id = None
        cut_off = set(self._open_utterances)  # the provider was still producing these
        self._interrupted |= cut_off
        self._open_utterances.clear()
        self._cancel_turn()
        player = self.player
        stopping = Deferred.fromCoroutine(player.stop()) if player is not None else succeed({})
        self.caller_took_floor()
        provider.speech_started()
        self.turns.speech_started()
        for frame in frames:
            provider.push_audio(frame)

        def heard(ms_by_utterance: dict[str, int]) -> Any:
            for utterance_id in cut_off:  # e.g. its first sentence played out, the next not ready yet
                ms_by_utterance.setdefault(utterance_id, player.heard(utterance_id) if player is not None else 0)
            return provider.interrupt({utterance_id: ms for utterance_id, ms in ms_by_utterance.items()
                                       if not is_comfort(utterance_id)})

        def failed(failure: Any) -> None:
            self.log.failure("call {call_id}: stopping the agent's audio failed", failure, call_id=self.call_id)

        stopping.addCallback(heard).addErrback(failed)

    def _caller_went_on(self) -> None:
        """The turn had ended but the caller speaks again before any reply audio: a pause, not the
        end. The pending reply is dropped; the provider hears the rest as part of the same turn."""
        self.engine.count("turns_resumed")
        self._merge_transcript = True
        self._cancel_turn()
        self._cancel_timer("reply")
        self._cancel_timer("filler")
        self._awaiting_reply_audio = False
        self.caller_took_floor()
        self.provider.speech_started()
        self.turns.speech_started()

    def _cancel_turn(self) -> None:
        turn, self._turn = self._turn, None
        if turn is not None and not turn.called:
            turn.cancel()

    # --- turns ---------------------------------------------------------------------------------

    def _turn_over(self) -> None:
        self._turn_marks = {"speech_end": self.turns.speech_ended_at or self.reactor.seconds(),
                            "turn_end": self.reactor.seconds()}
        self.turn_over()

    def _start_turn(self) -> None:
        self._awaiting_reply_audio = True
        self._timers["reply"] = self.reactor.callLater(
            self.config.calls.provider_timeout, self.fail,
            f"provider {self.provider_name} gave no answer within {self.config.calls.provider_timeout:g}s")
        filler_ms = self.config.calls.filler_ms
        if filler_ms and self.engine.filler_pcm:
            waited = self.reactor.seconds() - self._turn_marks.get("speech_end", self.reactor.seconds())
            self._timers["filler"] = self.reactor.callLater(max(0.0, filler_ms / 1000 - waited), self._filler_due)
        self._turn = self.provider.end_of_turn()
        self._turn.addCallbacks(self._turn_answered, self._turn_failed)

    def _filler_due(self) -> None:
        """FILLER_MS after the caller stopped, and no reply audio yet: fill the silence."""
        self._timers.pop("filler", None)
        if self.state == "thinking" and self._awaiting_reply_audio and self._comfort_id is None:
            self.engine.count("fillers")
            self.fillers.append(self.reactor.seconds())
            self._turn_marks["filler"] = self.reactor.seconds()
            self._start_comfort(self.engine.filler_pcm, "filler")

    def _start_comfort(self, pcm: bytes, kind: str) -> None:
        if self.player is None or not pcm:
            return
        self._comfort_count += 1
        self._comfort_id = f"{COMFORT_PREFIX}{kind}-{self._comfort_count}"
        if isinstance(self.player, FilePlayer):
            self.talk.playing(pcm, 8000)
        self.player.add(pcm, 8000, self._comfort_id)

    def _stop_comfort(self) -> None:
        """Real audio is ready: the filler or ringback stops now (what is queued of it is dropped)."""
        comfort, self._comfort_id = self._comfort_id, None
        if comfort is None or self.player is None:
            return
        self._comfort_until = 0.0
        self.player.drop(comfort).addErrback(
            lambda f: self.log.failure("call {call_id}: stopping the filler failed", f, call_id=self.call_id))

    def _turn_answered(self, _: object) -> None:
        self._turn = None
        if self.state == "thinking" and not self._open_utterances and (self.player is None or self.player.idle
                                                                        or self._comfort_id is not None):
            self._cancel_timer("reply")
            self._stop_comfort()
            self.reply_done()  # the provider chose to say nothing

    def _turn_failed(self, failure: Any) -> None:
        self._turn = None
        if failure.check(CancelledError):
            return None
        self.fail(f"provider {self.provider_name} failed: {failure.getErrorMessage()}")
        return None

    # --- the provider's side (IProviderEvents) --------------------------------------------------

    def transcript(self, text: str, final: bool) -> None:
        if final:
            self.transcript_append("caller", text)

    def transcript_append(self, speaker: str, text: str) -> None:
        merge = self._merge_transcript and bool(self.conversation) and self.conversation[-1][0] == "caller"
        if speaker == "caller" and merge:
            # the caller went on after a pause and the answer to the first part was dropped: one turn
            self.conversation[-1] = ("caller", f"{self.conversation[-1][1]} {text}")
        else:
            self.conversation.append((speaker, text))
        if speaker == "caller":
            self._merge_transcript = False
        self.engine.call_changed(self)

    def user_speech_started(self) -> None:
        pass  # barge-in for providers that detect speech themselves: the streaming work builds on this

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.transcript_append("agent", text)

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if self._failing or self._finishing is not None or self.player is None or utterance_id in self._interrupted:
            return
        if self._awaiting_reply_audio and "reply_audio" not in self._turn_marks and self._turn_marks:
            self._turn_marks["reply_audio"] = self.reactor.seconds()
        if self._comfort_id is not None:
            self._stop_comfort()
        self._open_utterances.add(utterance_id)
        self._cancel_timer("guard")
        self.audio_out()
        if isinstance(self.player, FilePlayer):
            self.talk.playing(pcm, rate)
        self.player.add(pcm, rate, utterance_id)

    def utterance_end(self, utterance_id: str) -> None:
        self._open_utterances.discard(utterance_id)
        self._player_idle()

    def tool_request(self, name: str, arguments: dict[str, Any]) -> Deferred[ToolResult]:
        if name == "hangup":
            self._after_speaking(lambda: self.finish("agent hung up", caller="hangup"))
            return succeed(ToolResult(True, "the call ends after the current reply"))
        if name == "transfer":
            self._after_speaking(lambda: self.finish("transferred", caller="transfer"))
            return succeed(ToolResult(True, "transferring after the current reply"))
        return succeed(ToolResult(False, f"unknown tool {name!r}"))

    def timing(self, stage: str, ms: float) -> None:
        self._turn_marks[f"provider_{stage}_ms"] = ms

    def error(self, message: str, fatal: bool) -> None:
        if fatal:
            self.fail(f"provider {self.provider_name}: {message}")
        else:
            self.log.warn("call {call_id}: provider {provider}: {message}", call_id=self.call_id,
                          provider=self.provider_name, message=message)

    # --- the agent's audio reaching the caller --------------------------------------------------

    def _audio_started(self, utterance_id: str) -> None:
        if is_comfort(utterance_id):
            return
        if self._awaiting_reply_audio and self._turn_marks:
            self._awaiting_reply_audio = False
            self._turn_marks["heard"] = self.reactor.seconds()
            self._record_turn()

    def _record_turn(self) -> None:
        marks = self._turn_marks
        timing = {key: value for key, value in marks.items() if key.endswith("_ms")}
        if "speech_end" in marks and "heard" in marks:
            timing["turn_end_wait_ms"] = round((marks["turn_end"] - marks["speech_end"]) * 1000, 1)
            timing["voice_to_voice_ms"] = round((marks["heard"] - marks["speech_end"]) * 1000, 1)
            timing["after_turn_end_ms"] = round((marks["heard"] - marks["turn_end"]) * 1000, 1)
            if "filler" in marks:
                timing["filler_ms"] = round((marks["filler"] - marks["speech_end"]) * 1000, 1)
        self.turn_timings.append(timing)
        self.engine.turn_recorded(self, timing)

    def _player_idle(self) -> None:
        if self._comfort_id is not None and self.player is not None and self.player.idle:
            self._comfort_id = None
            if self.state == "thinking" and self._awaiting_reply_audio and self.engine.comfort_pcm:
                # the filler played out and the answer is still not ready: soft pips until it is
                self._start_comfort(self.engine.comfort_pcm, "tone")
            else:
                # the filler or ringback played out: its echo tail still gates the caller for a moment
                self._comfort_until = self.reactor.seconds() + self.config.calls.gate_guard_ms / 1000
        if self.state != "speaking" or self._open_utterances or self.player is None or not self.player.idle:
            return
        if "guard" in self._timers:
            return
        guard = self.config.calls.gate_guard_ms / 1000
        self._timers["guard"] = self.reactor.callLater(guard, self._guard_over)

    def _guard_over(self) -> None:
        self._timers.pop("guard", None)
        self.reply_done()
        if self.barge.expire(self.reactor.seconds()):
            self._backchannel()
        self._duck(False)
        if self.barge.armed and self.provider is not None and not self._failing:
            # the caller started speaking just as the agent finished: their turn, from its onset
            frames = self.barge.take()
            self.provider.speech_started()
            self.turns.speech_started()
            for frame in frames:
                self.provider.push_audio(frame)
        self.barge.reset()
        for action in self._pending_actions:
            action()
        self._pending_actions.clear()

    def _after_speaking(self, action: Any) -> None:
        if self.state == "speaking" or self._open_utterances:
            self._pending_actions.append(action)
        else:
            action()

    # --- the caller's silence ----------------------------------------------------------------------

    def _caller_active(self) -> None:
        if self.watchdog.active() and self._leave_silent in self._pending_actions:
            self._pending_actions.remove(self._leave_silent)  # they spoke over the goodbye: stay

    def _may_speak(self) -> bool:
        return self.state == "listening" and self.provider is not None and not self._failing \
            and self._finishing is None

    def _ask_still_there(self) -> None:
        if not self._may_speak():
            return
        self.engine.count("inactivity_prompts")
        self.log.info("call {call_id}: the caller has been silent; asking if they are still there",
                      call_id=self.call_id)
        if self.context.still_there:
            self.provider.speak(self.context.still_there).addErrback(self._speak_failed)

    def _say_goodbye(self) -> None:
        if not self._may_speak():
            return
        self.engine.count("inactivity_hangups")
        self.log.info("call {call_id}: the caller stayed silent; saying goodbye and hanging up", call_id=self.call_id)

        def leave(_: object = None) -> None:
            if self.watchdog.stage == 2:  # (not if they spoke up meanwhile)
                self._after_speaking(self._leave_silent)

        def failed(failure: Any) -> None:
            self._speak_failed(failure)
            leave()

        if self.context.goodbye:
            self.provider.speak(self.context.goodbye).addCallbacks(leave, failed)
        else:
            leave()

    def _leave_silent(self) -> None:
        self.outcome = self.outcome or "inactivity"
        self.finish("caller inactive", caller="hangup")

    def _speak_failed(self, failure: Any) -> None:
        self.log.failure("call {call_id}: the provider could not speak", failure, call_id=self.call_id)

    # --- file-mode barge-in: Asterisk's talk detection ------------------------------------------

    def talking_started(self) -> None:
        """Asterisk heard the caller over a file (see calls/talkdetect.py). The file stops at once:
        Asterisk passes the caller's voice to the media leg only while no file plays, and the new turn
        must start with their first syllable. The barge-in detector then judges that voice as in stream
        mode; a backchannel lets the reply go on from where it stopped."""
        if not self.agent_has_floor:
            self._caller_active()
        player = self.player
        if not self.talk.on or not isinstance(player, FilePlayer) or not self.agent_has_floor:
            return
        if not player.paused:
            self._talk_paused_at = self._audio_frames
            player.pause().addErrback(
                lambda f: self.log.failure("call {call_id}: pausing the reply failed", f, call_id=self.call_id))
        if "talk" not in self._timers:
            confirm = (self.config.calls.barge_in_min_ms + TALK_SILENCE_MS) / 1000
            self._timers["talk"] = self.reactor.callLater(confirm, self._talk_confirmed)

    def talking_finished(self, duration_ms: int) -> None:
        self._cancel_timer("talk")
        if self._resume_after_talk():
            self.log.debug("call {call_id}: {ms} ms of talk over the reply: going on", call_id=self.call_id,
                           ms=duration_ms)

    def _resume_after_talk(self) -> bool:
        """The talk that paused the file was not an interruption: play on (counted as a backchannel)."""
        player = self.player
        if self._talk_paused_at is None or not isinstance(player, FilePlayer) or not player.paused:
            return False
        self._talk_paused_at = None
        self.barge.reset()  # the file suspends the caller again: no frame will end what it was judging
        self.engine.count("backchannels")
        player.resume()
        return True

    def _talk_confirmed(self) -> None:
        """BARGE_IN_MIN_MS of talk by Asterisk's measure. When the caller's audio reached us since the
        pause, the barge-in detector has judged it (and not found a voice): Asterisk's measure is only
        for a media leg that carries nothing."""
        self._timers.pop("talk", None)
        heard_since = self._talk_paused_at is not None and self._audio_frames > self._talk_paused_at
        if heard_since or self.provider is None or self._failing or self._finishing is not None:
            return
        if self.agent_has_floor:
            self._barge_in()

    # --- failure -------------------------------------------------------------------------------

    def _no_audio(self) -> None:
        self._timers.pop("no_audio", None)
        if self._audio_frames == 0 and self._finishing is None:
            self.engine.count("no_audio")
            self.log.warn(
                "call {call_id}: no audio from Asterisk {seconds:g}s after bridging. If the caller spoke, check "
                "that Asterisk can reach {advertise}:{port} (RTP_ADVERTISE_HOST, firewall: UDP/TCP from Asterisk to "
                "this host) and that ExternalMedia's external_host is this machine",
                call_id=self.call_id, seconds=self.config.calls.no_audio_seconds,
                advertise=self.config.media.advertise_host, port=self.engine.media_port())

    def fail(self, reason: str) -> None:
        """The provider or the call path broke: apologise, then back to the dialplan (or hang up)."""
        if self._failing or self._finishing is not None:
            return
        self._failing = True
        self.engine.count("provider_failures")
        self.log.error("call {call_id}: {reason}; apologising and handing the call back", call_id=self.call_id,
                       reason=reason)
        Deferred.fromCoroutine(self._apologise_and_leave(reason))

    async def _apologise_and_leave(self, reason: str) -> None:
        self._cancel_timer("reply")
        if self._turn is not None:
            self._turn.cancel()
        action = "continue" if self.config.calls.failure_action == "dialplan" else "hangup"
        try:
            if self.player is not None:
                await self.player.stop()
            await self.engine.apologise(self)
        except Exception:
            self.log.failure("call {call_id}: the apology could not be played", call_id=self.call_id)
        self.finish(reason, caller=action)

    # --- the end -------------------------------------------------------------------------------

    def release(self, reason: str) -> Deferred[None]:
        """ICallHandle: the engine is shutting down; hand the caller back to the dialplan."""
        return self.finish(reason, caller="continue").addCallback(lambda _: None)

    def caller_gone(self, reason: str = "caller hung up") -> None:
        self.finish(reason, caller=None)

    def finish(self, reason: str, caller: str | None) -> Deferred[str]:
        """End the call once; ``caller``: None (already gone), "hangup", "continue" or "transfer"."""
        if self._finishing is None:
            self.end_reason = reason
            self.outcome = self.outcome or self._outcome(caller, reason)
            self.end()
            self._finishing = Deferred.fromCoroutine(self._release(reason, caller))
            self._finishing.addErrback(lambda f: self.log.failure("call {call_id}: release failed", f,
                                                                  call_id=self.call_id))
        finishing: Deferred[str] = Deferred()

        def passed_on(result: Any) -> Any:
            finishing.callback(self.end_reason)
            return result

        self._finishing.addBoth(passed_on)
        return finishing

    async def _release(self, reason: str, caller: str | None) -> str:
        ari = self.engine.ari
        for name in list(self._timers):
            self._cancel_timer(name)
        self.watchdog.busy()
        self.talk.close()
        self.turns.reset()
        if self._setup is not None and not self._setup.called:
            self._setup.cancel()
        if self._turn is not None:
            self._turn.cancel()
        if self.provider is not None:
            closing = self.provider.close()
            closing.addTimeout(2, self.reactor)
            await _quietly(closing, self.log, "closing the provider", self.call_id)
        if self.player is not None:
            await _quietly(Deferred.fromCoroutine(self.player.close()), self.log, "stopping playback", self.call_id)
        if self.session is not None:
            self.session.close()
        self.engine.forget_media_channel(self.media_channel_id)
        if self._requested_media:
            await _gone_ok(ari.hangup(self.media_channel_id), self.log, self.call_id)
        if self._created_bridge:
            await _gone_ok(ari.destroy_bridge(self.bridge_id), self.log, self.call_id)
        if caller == "hangup":
            await _gone_ok(ari.hangup(self.call_id), self.log, self.call_id)
        elif caller in ("continue", "transfer"):
            await _gone_ok(self._continue(caller), self.log, self.call_id)
        self.engine.forget(self)
        self.log.info("call {call_id} ended: {reason} after {seconds:.1f}s", call_id=self.call_id, reason=reason,
                      seconds=self.reactor.seconds() - self.started_at)
        if not self.ended.called:
            self.ended.callback(reason)
        return reason

    def _outcome(self, caller: str | None, reason: str) -> str:
        if self._failing:
            return "failed"
        if caller == "transfer":
            return "transferred"
        if caller == "hangup":
            return "agent_hangup"
        if caller == "continue":
            return "shutdown" if reason == "shutdown" else "failed"
        return "completed"

    def _continue(self, why: str) -> Deferred[None]:
        calls = self.config.calls
        if why == "refused" and calls.overflow_context:
            return self.engine.ari.continue_in_dialplan(self.call_id, context=calls.overflow_context,
                                                        extension=calls.overflow_extension or None,
                                                        priority=calls.overflow_priority)
        if why == "transfer" and calls.transfer_context:
            context, extension, priority = calls.transfer_context, calls.transfer_extension, calls.transfer_priority
        elif calls.fallback_context:
            context, extension, priority = calls.fallback_context, calls.fallback_extension, calls.fallback_priority
        else:
            return self.engine.ari.continue_in_dialplan(self.call_id)  # the priority after Stasis()
        return self.engine.ari.continue_in_dialplan(self.call_id, context=context, extension=extension or None,
                                                    priority=priority)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()



async def _gone_ok(d: Deferred[Any], log: Logger, call_id: str) -> None:
    """Teardown: 404 means already gone; anything else is logged, never raised."""
    try:
        await d
    except ARINotFound:
        pass
    except ARIError as e:
        log.warn("call {call_id}: clean-up request failed: {error}", call_id=call_id, error=str(e))


async def _quietly(d: Deferred[Any], log: Logger, what: str, call_id: str) -> None:
    try:
        await d
    except Exception:
        log.failure("call {call_id}: {what} failed", call_id=call_id, what=what)
