"""The ``deepgram`` provider: one call's conversation held by the Deepgram Voice Agent (V1 API).

Deepgram listens, thinks and speaks; we only carry audio and act on its function calls. Audio is
G.711 μ-law at 8 kHz both ways (what the phone line carries), so nothing is resampled here. The
agent detects the caller's turns itself (``wants_turn_taking = False``): every caller frame goes
up, ungated, and its ``UserStartedSpeaking`` is our barge-in signal.

Flow: connect (``Authorization: Token``) -> ``Welcome`` -> we send ``Settings`` -> ``SettingsApplied``
-> ready. Then binary frames both ways; ``AgentStartedSpeaking`` .. ``AgentAudioDone`` bracket one
utterance of the agent; ``FunctionCallRequest`` maps ``hang_up``/``transfer`` to the engine's tools.
The protocol reference is ../shared/reference/PROTOCOLS.md §2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_agent.config import AgentConfig
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.providers.base import (
    ICallInfo,
    IProvider,
    IProviderFactory,
    ProviderError,
    ProviderReadiness,
    ToolResult,
)
from twisted_agent.providers.cloud import CloudSocket, ContinuousAudio, ICloudListener, connect

__all__ = ["FUNCTIONS", "DeepgramFactory", "DeepgramProvider", "settings_message"]

SERVICE = "Deepgram"
RATE = 8000
#: Deepgram asks for one KeepAlive every 8 s while no audio is streamed (agent-keep-alive docs)
KEEPALIVE_INTERVAL = 8.0
#: how long close() waits for the server's closing handshake before dropping the TCP connection
CLOSE_TIMEOUT = 1.5
#: a speak() whose injected message never finishes (nor is refused) still fires after this long
SPEAK_TIMEOUT = 30.0

#: client-side functions (no ``endpoint``): Deepgram asks us to run them with FunctionCallRequest
FUNCTIONS: list[dict[str, Any]] = [
    {
        "name": "hang_up",
        "description": "End the phone call. Use it after saying goodbye, when the caller is done or asks to hang up.",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
    {
        "name": "transfer",
        "description": "Transfer the caller to a human. Use it when the caller asks for a person or you cannot help.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "why the caller wants or needs a human"}},
            "required": [],
        },
    },
]
#: Deepgram's function names -> the engine's tool names
TOOLS = {"hang_up": "hangup", "transfer": "transfer"}
#: AgentStartedSpeaking latencies (seconds) -> the engine's timing stages (ms)
LATENCIES = {"total_latency": "voice_to_voice_server", "ttt_latency": "llm_first_token",
             "tts_latency": "tts_first_byte"}


def settings_message(config: AgentConfig, context: Any) -> dict[str, Any]:
    """The ``Settings`` message for one call: telephony audio both ways and the context's agent."""
    deepgram = config.providers.deepgram
    agent: dict[str, Any] = {
        "listen": {"provider": {"type": "deepgram", "model": deepgram.listen_model}},
        "think": {
            "provider": {"type": deepgram.think_provider, "model": deepgram.think_model},
            "prompt": context.system_prompt,
            "functions": FUNCTIONS,
        },
        "speak": {"provider": {"type": "deepgram", "model": deepgram.speak_model}},
    }
    if context.greeting:
        agent["greeting"] = context.greeting
    if context.language:
        agent["language"] = context.language
    return {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "mulaw", "sample_rate": RATE},
            "output": {"encoding": "mulaw", "sample_rate": RATE, "container": "none"},
        },
        "agent": agent,
    }


@dataclass
class _Speech:
    """An injected agent message: ``done`` fires once it was spoken, refused or cut off."""

    done: Deferred[None]
    turns_before: int
    timer: IDelayedCall | None = None


