"""One phone call: the owner of every resource the call holds, and the one place that decides.

The call moves Connecting → Listening → Thinking → Speaking → Ended (calls/states.py); what it does
on each event from the media session, the provider and Asterisk is here. The rest is in plain
objects it owns: the media leg and the choice of provider (bringup.py), the agent's voice
(voice.py), comfort sounds (comfort.py), caller speech over the agent (interruptions.py), turn
ends and their timings (turns.py, timing.py), how long an answer may take (deadline.py), the
inactivity prompts (watchdog.py).

Whatever ends the call — the caller hanging up, the provider failing, an agent hang-up or transfer,
the engine shutting down — goes through :meth:`Call.finish`, which releases everything exactly
once: the provider, the reply files, the media session, the ExternalMedia channel and the bridge
(Asterisk keeps both alive otherwise), and then the caller (handback.py: hung up, sent back to the
dialplan, or left alone if already gone).
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.ari.errors import ARINotFound
from twisted_agent.calls.bringup import Choice, MediaLeg, SetupFailed
from twisted_agent.calls.comfort import ComfortSounds, is_comfort
from twisted_agent.calls.deadline import AnswerDeadline
from twisted_agent.calls.handback import let_go, outcome
from twisted_agent.calls.interruptions import Interruptions
from twisted_agent.calls.keys import KeyPresses
from twisted_agent.calls.playback import StreamPlayer
from twisted_agent.calls.registry import ICallHandle
from twisted_agent.calls.states import CallStates
from twisted_agent.calls.timing import TurnClock, TurnTiming
from twisted_agent.calls.turns import TurnTaker
from twisted_agent.calls.voice import AgentVoice
from twisted_agent.calls.watchdog import InactivityPrompts
from twisted_agent.media.interfaces import IMediaConsumer
from twisted_agent.providers.base import ICallInfo, IProviderEvents, ProviderError, ToolResult


@implementer(ICallHandle, ICallInfo, IMediaConsumer, IProviderEvents)
class Call:
    log = Logger()

    def __init__(self, engine: Any, channel: Any) -> None:
        self.engine = engine
        self.config = engine.config
        self.reactor = engine.reactor
        self.call_id: str = channel.id
        self.caller_number: str = channel.caller.number
        self.caller_name: str = channel.caller.name
        self.channel = channel
        self.events = self
        self.states = CallStates(self._entered)
        self.provider_name = self.config.calls.default_provider
        self.context_name = self.config.calls.default_context
        self.provider_source = self.context_source = "default"  # or "channel variable", "context"
        self.context = self.config.contexts[self.context_name]
        self.session_uuid = uuid.uuid4()
        self.leg = MediaLeg(engine, self.call_id, self.session_uuid)
        self.provider: Any = None
        self.voice = AgentVoice(engine, self.call_id, on_idle=self._player_idle, on_audio_started=self._audio_started,
                                on_heard=self._reply_heard)
        self.ended: Deferred[str] = Deferred()
        self.end_reason = ""
        self.outcome = ""  # how it ended (calls.record.OUTCOMES): set by finish() unless set before
        self.hangup_cause = ""  # Asterisk's cause text, when the caller's side ended the call
        self.conversation: list[tuple[str, str]] = []  # (speaker, text), turn by turn
        self.started_at = self.reactor.seconds()
        self._turn: Deferred[Any] | None = None
        self._setup: Deferred[Any] | None = None
        #: QUEUE_TIMEOUT for the work on the caller's turn to start, then PROVIDER_TIMEOUT for its answer
        self._reply_timer = AnswerDeadline(self.reactor, self.config.calls.queue_timeout,
                                           self.config.calls.provider_timeout, self._answer_late)
        self._failing = False
        self._finishing: Deferred[str] | None = None
        calls = self.config.calls
        self.turns = TurnTaker(self.reactor, calls.turn_end_ms / 1000, self._turn_over)
        self.turn_clock = TurnClock(self.reactor, lambda timing: self.engine.turn_recorded(self, timing))
        #: reactor times of barge-ins (the agent's audio was stopped then)
        self.barge_ins: list[float] = []
        self.comfort = ComfortSounds(
            self.reactor, self.call_id, filler=engine.filler_pcm, pips=engine.comfort_pcm, filler_ms=calls.filler_ms,
            guard_s=calls.gate_guard_ms / 1000, player=lambda: self.voice.player, play=self.voice.play,
            waiting=lambda: self.state == "thinking" and self.turn_clock.awaiting_reply, on_filler=self._filler_started)
        self.interruptions = Interruptions(
            self.reactor, self.call_id, min_ms=calls.barge_in_min_ms, duck_db=calls.barge_in_duck_db,
            barge_in=calls.barge_in, session=lambda: self.session, player=lambda: self.voice.player,
            frames_heard=lambda: self.leg.frames, count=engine.count, confirmed=self._talk_confirmed)
        self.inactivity = InactivityPrompts(
            self.reactor, calls.inactivity_prompt_seconds, calls.inactivity_hangup_seconds, self.call_id,
            talking=lambda: self.session is not None and bool(self.session.detector.in_speech),
            speaker=lambda: self.provider if self._may_speak() else None, context=lambda: self.context,
            after_speaking=self._after_speaking, leave=self._leave_silent, count=engine.count)
        #: the next caller transcript continues the previous one (its answer was dropped unheard)
        self._merge_transcript = False
        self._keys = KeyPresses(self.reactor)

    # --- the states (calls/states.py has which input leads where) -------------------------------

    @property
    def state(self) -> str:
        return self.states.name

    @property
    def turn_timings(self) -> list[TurnTiming]:
        return self.turn_clock.timings

    @property
    def fillers(self) -> list[float]:
        """Reactor times the filler started playing, one per slow turn."""
        return self.comfort.fillers

    @property
    def player(self) -> Any:
        return self.voice.player

    @property
    def stream_fallback(self) -> str:
        return self.voice.fallback

    def _entered(self, state: str) -> None:
        self.engine.call_changed(self)
        {"listening": self._now_listening, "thinking": self._now_thinking, "speaking": self._now_speaking}[state]()

    def _now_listening(self) -> None:
        self.turns.reset()
        self.comfort.cancel_filler()
        if self._finishing is None:
            self.inactivity.watchdog.waiting()

    def _now_thinking(self) -> None:
        self.inactivity.watchdog.busy()
        self._start_turn()

    def _now_speaking(self) -> None:
        self.turns.reset()
        self._reply_timer.cancel()
        self.comfort.cancel_filler()
        self.inactivity.watchdog.busy()

    # --- bringing the call up -----------------------------------------------------------------

    def start(self) -> Deferred[Any]:
        self._setup = Deferred.fromCoroutine(self._bring_up())
        self._setup.addErrback(self._setup_failed)
        return self._setup

    async def _bring_up(self) -> None:
        engine, config = self.engine, self.config
        choice = await Choice.of_channel(engine.ari, self.channel, config, engine.providers.factories)
        self.provider_name, self.provider_source = choice.provider, choice.provider_source
        self.context_name, self.context_source = choice.context, choice.context_source
        self.context = config.contexts[self.context_name]
        engine.call_changed(self)
        try:
            self.provider = engine.providers.create(self.provider_name)
        except ProviderError as e:
            if not (config.calls.ready_timeout and engine.providers.starting(self.provider_name)):
                # Not answered yet: the caller goes straight back to the dialplan, hearing nothing odd.
                self.log.warn("call {call_id}: provider {provider} unavailable ({error}); back to the dialplan",
                              call_id=self.call_id, provider=self.provider_name, error=str(e))
                engine.count("provider_unavailable")
                self.finish("provider unavailable", caller="continue")
                return
            # still starting (the engine has just started): worth the wait (_hold_until_ready)
        await engine.ari.answer(self.call_id)
        await self.leg.open(self)
        self.voice.start(self.session)
        await self.voice.detect_talking()
        held = self.provider is None
        if held:
            await self._hold_until_ready()
        self.states.set_up()
        if not self.context.greeting:
            self.comfort.stop()  # the hold's ringback: no greeting to wait for
        elif config.calls.ringback and not held:  # (a held call's ringback goes on until the greeting)
            self.comfort.start(engine.ringback_pcm, "ringback")
        start = self.provider.start(self)
        start.addTimeout(config.calls.provider_timeout, self.reactor)
        try:
            await start
        except TimeoutError:
            raise ProviderError(f"provider {self.provider_name} did not start within "
                                f"{config.calls.provider_timeout:g}s") from None
        self.log.info("call {call_id} from {caller} up: provider {provider}, context {context}, {transport}",
                      call_id=self.call_id, caller=self.caller_number, provider=self.provider_name,
                      context=self.context_name, transport=config.media.transport)

    async def _hold_until_ready(self) -> None:
        """The provider is still starting: the caller, answered, hears ringback until it is ready,
        READY_TIMEOUT at most (then the apology: ProviderError). The wait is part of the set-up, so
        a hang-up or the engine's drain cancels it like any other step."""
        engine, name, timeout = self.engine, self.provider_name, self.config.calls.ready_timeout
        engine.count("held_for_ready")
        self.log.info("call {call_id}: provider {provider} is still starting; holding the caller (ringback) "
                      "up to {timeout:g}s", call_id=self.call_id, provider=name, timeout=timeout)
        self.comfort.start(engine.ringback_pcm, "ringback")
        held_at = self.reactor.seconds()
        waiting = engine.providers.when_ready(name)
        waiting.addTimeout(timeout, self.reactor)
        try:
            await waiting
        except TimeoutError:
            self.log.warn("call {call_id}: provider {provider} still not ready after holding {timeout:g}s",
                          call_id=self.call_id, provider=name, timeout=timeout)
            raise ProviderError(f"provider {name} was not ready within {timeout:g}s (READY_TIMEOUT)") from None
        except CancelledError:
            self.log.info("call {call_id}: held for provider {provider}, released after {seconds:.1f}s: {reason}",
                          call_id=self.call_id, provider=name, seconds=self.reactor.seconds() - held_at,
                          reason=self.end_reason or "set-up cancelled")
            raise
        seconds = self.reactor.seconds() - held_at
        try:
            self.provider = engine.providers.create(name)
        except ProviderError as e:
            self.log.warn("call {call_id}: provider {provider} failed to start while the caller was held "
                          "{seconds:.1f}s: {error}", call_id=self.call_id, provider=name, seconds=seconds, error=str(e))
            raise
        self.log.info("call {call_id}: provider {provider} ready after holding {seconds:.1f}s; going on",
                      call_id=self.call_id, provider=name, seconds=seconds)

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
    def session(self) -> Any:
        """The media session (RTP or AudioSocket) of the call's media leg; None until it is made."""
        return self.leg.session

    @property
    def waiting_for_media(self) -> bool:
        return self.leg.waiting

    def media_channel_started(self) -> None:
        self.leg.channel_started()

    # --- the caller's audio (IMediaConsumer) ----------------------------------------------------

    @property
    def gated(self) -> bool:
        """The agent has the floor: caller audio is not a new turn (the agent never hears itself)."""
        return self.state in ("speaking", "connecting") or self.voice.guarding or self.comfort_playing

    @property
    def comfort_playing(self) -> bool:
        """The filler or the ringback is playing (or its echo tail is still coming back)."""
        return self.comfort.playing

    @property
    def agent_has_floor(self) -> bool:
        """The agent is speaking, or finished less than GATE_GUARD_MS ago, or a filler stands in for
        its reply: caller speech may barge in."""
        return (self.state == "speaking" or (self.state == "listening" and self.voice.guarding)
                or (self.state == "thinking" and self.comfort_playing))

    def audio_received(self, frame: bytes) -> None:
        self.leg.frames += 1
        provider = self.provider
        if provider is None or self._failing:
            return
        talk = self.voice.talk
        if talk.on and self.state == "listening" and not self.gated and not self.session.detector.in_speech:
            talk.heard_line(frame)
        if not provider.wants_turn_taking:  # a cloud agent hears the caller throughout, but not our echo
            provider.push_audio(self.interruptions.for_cloud(frame, self.agent_has_floor or self.comfort_playing))
        elif not self.gated:
            provider.push_audio(frame)
        elif self.agent_has_floor and self.config.calls.barge_in and self.interruptions.frame(frame):
            self._barge_in()

    def speech_started(self) -> None:
        provider = self.provider
        if provider is None or self._failing:
            return
        if not self.gated:
            self.inactivity.caller_active()  # while the agent speaks, only a confirmed barge-in counts (echo)
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
        self.interruptions.voice_stopped()
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
        if not isinstance(self.player, StreamPlayer) or self._finishing is not None:
            return
        self.comfort.forget()  # a filler is not worth a file
        self.voice.fall_back(reason)
        self._player_idle()
        Deferred.fromCoroutine(self.voice.detect_talking())

    def dtmf_received(self, digit: str) -> None:
        """A key on the media leg (an AudioSocket DTMF frame): the same press as a ChannelDtmfReceived
        that came or will come, unless the bridge let it through only one way."""
        if self._keys.press(digit, "media"):  # (not the other report of a press already handled)
            self._pressed(digit)

    def dtmf(self, digit: str) -> None:
        if self._keys.press(digit, "ari"):
            self._pressed(digit)

    def _pressed(self, digit: str) -> None:
        self.inactivity.caller_active()
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
        frames = self.interruptions.caller_took_floor()
        self.barge_ins.append(self.reactor.seconds())
        self.inactivity.caller_active()
        self.engine.count("barge_ins")
        self.log.info("call {call_id}: barge-in after {ms:.0f} ms of caller speech", call_id=self.call_id,
                      ms=self.config.calls.barge_in_min_ms)
        self.voice.cancel_guard()
        self._reply_timer.cancel()
        if self.state == "thinking":
            # over the filler: no word of the answer was heard, so this is the same turn going on
            self.engine.count("turns_resumed")
            self._merge_transcript = True
        self.turn_clock.answer_dropped()
        self.comfort.forget()
        cut_off = self.voice.cut_off_open()
        self._cancel_turn()
        stopping = self.voice.stop(cut_off)
        self.states.caller_took_floor()
        provider.speech_started()
        self.turns.speech_started()
        for frame in frames:
            provider.push_audio(frame)
        stopping.addCallback(provider.interrupt).addErrback(
            lambda f: self.log.failure("call {call_id}: stopping the agent's audio failed", f, call_id=self.call_id))

    def _caller_went_on(self) -> None:
        """The turn had ended but the caller speaks again before any reply audio: a pause, not the
        end. The pending reply is dropped; the provider hears the rest as part of the same turn."""
        self.engine.count("turns_resumed")
        self._merge_transcript = True
        self._cancel_turn()
        self._reply_timer.cancel()
        self.comfort.cancel_filler()
        self.turn_clock.answer_dropped()
        self.states.caller_took_floor()
        self.provider.speech_started()
        self.turns.speech_started()

    def _cancel_turn(self) -> None:
        turn, self._turn = self._turn, None
        if turn is not None and not turn.called:
            turn.cancel()

    # --- turns ---------------------------------------------------------------------------------

    def _turn_over(self) -> None:
        self.turn_clock.turn_ended(self.turns.speech_ended_at)
        self.states.turn_over()

    def _start_turn(self) -> None:
        self.turn_clock.answer_awaited()
        # before end_of_turn: a provider may say its work started (work_started) before it returns
        self._reply_timer.turn_started()
        self.comfort.turn_started(self.turn_clock.since_speech_end())
        self._turn = self.provider.end_of_turn()
        self._turn.addCallbacks(self._turn_answered, self._turn_failed)

    def _answer_late(self, reason: str, what: str) -> None:
        """QUEUE_TIMEOUT or PROVIDER_TIMEOUT ran out (calls/deadline.py): the turn failed."""
        self.fail(f"provider {self.provider_name} {what}", turn_failure=reason)

    def _filler_started(self) -> None:
        self.engine.count("fillers")
        self.turn_clock.filler()

    def _turn_answered(self, _: object) -> None:
        self._turn = None
        if self.state == "thinking" and not self.voice.open and (
                self.player is None or self.player.idle or self.comfort.utterance_id is not None):
            self._reply_timer.cancel()
            self.comfort.stop()
            self.states.reply_done()  # the provider chose to say nothing

    def _turn_failed(self, failure: Any) -> None:
        self._turn = None
        if failure.check(CancelledError):
            return None
        self.fail(f"provider {self.provider_name} failed: {failure.getErrorMessage()}", turn_failure="provider_error")
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
        """A cloud agent heard the caller begin (not our echo: see for_cloud): that is the barge-in."""
        if self.provider is not None and not self._failing and self._finishing is None:
            self.inactivity.caller_active()
            if self.agent_has_floor:
                self._silence_agent("the provider heard the caller")

    def _silence_agent(self, why: str) -> None:
        """Barge-in for providers that take turns themselves: stop the agent's audio at once and tell
        the provider what the caller heard of each utterance (OpenAI truncates its item to it)."""
        self.barge_ins.append(self.reactor.seconds())
        self.engine.count("barge_ins")
        self.log.info("call {call_id}: barge-in ({why})", call_id=self.call_id, why=why)
        self.voice.cancel_guard()
        self.comfort.forget()
        stopping = self.voice.stop(self.voice.cut_off_open())
        self.states.caller_took_floor()
        stopping.addCallback(self.provider.interrupt).addErrback(
            lambda f: self.log.failure("call {call_id}: stopping the agent's audio failed", f, call_id=self.call_id))

    def agent_text(self, text: str, utterance_id: str) -> None:
        self.transcript_append("agent", text)

    def agent_audio(self, pcm: bytes, rate: int, utterance_id: str) -> None:
        if self._failing or self._finishing is not None or self.player is None or utterance_id in self.voice.cut_off:
            return
        self.turn_clock.reply_audio()
        self.comfort.stop()
        self.voice.open.add(utterance_id)
        self.voice.cancel_guard()
        self.states.audio_out()
        self.voice.play(pcm, rate, utterance_id)

    def utterance_end(self, utterance_id: str) -> None:
        self.voice.open.discard(utterance_id)
        self._player_idle()

    def tool_request(self, name: str, arguments: dict[str, Any]) -> Deferred[ToolResult]:
        ends = {"hangup": ("agent hung up", "the call ends"), "transfer": ("transferred", "transferring")}
        if name not in ends:
            return succeed(ToolResult(False, f"unknown tool {name!r}"))
        reason, result = ends[name]
        self._after_speaking(lambda: self.finish(reason, caller="hangup" if name == "hangup" else "transfer"))
        return succeed(ToolResult(True, f"{result} after the current reply"))

    def work_started(self) -> None:
        """The provider's work on the turn left the queue: PROVIDER_TIMEOUT counts from now."""
        if self._reply_timer.work_started():
            self.turn_clock.work_started()
            marks = self.turn_clock.marks
            self.log.debug("call {call_id}: work on the turn started after {queue_ms:.0f} ms in the queue",
                           call_id=self.call_id, queue_ms=(marks["work_started"] - marks["turn_end"]) * 1000)

    def timing(self, stage: str, ms: float) -> None:
        self.turn_clock.provider_stage(stage, ms)

    def error(self, message: str, fatal: bool) -> None:
        if fatal:
            return self.fail(f"provider {self.provider_name}: {message}", turn_failure="provider_error")
        self.log.warn("call {call_id}: provider {provider}: {message}", call_id=self.call_id,
                      provider=self.provider_name, message=message)

    # --- the agent's audio reaching the caller --------------------------------------------------

    def _audio_started(self, utterance_id: str) -> None:
        if not is_comfort(utterance_id):
            self.turn_clock.heard()

    def _player_idle(self) -> None:
        self.comfort.played_out()
        self.voice.played_out(self.state == "speaking")

    def _reply_heard(self) -> None:
        self.states.reply_done()
        frames = self.interruptions.agent_done()
        if frames is not None and self.provider is not None and not self._failing:
            # the caller started speaking just as the agent finished: their turn, from its onset
            self.provider.speech_started()
            self.turns.speech_started()
            for frame in frames:
                self.provider.push_audio(frame)

    def _after_speaking(self, action: Any) -> None:
        self.voice.after_speaking(action, self.state == "speaking")

    # --- the caller's silence ----------------------------------------------------------------------

    def _may_speak(self) -> bool:
        return self.state == "listening" and self.provider is not None and not self._failing \
            and self._finishing is None

    def _leave_silent(self) -> None:
        self.outcome = self.outcome or "inactivity"
        self.finish("caller inactive", caller="hangup")

    # --- file-mode barge-in: Asterisk's talk detection ------------------------------------------

    def talking_started(self) -> None:
        """Asterisk heard the caller over a file (see calls/talkdetect.py and calls/interruptions.py)."""
        if not self.agent_has_floor:
            self.inactivity.caller_active()
        elif not self.provider.wants_turn_taking:
            # the cloud agent cannot hear the caller while a file plays (Asterisk takes them out of
            # the bridge): Asterisk's talk detection, set above the agent's own echo, is the barge-in
            self._silence_agent("Asterisk heard the caller over the reply")
        elif self.voice.talk.on:
            self.interruptions.talk_started()

    def talking_finished(self, duration_ms: int) -> None:
        self.interruptions.talk_finished(duration_ms)

    def _talk_confirmed(self) -> None:
        """Asterisk measured talk long enough to interrupt, and none of it reached the media leg."""
        if self.provider is None or self._failing or self._finishing is not None:
            return
        if self.agent_has_floor:
            self._barge_in()

    # --- failure -------------------------------------------------------------------------------

    def fail(self, reason: str, turn_failure: str = "provider_error") -> None:
        """The provider or the call path broke: apologise, then back to the dialplan (or hang up).
        A turn whose answer was awaited failed with it, for ``turn_failure`` (timing.TURN_FAILURES)."""
        if self._failing or self._finishing is not None:
            return
        self._failing = True
        self.engine.count("provider_failures")
        self.log.error("call {call_id}: {reason}; apologising and handing the call back", call_id=self.call_id,
                       reason=reason, turn_failure=turn_failure)
        self._reply_timer.cancel()
        self.turn_clock.failed(turn_failure)  # recorded (and counted) before the apology plays
        Deferred.fromCoroutine(self._apologise_and_leave(reason))

    async def _apologise_and_leave(self, reason: str) -> None:
        self._reply_timer.cancel()
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
            self.outcome = self.outcome or outcome(caller, reason, self._failing)
            self.states.end()
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
        self._reply_timer.cancel()
        self.leg.stop_watching()
        self.comfort.cancel_filler()
        self.interruptions.close()
        self.voice.close()
        self.inactivity.watchdog.busy()
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
        await self.leg.close()
        await let_go(self.engine.ari, self.config.calls, self.call_id, caller, self.log)
        self.engine.forget(self)
        self.log.info("call {call_id} ended: {reason} after {seconds:.1f}s", call_id=self.call_id, reason=reason,
                      seconds=self.reactor.seconds() - self.started_at)
        if not self.ended.called:
            self.ended.callback(reason)
        return reason


async def _quietly(d: Deferred[Any], log: Logger, what: str, call_id: str) -> None:
    try:
        await d
    except Exception:
        log.failure("call {call_id}: {what} failed", call_id=call_id, what=what)
