"""The ``openai_realtime`` provider: one OpenAI Realtime session per call over a WebSocket.

The model hears every caller frame (μ-law at 8 kHz, or 24 kHz PCM resampled here) and detects the
caller's turns itself (server VAD); it answers with audio deltas that go to the engine as one
utterance per assistant item. When the caller talks over it the server says
``input_audio_buffer.speech_started``; the engine stops playback and calls :meth:`interrupt` with
what the caller heard, and we tell the server (``response.cancel`` and ``conversation.item.truncate``)
so the conversation it remembers is the one the caller heard. GA and beta differ only in names
(see :mod:`twisted_agent.providers.openai_events`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_agent.config import AgentConfig
from twisted_agent.media.codecs import StreamResampler, ulaw_encode
from twisted_agent.providers import openai_events as api
from twisted_agent.providers.base import ICallInfo, IProvider, IProviderFactory, ProviderError, ProviderReadiness
from twisted_agent.providers.cloud import CloudSocket, ContinuousAudio, ICloudListener, connect

#: How long close() waits for the WebSocket closing handshake before it drops the connection.
CLOSE_TIMEOUT = 2.0
#: A spoken line (check-in, goodbye) is done at its response's end; past this it is given up on.
SPEAK_TIMEOUT = 30.0


@dataclass
class _Speak:
    done: Deferred[None]
    timer: IDelayedCall | None = None
    response_id: str | None = None


@implementer(IProvider, ICloudListener)
class RealtimeProvider:
    name = "openai_realtime"
    wants_turn_taking = False
    log = Logger()

    def __init__(self, reactor: Any, config: AgentConfig) -> None:
        self._reactor = reactor
        self.settings = config.providers.openai_realtime
        self._timeout = config.providers.cloud_connect_timeout
        self.family = api.FAMILIES[self.settings.api]
        self.audio_format = api.AUDIO_FORMATS[self.settings.audio]
        self._upsample = StreamResampler(8000, 24000) if self.audio_format is api.PCM16 else None
        self._audio = ContinuousAudio(reactor, self._send_frame)
        self.speak_timeout = SPEAK_TIMEOUT
        self.call: Any = None
        self.call_id = ""
        self._socket: CloudSocket | None = None
        self._starting: Deferred[None] | None = None
        self._waiting: dict[str, Deferred[dict[str, Any]]] = {}
        self._early: dict[str, dict[str, Any]] = {}
        self._ready = False
        self._closed = False
        self._failed = False
        self._lost = False
        self._last_error = ""
        self._response: str | None = None  # the response in progress, as far as we know
        self._cancelled: set[str] = set()  # responses we cancelled: their late deltas are dropped
        self._items: dict[str, api.ReplyItem] = {}
        self._requested: list[_Speak | None] = []  # our response.create events not yet answered, in order
        self._speaking: list[_Speak] = []
        self._tools_open = 0
        self._tool_outputs: list[dict[str, Any]] = []
        self._turn_ended_at: float | None = None
        self._handlers = {
            "session.created": self._session_event,
            "session.updated": self._session_event,
            "error": self._error,
            "input_audio_buffer.speech_started": self._speech_started,
            "input_audio_buffer.speech_stopped": self._speech_stopped,
            "conversation.item.input_audio_transcription.completed": self._caller_transcript,
            "response.created": self._response_created,
            "response.output_item.added": self._item_added,
            self.family.audio_delta: self._audio_delta,
            self.family.audio_done: self._audio_done,
            self.family.transcript_delta: self._transcript_delta,
            self.family.transcript_done: self._transcript_done,
            "response.function_call_arguments.done": self._function_call,
            "response.done": self._response_done,
        }

    # --- IProvider -------------------------------------------------------------------------------

    def start(self, call: ICallInfo) -> Deferred[None]:
        self.call = call
        self.call_id = call.call_id
        self._starting = Deferred.fromCoroutine(self._start(call))
        return self._starting

    async def _start(self, call: ICallInfo) -> None:
        deadline = self._reactor.seconds() + self._timeout
        url = api.realtime_url(self.settings.url, self.settings.model)
        try:
            try:
                self._socket = await connect(self._reactor, api.SERVICE, url, api.handshake_headers(self.settings),
                                             self, self._timeout)
            except ProviderError as e:
                if re.search(r"\b401\b", str(e)):
                    raise ProviderError(f"{api.SERVICE} refused the API key (HTTP 401): check OPENAI_API_KEY") from None
                raise
            await self._expect("session.created", deadline)
            self._send(api.session_update(self.settings, call.context))
            await self._expect("session.updated", deadline)
        except BaseException:
            self._drop_socket()
            raise
        self._ready = True
        self._audio.start()
        self.log.info("call {call_id}: {service} session ready ({api}, {audio}, model {model})",
                      call_id=self.call_id, service=api.SERVICE, api=self.family.name, audio=self.audio_format.name,
                      model=self.settings.model)
        greeting = call.context.greeting
        if greeting:
            self._requested.append(None)
            self._send(api.say_exactly(greeting))

    def _expect(self, event_type: str, deadline: float) -> Deferred[dict[str, Any]]:
        """The next ``event_type`` from the server, by ``deadline``; it may have come already."""
        if event_type in self._early:
            return succeed(self._early.pop(event_type))
        waiting: Deferred[dict[str, Any]] = Deferred()
        self._waiting[event_type] = waiting

        def timed_out(failure: Any) -> Any:
            self._waiting.pop(event_type, None)
            if failure.check(TimeoutError):
                raise ProviderError(f"{api.SERVICE} sent no {event_type} within {self._timeout:g}s")
            return failure

        waiting.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)
        return waiting.addErrback(timed_out)

    def push_audio(self, frame: bytes) -> None:
        if not self._ready or self._closed:
            return
        self._audio.push(frame)

    def _send_frame(self, frame: bytes) -> None:
        if not self._ready or self._closed:
            return
        data = self._upsample.process(frame) if self._upsample is not None else ulaw_encode(frame)
        self._send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode("ascii")})

    def speech_started(self) -> None:
        pass  # the server's VAD decides turns; input_audio_buffer.speech_started is what counts

    def speech_ended(self) -> None:
        pass

    def end_of_turn(self) -> Deferred[None]:
        return succeed(None)  # never called: wants_turn_taking is False

    def interrupt(self, heard_ms_by_utterance: dict[str, int]) -> Deferred[None]:
        if not self._ready or self._closed:
            return succeed(None)
        if self._response is not None and self._response not in self._cancelled:
            # with interrupt_response the server often has cancelled it already; then this only
            # earns a harmless response_cancel_not_active error
            self._cancelled.add(self._response)
            self._send({"type": "response.cancel", "response_id": self._response})
        for utterance_id, heard_ms in heard_ms_by_utterance.items():
            item = self._items.get(utterance_id)
            if item is None or item.truncated:
                continue  # not ours (a filler, a sound) or already cut
            item.truncated = True
            # the server refuses a truncation past the audio it sent; what the caller heard cannot exceed it
            end_ms = max(0, min(int(heard_ms), item.received_ms(self.audio_format)))
            self.log.info("call {call_id}: caller heard {ms} ms of {item_id}", call_id=self.call_id, ms=end_ms,
                          item_id=item.id)
            self._send({"type": "conversation.item.truncate", "item_id": item.id, "content_index": 0,
                        "audio_end_ms": end_ms})
        return succeed(None)

    def speak(self, text: str) -> Deferred[None]:
        if not self._ready or self._closed:
            return succeed(None)
        waiter = _Speak(Deferred(lambda d: self._forget_speak(waiter)))
        waiter.timer = self._reactor.callLater(self.speak_timeout, self._speak_timed_out, waiter)
        self._speaking.append(waiter)
        self._requested.append(waiter)
        self._send(api.say_exactly(text))
        return waiter.done

    def dtmf(self, digit: str) -> None:
        if not self._ready or self._closed:
            return
        # A note in the conversation, not a response.create: a digit is rarely a whole turn (the
        # caller may be keying a number), and a response started now would talk over the caller or
        # collide with one in progress. The model takes it into account when the caller's turn ends.
        self._send(api.caller_text(f"The caller pressed {digit} on the keypad."))

    def close(self) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        self._closed = True
        self._ready = False
        self._audio.stop()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for waiting in list(self._waiting.values()):
            waiting.cancel()
        for waiter in list(self._speaking):
            self._finish_speak(waiter)
        socket, self._socket = self._socket, None
        if socket is None or self._lost:
            return succeed(None)
        closed: Deferred[None] = Deferred()

        def gone(result: Any) -> Any:
            if not closed.called:
                closed.callback(None)
            return result  # is_closed is autobahn's: leave its result as it was

        socket.is_closed.addBoth(gone)
        socket.close()

        def too_slow(failure: Any) -> None:
            failure.trap(TimeoutError)
            socket.dropConnection(abort=True)

        self.log.info("call {call_id}: closing the {service} session", call_id=self.call_id, service=api.SERVICE)
        return closed.addTimeout(CLOSE_TIMEOUT, self._reactor).addErrback(too_slow)

    # --- ICloudListener ----------------------------------------------------------------------------

    def message(self, body: dict[str, Any]) -> None:
        if self._closed:
            return
        handler = self._handlers.get(str(body.get("type")))
        if handler is None:
            return  # rate_limits.updated, conversation.item.*, content parts: nothing to do
        try:
            handler(body)
        except Exception:
            self.log.failure("call {call_id}: cannot handle {service} event {type}", call_id=self.call_id,
                             service=api.SERVICE, type=body.get("type"))

    def audio(self, data: bytes) -> None:
        self.log.warn("call {call_id}: ignoring a binary frame from {service}", call_id=self.call_id,
                      service=api.SERVICE)

    def lost(self, reason: str) -> None:
        self._lost = True
        if self._closed:
            return
        if self._last_error:
            reason = f"{reason} (last error: {self._last_error})"
        if self._waiting:
            for waiting in list(self._waiting.values()):
                waiting.errback(ProviderError(reason))
            return
        self._fail(reason)

    # --- server events ---------------------------------------------------------------------------

    def _session_event(self, body: dict[str, Any]) -> None:
        waiting = self._waiting.pop(body["type"], None)
        if waiting is not None:
            waiting.callback(body)
        elif not self._ready:
            self._early[body["type"]] = body

    def _error(self, body: dict[str, Any]) -> None:
        error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
        message = str(error.get("message") or "unknown error")
        code = error.get("code")
        text = f"{api.SERVICE} error{f' {code}' if code else ''}: {message}"
        self._last_error = text
        self.log.warn("call {call_id}: {text}", call_id=self.call_id, text=text, error=error)
        if self._waiting:  # the session could not be set up
            for waiting in list(self._waiting.values()):
                waiting.errback(ProviderError(f"{api.SERVICE} rejected the session: {message}"))
            return
        if code == "conversation_already_has_active_response" and self._requested:
            # one of our response.create events was refused: nothing will answer it
            waiter = self._requested.pop(0)
            if waiter is not None:
                self._finish_speak(waiter)
        if api.is_fatal(error):
            self._fail(text)
        else:
            self._events().error(text, False)

    def _speech_started(self, body: dict[str, Any]) -> None:
        self._events().user_speech_started()

    def _speech_stopped(self, body: dict[str, Any]) -> None:
        self._turn_ended_at = self._reactor.seconds()

    def _caller_transcript(self, body: dict[str, Any]) -> None:
        text = str(body.get("transcript") or "").strip()
        if text:
            self._events().transcript(text, True)

    def _response_created(self, body: dict[str, Any]) -> None:
        response_id = str(body.get("response", {}).get("id", ""))
        self._response = response_id
        if self._requested:
            waiter = self._requested.pop(0)
            if waiter is not None:
                waiter.response_id = response_id

    def _item_added(self, body: dict[str, Any]) -> None:
        item = body.get("item") or {}
        if item.get("type") == "message" and item.get("id"):
            self._item(str(item["id"]), str(body.get("response_id", "")))

    def _item(self, item_id: str, response_id: str) -> api.ReplyItem:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = api.ReplyItem(item_id, response_id)
        return item

    def _dropped(self, body: dict[str, Any]) -> api.ReplyItem | None:
        """The item a delta belongs to, or None when the delta belongs to audio the caller cut off."""
        if body.get("response_id") in self._cancelled:
            return None
        item = self._item(str(body.get("item_id", "")), str(body.get("response_id", "")))
        return None if item.truncated else item

    def _audio_delta(self, body: dict[str, Any]) -> None:
        item = self._dropped(body)
        if item is None:
            return
        try:
            data = base64.b64decode(body.get("delta", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self.log.warn("call {call_id}: audio delta for {item_id} is not base64", call_id=self.call_id,
                          item_id=item.id)
            return
        if not data:
            return
        if item.received == 0 and self._turn_ended_at is not None:
            self._events().timing("first_audio", (self._reactor.seconds() - self._turn_ended_at) * 1000)
            self._turn_ended_at = None
        item.received += len(data)
        pcm = item.to_pcm(data, self.audio_format)
        if pcm:
            self._events().agent_audio(pcm, self.audio_format.rate, item.id)

    def _audio_done(self, body: dict[str, Any]) -> None:
        item = self._dropped(body)
        if item is not None:
            item.audio_done = True
            if item.transcript_done:
                self._end_item(item)

    def _transcript_delta(self, body: dict[str, Any]) -> None:
        item = self._dropped(body)
        if item is not None:
            item.transcript.append(str(body.get("delta", "")))

    def _transcript_done(self, body: dict[str, Any]) -> None:
        item = self._dropped(body)
        if item is None:
            return
        item.transcript = [str(body.get("transcript", "".join(item.transcript)))]
        item.transcript_done = True
        self._send_text(item)
        if item.audio_done:
            self._end_item(item)

    def _send_text(self, item: api.ReplyItem) -> None:
        text = "".join(item.transcript).strip()
        if not item.text_sent and text:
            item.text_sent = True
            self._events().agent_text(text, item.id)

    def _end_item(self, item: api.ReplyItem) -> None:
        """Its text (once) then the end of its audio: the engine hears of a reply before it ends."""
        self._send_text(item)
        if not item.ended:
            item.ended = True
            if item.received:
                self._events().utterance_end(item.id)

    def _response_done(self, body: dict[str, Any]) -> None:
        response = body.get("response") or {}
        response_id = str(response.get("id", ""))
        status = response.get("status")
        for item in list(self._items.values()):
            if item.response_id == response_id:
                self._end_item(item)
        if self._response == response_id:
            self._response = None
        if status == "failed":
            details = response.get("status_details") or {}
            error = details.get("error") or {}
            self._events().error(f"{api.SERVICE} response failed: {error.get('message') or error or 'no detail'}",
                                 False)
        for waiter in list(self._speaking):
            if waiter.response_id == response_id:
                self._finish_speak(waiter)
        self._flush_tools()

    # --- tools -----------------------------------------------------------------------------------

    def _function_call(self, body: dict[str, Any]) -> None:
        call_id, tool = str(body.get("call_id", "")), str(body.get("name", ""))
        self.log.info("call {call_id}: the model calls {tool}", call_id=self.call_id, tool=tool,
                      arguments=body.get("arguments"))
        self._tools_open += 1
        action = api.TOOL_ACTIONS.get(tool)
        try:
            arguments = json.loads(body.get("arguments") or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError) as e:
            self._tool_done(call_id, {"ok": False, "error": f"the arguments are not a JSON object: {e}"})
            return
        if action is None:
            self._tool_done(call_id, {"ok": False, "error": f"unknown tool {tool!r}"})
            return
        asking = self._events().tool_request(action, arguments)
        asking.addCallbacks(
            lambda result: self._tool_done(call_id, api.tool_output(result)),
            lambda failure: self._tool_done(call_id, {"ok": False, "error": failure.getErrorMessage()}))

    def _tool_done(self, call_id: str, output: dict[str, Any]) -> None:
        self._tools_open -= 1
        if self._closed:
            return
        self._tool_outputs.append(api.function_output(call_id, json.dumps(output)))
        self._flush_tools()

    def _flush_tools(self) -> None:
        """Send the outputs and ask for the follow-up once the response that called is over and every
        call has its answer: the server refuses a response.create while one is in progress."""
        if self._response is not None or self._tools_open or not self._tool_outputs or not self._ready:
            return
        outputs, self._tool_outputs = self._tool_outputs, []
        for output in outputs:
            self._send(output)
        self._requested.append(None)
        self._send({"type": "response.create"})

    # --- helpers ---------------------------------------------------------------------------------

    def _events(self) -> Any:
        return self.call.events

    def _send(self, body: dict[str, Any]) -> None:
        if self._socket is not None and not self._lost:
            self._socket.send_json(body)

    def _fail(self, reason: str) -> None:
        """The one fatal error of the session: the engine apologises and ends our part."""
        if self._failed or self._closed:
            return
        self._failed = True
        self._ready = False
        self.log.warn("call {call_id}: {service} failed: {reason}", call_id=self.call_id, service=api.SERVICE,
                      reason=reason)
        self._events().error(reason, True)

    def _drop_socket(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None and not self._lost:
            socket.close()

    def _speak_timed_out(self, waiter: _Speak) -> None:
        waiter.timer = None
        self.log.warn("call {call_id}: no end of a spoken line after {seconds:g}s", call_id=self.call_id,
                      seconds=self.speak_timeout)
        self._finish_speak(waiter)

    def _forget_speak(self, waiter: _Speak) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        if waiter in self._speaking:
            self._speaking.remove(waiter)

    def _finish_speak(self, waiter: _Speak) -> None:
        self._forget_speak(waiter)
        if not waiter.done.called:
            waiter.done.callback(None)


@implementer(IProviderFactory)
class RealtimeFactory:
    name = "openai_realtime"

    def __init__(self, reactor: Any, config: AgentConfig) -> None:
        self._reactor = reactor
        self._config = config

    def readiness(self) -> ProviderReadiness:
        settings = self._config.providers.openai_realtime
        if not settings.api_key:
            return ProviderReadiness(self.name, False, "OPENAI_API_KEY is not set",
                                     "set OPENAI_API_KEY in the service's EnvironmentFile")
        return ProviderReadiness(self.name, True, f"API key set ({settings.model}, {settings.api} interface, "
                                                  f"{settings.audio}); the connection is checked per call")

    def when_ready(self) -> Deferred[None]:
        return succeed(None)  # nothing to start: ready when configured (readiness says whether it is)

    def create(self) -> RealtimeProvider:
        return RealtimeProvider(self._reactor, self._config)