@implementer(IProvider, ICloudListener)
class DeepgramProvider:
    """One call. The provider is also its socket's listener: the socket stays thin, the logic is here."""

    name = "deepgram"
    wants_turn_taking = False
    log = Logger()

    def __init__(self, reactor: Any, config: AgentConfig, *, keepalive_interval: float = KEEPALIVE_INTERVAL,
                 close_timeout: float = CLOSE_TIMEOUT, speak_timeout: float = SPEAK_TIMEOUT) -> None:
        self._reactor = reactor
        self._config = config
        self._keepalive_interval = keepalive_interval
        self._close_timeout = close_timeout
        self._speak_timeout = speak_timeout
        self._audio = ContinuousAudio(reactor, self._send_frame)
        self.call: Any = None
        self.call_id = ""
        self.request_id = ""
        self._socket: CloudSocket | None = None
        self._starting: Deferred[None] | None = None
        self._welcome: Deferred[None] | None = None
        self._applied: Deferred[None] | None = None
        self._ready = False
        self._failed = False
        self._closed = False
        self._close_started = False
        self._close_waiters: list[Deferred[None]] = []
        self._last_sent = 0.0
        self._keepalive: IDelayedCall | None = None
        self._utterances = 0
        self._utterance: str | None = None
        self._utterance_has_audio = False
        # audio of an interrupted agent turn that is still arriving: dropped until the next turn
        self._dropping = False
        self._turns_started = 0
        self._speeches: list[_Speech] = []

    # --- IProvider ---------------------------------------------------------------------------

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        self.call_id = call.call_id
        self._starting = Deferred.fromCoroutine(self._start(call))
        return self._starting

    async def _start(self, call: ICallInfo) -> None:
        deepgram = self._config.providers.deepgram
        timeout = self._config.providers.cloud_connect_timeout
        deadline = self._reactor.seconds() + timeout
        self._welcome, self._applied = Deferred(), Deferred()
        headers = {"Authorization": f"Token {deepgram.api_key}"}
        self.log.info("call {call_id}: connecting to Deepgram at {url}", call_id=self.call_id, url=_where(deepgram.url))
        try:
            self._socket = await connect(self._reactor, SERVICE, deepgram.url, headers, self, timeout)
        except ProviderError as e:
            raise ProviderError(_explain_refusal(str(e))) from None
        try:
            await self._bounded(self._welcome, deadline, "Welcome")
            self._socket.send_json(settings_message(self._config, call.context))
            await self._bounded(self._applied, deadline, "SettingsApplied")
        except BaseException:
            self._abandon()
            raise
        self._ready = True
        self._audio.start()
        self._last_sent = self._reactor.seconds()
        self._keepalive = self._reactor.callLater(self._keepalive_interval, self._keepalive_due)
        self.log.info("call {call_id}: Deepgram session {request_id} ready", call_id=self.call_id,
                      request_id=self.request_id)

    async def _bounded(self, waiting: Deferred[None], deadline: float, what: str) -> None:
        waiting.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)
        try:
            await waiting
        except TimeoutError:
            timeout = self._config.providers.cloud_connect_timeout
            raise ProviderError(f"{SERVICE} sent no {what} within {timeout:g}s") from None

    def _abandon(self) -> None:
        """A start that failed or was cancelled: drop the socket, hear nothing more."""
        self._closed = True
        self._stop_timers()
        if self._socket is not None:
            self._socket.dropConnection(abort=True)  # lost() follows; ignored, as we are closed

    def _live(self) -> CloudSocket | None:
        """The socket while the session is up: after SettingsApplied, before a failure or close()."""
        return self._socket if self._ready and not self._closed and not self._failed else None

    def push_audio(self, frame: bytes) -> None:
        # (before SettingsApplied Deepgram would take audio in a format it does not know yet: dropped)
        if self._live():
            self._audio.push(frame)

    def _send_frame(self, frame: bytes) -> None:
        if socket := self._live():
            socket.send_audio(ulaw_encode(frame))
            self._last_sent = self._reactor.seconds()

    def speech_started(self) -> None:
        pass  # Deepgram detects the caller's speech itself (UserStartedSpeaking)

    def speech_ended(self) -> None:
        pass

    def end_of_turn(self) -> Deferred[None]:
        return succeed(None)  # never called: Deepgram ends turns itself

    def interrupt(self, heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        # Deepgram handles its side of a barge-in itself; we only stop forwarding what is in flight
        self._cut_off()
        return succeed(None)

    def speak(self, text: str) -> Deferred[None]:
        socket = self._live()
        if socket is None:
            return succeed(None)
        speech = _Speech(Deferred(lambda d: self._forget(speech)), self._turns_started)
        speech.timer = self._reactor.callLater(self._speak_timeout, self._speech_timed_out, speech)
        self._speeches.append(speech)
        socket.send_json({"type": "InjectAgentMessage", "message": text})
        return speech.done

    def dtmf(self, digit: str) -> None:
        # V1 has no key-press message; told as the caller's words, the agent can act on menus and PINs
        if socket := self._live():
            socket.send_json({"type": "InjectUserMessage", "content": f"The caller pressed {digit} on the keypad."})

    def close(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        if not self._close_started:
            self._shut()
        elif self._socket_gone():
            self._closing_done()
        return waiter

    def _shut(self) -> None:
        self._close_started = True
        self._closed = True
        self._stop_timers()
        self._finish_speeches(self._speeches)
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()  # the start fails with CancelledError; its coroutine drops the socket
        socket = self._socket
        if socket is None or self._socket_gone():
            self._closing_done()
            return
        self.log.info("call {call_id}: closing the Deepgram session", call_id=self.call_id)
        bound = self._reactor.callLater(self._close_timeout, socket.dropConnection, abort=True)

        def gone(result: object) -> object:
            if bound.active():
                bound.cancel()
            self._closing_done()
            return result

        socket.is_closed.addBoth(gone)
        socket.close()

    def _socket_gone(self) -> bool:
        return self._socket is None or bool(self._socket.is_closed.called)

    def _closing_done(self) -> None:
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    # --- ICloudListener ----------------------------------------------------------------------

    def message(self, body: dict[str, Any]) -> None:
        if self._closed or self._failed:
            return
        kind = body.get("type")
        handler = self._handlers.get(str(kind))
        if handler is None:
            self.log.debug("call {call_id}: Deepgram {kind}", call_id=self.call_id, kind=kind)
            return
        with self.log.failuresHandled("call {call_id}: handling Deepgram {kind} failed", call_id=self.call_id,
                                      kind=kind):
            handler(self, body)

    def audio(self, data: bytes) -> None:
        if self._closed or self._failed or self._dropping or not self._ready:
            return
        utterance_id = self._utterance or self._begin_utterance()
        self._utterance_has_audio = True
        self.call.events.agent_audio(ulaw_decode(data), RATE, utterance_id)

    def lost(self, reason: str) -> None:
        if self._closed:
            return
        if not self._ready:
            self._fail_start(ProviderError(reason))
            return
        self._fail(reason)

    # --- server messages ---------------------------------------------------------------------

    def _on_welcome(self, body: dict[str, Any]) -> None:
        self.request_id = str(body.get("request_id") or body.get("session_id") or "")
        if self._welcome is not None and not self._welcome.called:
            self._welcome.callback(None)

    def _on_settings_applied(self, body: dict[str, Any]) -> None:
        if self._applied is not None and not self._applied.called:
            self._applied.callback(None)

    def _on_error(self, body: dict[str, Any]) -> None:
        description = str(body.get("description") or body.get("message") or "unknown error")
        code = body.get("code")
        message = f"{description} ({code})" if code else description
        if not self._ready:
            self._fail_start(ProviderError(f"{SERVICE} rejected the session: {message}"))
        else:
            self._fail(f"{SERVICE} error: {message}")

    def _on_warning(self, body: dict[str, Any]) -> None:
        self.log.warn("call {call_id}: Deepgram warning: {description} ({code})", call_id=self.call_id,
                      description=body.get("description"), code=body.get("code"))

    def _on_user_started_speaking(self, body: dict[str, Any]) -> None:
        self._cut_off()
        self.call.events.user_speech_started()

    def _on_agent_started_speaking(self, body: dict[str, Any]) -> None:
        self._dropping = False
        self._turns_started += 1
        if self._utterance is not None and self._utterance_has_audio:
            self._end_utterance()  # the previous turn's AgentAudioDone never came
        if self._utterance is None:
            self._begin_utterance()
        for field, stage in LATENCIES.items():
            value = body.get(field)
            # the greeting comes with zeros: not a measurement
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                self.call.events.timing(stage, float(value) * 1000)

    def _on_agent_audio_done(self, body: dict[str, Any]) -> None:
        if self._dropping:
            self._dropping = False  # the interrupted turn is over; its utterance already ended
        elif self._utterance is not None:
            self._end_utterance()
        self._finish_speeches([s for s in self._speeches if self._turns_started > s.turns_before])

    def _on_conversation_text(self, body: dict[str, Any]) -> None:
        role, content = body.get("role"), str(body.get("content", ""))
        if role == "user":
            self.call.events.transcript(content, True)
        elif role == "assistant":
            self.call.events.agent_text(content, self._utterance or self._begin_utterance())

    def _on_function_call_request(self, body: dict[str, Any]) -> None:
        functions = body.get("functions")
        if not isinstance(functions, list):
            self.log.warn("call {call_id}: FunctionCallRequest without functions: {body!r}", call_id=self.call_id,
                          body=body)
            return
        for function in functions:
            if isinstance(function, dict) and function.get("client_side", True):
                self._call_function(function)

    def _call_function(self, function: dict[str, Any]) -> None:
        call_id, name = str(function.get("id", "")), str(function.get("name", ""))
        tool = TOOLS.get(name)
        if tool is None:
            self.log.warn("call {call_id}: Deepgram asked for unknown function {name}", call_id=self.call_id,
                          name=name)
            self._respond(call_id, name, {"ok": False, "error": f"unknown function {name!r}"})
            return
        try:
            arguments = json.loads(function.get("arguments") or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments are not a JSON object")
        except (TypeError, ValueError) as e:
            self._respond(call_id, name, {"ok": False, "error": f"bad arguments: {e}"})
            return
        self.log.info("call {call_id}: Deepgram calls {name}({arguments})", call_id=self.call_id, name=name,
                      arguments=arguments)

        def done(result: ToolResult) -> None:
            self._respond(call_id, name, {"ok": result.ok, "detail": result.detail, **result.data})

        def failed(failure: Failure) -> None:
            self.log.failure("call {call_id}: tool {tool} failed", failure, call_id=self.call_id, tool=tool)
            self._respond(call_id, name, {"ok": False, "error": failure.getErrorMessage()})

        self.call.events.tool_request(tool, arguments).addCallbacks(done, failed)

    def _respond(self, call_id: str, name: str, content: dict[str, Any]) -> None:
        if socket := self._live():
            socket.send_json({"type": "FunctionCallResponse", "id": call_id, "name": name,
                              "content": json.dumps(content)})

    def _on_injection_refused(self, body: dict[str, Any]) -> None:
        self.log.info("call {call_id}: Deepgram refused to say {message!r} (someone is mid-turn)",
                      call_id=self.call_id, message=body.get("message"))
        self._finish_speeches(self._speeches[:1])

    _handlers: dict[str, Callable[[DeepgramProvider, dict[str, Any]], None]] = {
        "Welcome": _on_welcome,
        "SettingsApplied": _on_settings_applied,
        "Error": _on_error,
        "Warning": _on_warning,
        "UserStartedSpeaking": _on_user_started_speaking,
        "AgentStartedSpeaking": _on_agent_started_speaking,
        "AgentAudioDone": _on_agent_audio_done,
        "ConversationText": _on_conversation_text,
        "FunctionCallRequest": _on_function_call_request,
        "InjectionRefused": _on_injection_refused,
    }

    # --- utterances, speeches, timers, failure -----------------------------------------------

    def _begin_utterance(self) -> str:
        self._utterances += 1
        self._utterance = f"{self.call_id}-dg{self._utterances}"
        self._utterance_has_audio = False
        return self._utterance

    def _end_utterance(self) -> None:
        utterance_id, self._utterance = self._utterance, None
        if utterance_id is not None:
            self.call.events.utterance_end(utterance_id)

    def _cut_off(self) -> None:
        """Barge-in: the agent's current utterance ends here; its audio still arriving is dropped."""
        if self._utterance is None or self._closed or self._failed:
            return
        self._dropping = True
        self._end_utterance()
        self._finish_speeches([s for s in self._speeches if self._turns_started > s.turns_before])

    def _speech_timed_out(self, speech: _Speech) -> None:
        speech.timer = None
        self.log.warn("call {call_id}: an injected message got no answer from Deepgram in {timeout}s",
                      call_id=self.call_id, timeout=self._speak_timeout)
        self._finish_speeches([speech])

    def _forget(self, speech: _Speech) -> None:
        if speech.timer is not None and speech.timer.active():
            speech.timer.cancel()
        if speech in self._speeches:
            self._speeches.remove(speech)

    def _finish_speeches(self, speeches: list[_Speech]) -> None:
        for speech in list(speeches):
            self._forget(speech)
            if not speech.done.called:
                speech.done.callback(None)

    def _keepalive_due(self) -> None:
        self._keepalive = None
        socket = self._live()
        if socket is None:
            return
        idle = self._reactor.seconds() - self._last_sent
        if idle >= self._keepalive_interval:
            socket.send_json({"type": "KeepAlive"})
            self._last_sent = self._reactor.seconds()
            idle = 0.0
        self._keepalive = self._reactor.callLater(self._keepalive_interval - idle, self._keepalive_due)

    def _stop_timers(self) -> None:
        self._audio.stop()
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None

    def _fail_start(self, error: ProviderError) -> None:
        for waiting in (self._welcome, self._applied):
            if waiting is not None and not waiting.called:
                waiting.errback(error)
                return

    def _fail(self, message: str) -> None:
        """A fatal failure after start: told to the engine once; then the provider is silent."""
        if self._failed or self._closed:
            return
        self._failed = True
        self._stop_timers()
        self._finish_speeches(self._speeches)
        self.log.error("call {call_id}: Deepgram session failed: {message}", call_id=self.call_id, message=message)
        self.call.events.error(message, True)


@implementer(IProviderFactory)
class DeepgramFactory:
    name = "deepgram"

    def __init__(self, reactor: Any, config: AgentConfig, **provider_options: Any) -> None:
        self._reactor = reactor
        self._config = config
        self._options = provider_options

    def readiness(self) -> ProviderReadiness:
        deepgram = self._config.providers.deepgram
        if not deepgram.api_key:
            return ProviderReadiness("deepgram", False, "DEEPGRAM_API_KEY is not set",
                                     "set DEEPGRAM_API_KEY in the service's EnvironmentFile")
        return ProviderReadiness("deepgram", True, f"API key set; the connection to {_where(deepgram.url)} "
                                 "is checked per call")

    def when_ready(self) -> Deferred[None]:
        return succeed(None)  # nothing to start: ready when configured (readiness says whether it is)

    def create(self) -> DeepgramProvider:
        readiness = self.readiness()
        if not readiness.ready:
            raise ProviderError(f"provider deepgram is not available: {readiness.detail}")
        return DeepgramProvider(self._reactor, self._config, **self._options)


def _explain_refusal(message: str) -> str:
    """A refused upgrade is almost always the key: say so, and which setting holds it."""
    if "refused the connection" in message and any(code in message for code in ("401", "403")):
        return f"{SERVICE} refused the API key (DEEPGRAM_API_KEY): {message}"
    return message


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
