"""Bringing a call up: which provider and context it gets, and the media leg that joins the caller.

**The choice.** ``AI_PROVIDER`` and ``AI_CONTEXT`` channel variables (set in the dialplan before
``Stasis()``; read from the StasisStart, else asked of Asterisk) pick the provider and the context;
a context may name its provider. A name that is not configured is logged and the default kept: a
typo in the dialplan must not cost the caller their call.

**The media leg.** A mixing bridge joins the caller's channel and an ExternalMedia channel whose
audio reaches this engine's media session (RTP, or AudioSocket over TCP). Asterisk keeps both alive
until they are removed, so :meth:`MediaLeg.close` removes whatever :meth:`MediaLeg.open` asked for,
however far it got. Should no audio come in on the leg for NO_AUDIO_SECONDS, the reason is
almost always the network between Asterisk and this host: the warning says what to check.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twisted_agent.ari.errors import ARIUnprocessable
from twisted_agent.calls.handback import gone_ok
from twisted_agent.calls.timer import Timer
from twisted_agent.media.rtp_endpoint import PeerNotAllowed

PRIME_SILENCE = bytes(320)  # one 20 ms frame ends Asterisk's wait for a first media frame after Answer()
VARIABLES = ("AI_PROVIDER", "AI_CONTEXT")


class SetupFailed(Exception):
    """The call could not be brought up; the text says which step."""


@dataclass
class Choice:
    """The provider and context of a call, and where each came from: "default", "channel variable"
    or "context" (the context names its provider)."""

    provider: str
    context: str
    provider_source: str = "default"
    context_source: str = "default"

    log: ClassVar[Logger] = Logger()

    @classmethod
    def made(cls, variables: dict[str, str], config: Any, providers: Collection[str], call_id: str) -> Choice:
        choice = cls(config.calls.default_provider, config.calls.default_context)
        provider = (variables.get("AI_PROVIDER") or "").strip()
        if provider:
            if provider in providers:
                choice.provider, choice.provider_source = provider, "channel variable"
            else:
                cls.log.warn("call {call_id}: AI_PROVIDER={value!r} is not a provider; using {default}",
                             call_id=call_id, value=provider, default=choice.provider)
        context = (variables.get("AI_CONTEXT") or "").strip()
        if context:
            if context in config.contexts:
                choice.context, choice.context_source = context, "channel variable"
            else:
                cls.log.warn("call {call_id}: AI_CONTEXT={value!r} is not a context; using {default}",
                             call_id=call_id, value=context, default=choice.context)
        named = config.contexts[choice.context].provider
        if choice.provider_source == "default" and named:
            choice.provider, choice.provider_source = named, "context"
        return choice

    @classmethod
    async def of_channel(cls, ari: Any, channel: Any, config: Any, providers: Collection[str]) -> Choice:
        """From the StasisStart's channel variables; those it lacks are asked of Asterisk."""
        variables = dict(channel.channelvars or {})
        wanted = [name for name in VARIABLES if name not in variables]
        if wanted:
            results = await DeferredList([ari.get_variable(channel.id, name) for name in wanted], consumeErrors=True)
            for name, (ok, value) in zip(wanted, results, strict=True):
                if ok and value:
                    variables[name] = value
        return cls.made(variables, config, providers, channel.id)


class MediaLeg:
    """The bridge, the ExternalMedia channel and the media session of one call."""

    log = Logger()

    def __init__(self, engine: Any, call_id: str, session_uuid: uuid.UUID) -> None:
        self._engine = engine
        self._ari = engine.ari
        self._config = engine.config
        self.call_id = call_id
        self.session_uuid = session_uuid
        self.bridge_id = f"ai-bridge-{call_id}"
        self.channel_id = f"ai-media-{call_id}"
        self.session: Any = None
        #: fires when the ExternalMedia channel's StasisStart has come (:meth:`channel_started`)
        self.started: Deferred[None] = Deferred()
        self._created_bridge = False
        self._requested_channel = False
        #: caller frames that came in on the leg
        self.frames = 0
        self._watch = Timer(engine.reactor)

    @property
    def waiting(self) -> bool:
        """The ExternalMedia channel was asked for and its StasisStart has not come yet."""
        return self._requested_channel and not self.started.called

    def channel_started(self) -> None:
        if not self.started.called:
            self.started.callback(None)

    async def open(self, call: Any) -> None:
        """Bridge the caller (answered) with a new media channel whose audio goes to ``call``."""
        engine, ari, config, media = self._engine, self._ari, self._config, self._config.media
        await ari.create_bridge(self.bridge_id, "mixing", name=f"ai-agent {self.call_id}")
        self._created_bridge = True
        self.session = engine.media.create_session(self.call_id, session_uuid=self.session_uuid)
        self.session.set_consumer(call)
        engine.expect_media_channel(self.channel_id, call)
        self._requested_channel = True  # from here on, close() deletes the media channel (404 if never made)
        host = f"{media.advertise_host}:{engine.media_port()}"
        if media.transport == "externalmedia":
            response = await ari.external_media(app=config.ari.app, channel_id=self.channel_id,
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
            await ari.external_media(app=config.ari.app, channel_id=self.channel_id, external_host=host,
                                     format=media.audiosocket_format, encapsulation="audiosocket",
                                     transport="tcp", data=str(self.session_uuid))
        # Adding the media channel before its own StasisStart gives 422 (PROTOCOLS.md §6).
        timeout = config.calls.setup_timeout
        self.started.addTimeout(timeout, engine.reactor)
        try:
            await self.started
        except TimeoutError:
            raise SetupFailed(f"Asterisk did not start the media channel within {timeout:g}s") from None
        for attempt in range(5):
            try:
                # the caller's keys come as ChannelDtmfReceived; kept out of the bridge, they do not
                # reach the media leg as well (RFC 4733 packets, or AudioSocket DTMF frames: twice)
                await ari.add_channel(self.bridge_id, [self.call_id, self.channel_id], absorb_dtmf=True)
                break
            except ARIUnprocessable:
                # "not in Stasis": only possible when its start was inferred after an ARI outage
                if attempt == 4:
                    raise
                await deferLater(engine.reactor, 0.05, lambda: None)
        self.session.play(PRIME_SILENCE, 8000, "prime")
        if config.calls.no_audio_seconds:
            self._watch.start(config.calls.no_audio_seconds, self._no_audio)

    def _no_audio(self) -> None:
        if self.frames == 0:
            self._engine.count("no_audio")
            self.log.warn(
                "call {call_id}: no audio from Asterisk {seconds:g}s after bridging. If the caller spoke, check "
                "that Asterisk can reach {advertise}:{port} (RTP_ADVERTISE_HOST, firewall: UDP/TCP from Asterisk to "
                "this host) and that ExternalMedia's external_host is this machine",
                call_id=self.call_id, seconds=self._config.calls.no_audio_seconds,
                advertise=self._config.media.advertise_host, port=self._engine.media_port())

    def stop_watching(self) -> None:
        """The call is ending: no audio is no longer news."""
        self._watch.cancel()

    async def close(self) -> None:
        """Remove what :meth:`open` made, as far as it got; never raises."""
        if self.session is not None:
            self.session.close()
        self._engine.forget_media_channel(self.channel_id)
        if self._requested_channel:
            await gone_ok(self._ari.hangup(self.channel_id), self.log, self.call_id)
        if self._created_bridge:
            await gone_ok(self._ari.destroy_bridge(self.bridge_id), self.log, self.call_id)
