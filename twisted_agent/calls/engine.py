"""The call engine: turns ARI events into calls and gives each call what it needs.

A caller channel's ``StasisStart`` makes a :class:`~twisted_agent.calls.call.Call` (unless the engine
is draining or full: then the caller goes back to the dialplan unanswered). Our own media channels
are told apart from callers by the ids we gave them. Hang-up, playback and DTMF events are routed to
the call they belong to; after an ARI outage every call is checked against Asterisk, so a caller who
hung up while the events socket was down does not leave an orphaned bridge.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.ari import events as ev
from twisted_agent.ari.errors import ARIError, ARINotFound
from twisted_agent.calls.call import Call
from twisted_agent.calls.comfort import comfort_tone, load_filler, ringback_tone
from twisted_agent.calls.handback import continue_in_dialplan
from twisted_agent.calls.playback import ENCODERS, FILE_PREFIX, FilePlayer, StreamPlayer, sweep, write_atomically
from twisted_agent.calls.record import hangup_cause, history_record, live_record
from twisted_agent.calls.registry import CallRegistry, Refusal
from twisted_agent.calls.timing import TurnTiming
from twisted_agent.media.codecs import ulaw_decode
from twisted_agent.store.interfaces import ICallStore
from twisted_agent.store.memory import MemoryStore
from twisted_agent.web.interfaces import ICallControl

MEDIA_CHANNEL_PREFIX = "ai-media-"
APOLOGY_NAME = "twisted-agent-apology"  # not FILE_PREFIX: the start-up sweep keeps it
#: set on another engine's call before hanging it up, so that its engine records an operator hang-up
OPERATOR_HANGUP_VARIABLE = "AI_AGENT_OPERATOR_HANGUP"


def bundled_apology() -> bytes:
    """The apology as 8 kHz PCM: a recording, so it works when the provider (and its TTS) is dead."""
    return ulaw_decode(resources.files("twisted_agent").joinpath("sounds/apology.ulaw").read_bytes())


class _PlaybackWaiter:
    """Stands in for a player for one playback: fires when Asterisk has played it."""

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred()

    def playback_started(self, playback_id: str) -> None:
        pass

    def playback_finished(self, playback_id: str, state: str) -> None:
        if not self.done.called:
            self.done.callback(state)


#: told of each turn's timings as they are recorded, answered or failed (calls/timing.py)
TurnListener = Callable[[Call, TurnTiming], None]


@implementer(ICallControl)
class CallEngine(Service):
    log = Logger()

    def __init__(self, reactor: Any, config: Any, ari: Any, media: Any, registry: CallRegistry,
                 providers: Any, store: ICallStore | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.ari_service = ari
        self.ari = ari.rest
        self.media = media
        self.registry = registry
        self.providers = providers
        self.calls: dict[str, Call] = {}
        self._media_channels: dict[str, Call] = {}
        self._playbacks: dict[str, Any] = {}
        self.counters: Counter[str] = Counter()
        self.apology_pcm = bundled_apology()
        self.filler_pcm = load_filler(config.calls.filler)
        #: after the filler, while the answer is still not ready
        self.comfort_pcm = comfort_tone() if self.filler_pcm else b""
        #: before the greeting (RINGBACK), and while a call is held for its provider to be ready (READY_TIMEOUT)
        calls = config.calls
        self.ringback_pcm = ringback_tone(calls.ready_timeout + calls.provider_timeout + 5) \
            if calls.ringback or calls.ready_timeout else b""
        self.store: ICallStore = store if store is not None else MemoryStore(reactor, config.store)
        self.engine_id: str = self.store.engine_id
        #: finished calls by outcome (calls.record.OUTCOMES), for /metrics
        self.outcomes: Counter[str] = Counter()
        #: told of every turn's timings as it is recorded, answered or failed (the metrics' latencies)
        self.turn_listeners: list[TurnListener] = []
        #: told of every finished call's history record
        self.finish_listeners: list[Callable[[dict[str, Any]], None]] = []
        #: calls whose live record changed since it was last written (written once per reactor turn)
        self._changed: dict[str, Call] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        # stream mode needs MEDIA_DIR too: a call whose streaming fails goes on with files
        self._prepare_media_dir(self.config.media.media_dir)
        self.ari_service.events.add_listener(self.on_event)
        self.ari_service.events.add_connection_listener(self.on_connection)
        self.providers.start()

    def _prepare_media_dir(self, media_dir: str) -> None:
        try:
            removed = sweep(media_dir)
            if removed:
                self.log.info("removed {count} reply file(s) left in {dir} by an earlier run", count=len(removed),
                              dir=media_dir)
            write_atomically(self.apology_path() + "." + self.config.media.codec,
                             ENCODERS[self.config.media.codec](self.apology_pcm))
        except OSError as e:
            if self.config.media.downstream_mode == "file":
                self.log.error("MEDIA_DIR {dir} is not usable ({error}): file playback and the apology will fail; "
                               "run `ai-agent check`", dir=media_dir, error=e.strerror or str(e))
            else:
                self.log.warn("MEDIA_DIR {dir} is not usable ({error}): a call whose streaming fails cannot go on "
                              "with file playback", dir=media_dir, error=e.strerror or str(e))

    def apology_path(self) -> str:
        return os.path.join(self.config.media.media_dir, APOLOGY_NAME)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self.ari_service.events.remove_listener(self.on_event)
        return self.providers.stop()

    # --- ARI events -----------------------------------------------------------------------------

    def on_event(self, event: Any) -> None:
        if isinstance(event, ev.StasisStart):
            self._stasis_start(event)
        elif isinstance(event, (ev.StasisEnd, ev.ChannelHangupRequest, ev.ChannelDestroyed)):
            self._channel_left(event)
        elif isinstance(event, (ev.PlaybackStarted, ev.PlaybackFinished)):
            player = self._playbacks.get(event.playback.id)
            if player is not None:
                if isinstance(event, ev.PlaybackStarted):
                    player.playback_started(event.playback.id)
                else:
                    player.playback_finished(event.playback.id, event.playback.state)
        elif isinstance(event, ev.ChannelDtmfReceived):
            call = self.calls.get(event.channel.id)
            if call is not None:
                call.dtmf(event.digit)
        elif isinstance(event, ev.ChannelVarset):
            # another engine's operator pressed hang-up on this engine's call (see _hang_up)
            if event.variable == OPERATOR_HANGUP_VARIABLE and event.channel is not None \
                    and event.channel.id in self.calls:
                Deferred.fromCoroutine(self._hang_up(event.channel.id, by=event.value))
        elif isinstance(event, (ev.ChannelTalkingStarted, ev.ChannelTalkingFinished)):
            call = self.calls.get(event.channel.id)
            if call is not None:
                if isinstance(event, ev.ChannelTalkingStarted):
                    call.talking_started()
                else:
                    call.talking_finished(event.duration)

    def _stasis_start(self, event: Any) -> None:
        channel = event.channel
        call = self._media_channels.get(channel.id)
        if call is not None:
            call.media_channel_started()
            return
        if channel.id.startswith(MEDIA_CHANNEL_PREFIX):
            # one of ours that no call waits for (left over from a call that is gone): remove it
            self.log.info("hanging up stray media channel {channel}", channel=channel.id)
            self.ari.hangup(channel.id).addErrback(lambda f: None)
            return
        if channel.id in self.calls:
            return
        call = Call(self, channel)
        try:
            self.registry.admit(call)
        except Refusal as refusal:
            self.counters[f"refused_{refusal.reason}"] += 1
            self.outcomes["refused"] += 1
            self.log.info("call {call_id} from {caller} not taken ({reason}): back to the dialplan",
                          call_id=channel.id, caller=channel.caller.number, reason=refusal.reason)
            # not answered: the dialplan goes on
            continue_in_dialplan(self.ari, self.config.calls, channel.id, "refused").addErrback(lambda f: None)
            # the history says so too: the operator asks why a call went unanswered
            call.outcome, call.end_reason = "refused", f"not taken: engine {refusal.reason}; sent back to the dialplan"
            self.store.call_finished(history_record(call))
            return
        self.calls[channel.id] = call
        self.counters["calls"] += 1
        call.start()

    def _channel_left(self, event: Any) -> None:
        channel_id = event.channel.id
        call = self.calls.get(channel_id)
        if call is not None:
            cause = getattr(event, "cause_txt", None) or "caller hung up"
            if not call.hangup_cause:
                call.hangup_cause = hangup_cause(event)
            call.caller_gone(f"caller hung up ({cause})" if cause != "caller hung up" else cause)
            return
        call = self._media_channels.get(channel_id)
        if call is not None and isinstance(event, (ev.StasisEnd, ev.ChannelDestroyed)):
            call.fail("the media channel ended unexpectedly", turn_failure="media_error")

    def on_connection(self, connected: bool) -> None:
        if connected and self.calls:
            Deferred.fromCoroutine(self._reconcile())

    async def _reconcile(self) -> None:
        """After an outage: calls whose caller left meanwhile are ended (their events were lost)."""
        for call in list(self.calls.values()):
            try:
                await self.ari.get_channel(call.call_id)
            except ARINotFound:
                self.counters["lost_during_outage"] += 1
                call.outcome = call.outcome or "lost"
                call.caller_gone("caller left during the ARI outage")
                continue
            except ARIError as e:
                self.log.warn("could not check call {call_id} after reconnecting: {error}", call_id=call.call_id,
                              error=str(e))
                continue
            try:
                if call.waiting_for_media:
                    # its media channel's StasisStart may have come while nobody listened
                    await self.ari.get_channel(call.leg.channel_id)
                    call.media_channel_started()
                if isinstance(call.player, FilePlayer):
                    await call.player.reconcile()
            except ARINotFound:
                pass  # the media channel does not exist yet: its StasisStart is still to come
            except ARIError as e:
                self.log.warn("could not check call {call_id} after reconnecting: {error}", call_id=call.call_id,
                              error=str(e))

    # --- what calls use -------------------------------------------------------------------------

    def media_port(self) -> int:
        bound = self.media.bound_address()
        return bound[1] if bound else self.config.media.rtp_port

    def expect_media_channel(self, channel_id: str, call: Call) -> None:
        self._media_channels[channel_id] = call

    def forget_media_channel(self, channel_id: str) -> None:
        self._media_channels.pop(channel_id, None)

    def register_playback(self, playback_id: str, player: Any) -> None:
        self._playbacks[playback_id] = player

    def unregister_playback(self, playback_id: str) -> None:
        self._playbacks.pop(playback_id, None)

    def forget(self, call: Call) -> None:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
            self._changed.pop(call.call_id, None)
            record = history_record(call)
            self.outcomes[record["outcome"]] += 1
            self.store.call_finished(record)
            for listener in self.finish_listeners:
                listener(record)
        self.registry.discard(call.call_id)

    def call_changed(self, call: Call) -> None:
        """The call's live record is out of date: written at the end of this reactor turn, once."""
        if not self._changed:
            self.reactor.callLater(0, self._write_changed)
        self._changed[call.call_id] = call

    def _write_changed(self) -> None:
        changed, self._changed = self._changed, {}
        for call_id, call in changed.items():
            if self.calls.get(call_id) is call:
                self.store.call_updated(live_record(call))

    def turn_recorded(self, call: Call, timing: TurnTiming) -> None:
        for listener in self.turn_listeners:
            listener(call, timing)
        self.call_changed(call)

    # --- ICallControl: the admin UI's actions ---------------------------------------------------

    def hang_up(self, call_id: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._hang_up(call_id))

    async def _hang_up(self, call_id: str, by: str = "") -> bool:
        call = self.calls.get(call_id)
        if call is not None:
            where = f" on engine {by}" if by and by != self.engine_id else ""
            self.log.info("call {call_id}: hung up by an operator{where}", call_id=call_id, where=where)
            call.outcome = call.outcome or "operator_hangup"
            await call.finish(f"hung up by an operator{where}", caller="hangup")
            return True
        # another engine's call (shared store): mark the channel, so that its engine (which sees the
        # variable set before the hang-up) records who ended it, then hang it up here, which works
        # even when that engine is gone
        try:
            await self.ari.set_variable(call_id, OPERATOR_HANGUP_VARIABLE, self.engine_id, report=True)
        except ARINotFound:
            return False
        except ARIError as e:
            self.log.warn("could not mark call {call_id} as hung up by an operator: {error}",
                          call_id=call_id, error=str(e))
        try:
            await self.ari.hangup(call_id)
        except ARINotFound:
            return False
        except ARIError as e:
            self.log.warn("could not hang up call {call_id}: {error}", call_id=call_id, error=str(e))
            return False
        self.log.info("call {call_id} (another engine's): hung up by an operator", call_id=call_id)
        return True

    def count(self, what: str) -> None:
        self.counters[what] += 1

    async def apologise(self, call: Call) -> None:
        """Play the recorded apology to the caller and wait until it has been heard."""
        seconds = len(self.apology_pcm) / 16000
        streaming = isinstance(call.player, StreamPlayer) or (
            call.player is None and self.config.media.downstream_mode == "stream")
        if call.session is not None and call.session.bound and streaming and not call.session.stalled:
            call.session.play(self.apology_pcm, 8000, "apology")
            await deferLater(self.reactor, seconds + 0.2, lambda: None)
            return
        playback_id = f"{FILE_PREFIX}apology-{call.call_id}"
        waiter = _PlaybackWaiter()
        self.register_playback(playback_id, waiter)
        try:
            await self.ari.play(call.call_id, f"sound:{self.apology_path()}", playback_id=playback_id)
            waiter.done.addTimeout(seconds + 3, self.reactor)
            await waiter.done
        finally:
            self.unregister_playback(playback_id)

    def blocking(self, function: Any, *args: Any) -> Deferred[Any]:
        """Run file I/O or encoding off the reactor thread (tests swap in a synchronous runner)."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.calls), **self.counters}
