"""A fake OpenAI Realtime server (PROTOCOLS §3, "A fake must"), for tests and the demo.

It speaks whichever interface the handshake picks (``OpenAI-Beta: realtime=v1``: beta, else GA),
holds one :class:`FakeSession` per connection, detects the caller's turns by the energy of the audio
it is sent, and answers each turn from a script: ``{"say": text}`` (tone audio from ``ToneVoice``,
streamed faster than real time), ``{"call": "hang_up" | "transfer", "arguments": {...}}``,
``{"drop": True}`` (abort the TCP connection) or ``{"error": {...}}`` (an ``error`` event; with
``"close": True`` the socket is closed too). With no steps left it says "You said something.".
A client that breaks the protocol gets the ``error`` event the real service sends, and a line in
``violations``, so a test fails on it.

Its own event names are written out here, not imported from the client, so a wrong name in either
shows up as a test failure.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from typing import Any

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twisted_agent.media.codecs import resample, ulaw_decode, ulaw_encode
from twisted_agent.providers.voices import ToneVoice

NAMES = {
    "ga": {"audio_delta": "response.output_audio.delta", "audio_done": "response.output_audio.done",
           "transcript_delta": "response.output_audio_transcript.delta",
           "transcript_done": "response.output_audio_transcript.done", "item_added": "conversation.item.added",
           "audio_part": "output_audio"},
    "beta": {"audio_delta": "response.audio.delta", "audio_done": "response.audio.done",
             "transcript_delta": "response.audio_transcript.delta",
             "transcript_done": "response.audio_transcript.done", "item_added": "conversation.item.created",
             "audio_part": "audio"},
}
SESSION_KEYS = {
    "ga": {"type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice", "max_output_tokens",
           "tracing", "truncation", "prompt", "include"},
    "beta": {"model", "modalities", "instructions", "voice", "input_audio_format", "output_audio_format",
             "input_audio_transcription", "input_audio_noise_reduction", "turn_detection", "tools", "tool_choice",
             "temperature", "max_response_output_tokens", "speed", "tracing"},
}
CLIENT_EVENTS = {"session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
                 "conversation.item.create", "conversation.item.retrieve", "conversation.item.truncate",
                 "conversation.item.delete", "response.create", "response.cancel"}
GA_FORMATS = ({"type": "audio/pcmu"}, {"type": "audio/pcm", "rate": 24000})
BETA_FORMATS = ("g711_ulaw", "pcm16")
DEFAULT_STEP = {"say": "You said something."}
SPEECH_RMS = 500.0  # ToneVoice and a spoken voice are far above; line noise and silence far below
CHUNK_MS = 100
CHUNK_INTERVAL = 0.05  # twice real time, as the service streams ahead of playback
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
              "create_response": True, "interrupt_response": True}


def _default_config(api: str, session_id: str, model: str) -> dict[str, Any]:
    if api == "beta":
        return {"id": session_id, "object": "realtime.session", "model": model, "modalities": ["text", "audio"],
                "instructions": "", "voice": "alloy", "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_transcription": None, "turn_detection": dict(SERVER_VAD), "tools": [],
                "tool_choice": "auto"}
    pcm = {"type": "audio/pcm", "rate": 24000}
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["audio"], "instructions": "", "tools": [], "tool_choice": "auto",
            "audio": {"input": {"format": dict(pcm), "transcription": None, "noise_reduction": None,
                                "turn_detection": dict(SERVER_VAD)},
                      "output": {"format": dict(pcm), "voice": "alloy", "speed": 1.0}}}


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Only the fields present change (§3); the audio containers merge, every other value is replaced."""
    for key, value in update.items():
        if key in ("audio", "input", "output") and isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class FakeSession:
    """One connection's conversation: what the client sent, the effective config, the script."""

    log = Logger()

    def __init__(self, fake: FakeRealtime, api: str, model: str, send: Any, drop: Any, close: Any) -> None:
        self.fake = fake
        self.api = api
        self.model = model
        self.names = NAMES[api]
        self._send, self._drop, self._close = send, drop, close
        self._ids = itertools.count(1)
        self.config = _default_config(api, self._id("sess"), model)
        self.received: list[dict[str, Any]] = []
        self.audio_bytes = 0
        self.violations: list[str] = []
        self.script: list[dict[str, Any]] = list(fake.script)
        self.sent_ms: dict[str, float] = {}  # audio sent per assistant item
        self.turns = 0
        self.speaking = False
        self._audio_ms = 0.0
        self._quiet_ms = 0.0
        self._caller_item = ""
        self._last_item: str | None = None
        self.response: dict[str, Any] | None = None  # the response streaming now
        self._timer: IDelayedCall | None = None
        self.calls: list[tuple[str, str]] = []  # (call_id, name) of every function call made
        self.pending_calls: set[str] = set()  # function calls without an output yet
        self.answered_calls: set[str] = set()  # outputs given, response.create not yet
        self.open = True

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    def send(self, event_type: str, **fields: Any) -> None:
        if self.open:
            self._send({"type": event_type, "event_id": self._id("event"), **fields})

    def error(self, message: str, code: str | None = None, param: str | None = None, *, client: dict[str, Any],
              violation: bool = True, kind: str = "invalid_request_error") -> None:
        if violation:
            self.violations.append(f"{client.get('type')}: {message}")
            self.log.warn("fake OpenAI Realtime: the client broke the protocol: {violation}",
                          violation=self.violations[-1])
        self.send("error", error={"type": kind, "code": code, "message": message, "param": param,
                                  "event_id": client.get("event_id")})

    # --- the client's events ---------------------------------------------------------------------

    def received_text(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.error("The client event is not a JSON object with a type", "invalid_json", client={})
            return
        self.received.append(event)
        kind = event["type"]
        if kind not in CLIENT_EVENTS:
            self.error(f"Invalid value: '{kind}'. Supported values are: {sorted(CLIENT_EVENTS)}", "invalid_value",
                       "type", client=event)
            return
        handler = getattr(self, "on_" + kind.replace(".", "_"), None)
        if handler is None:
            self.error(f"{kind} is not supported by this fake", "unsupported", client=event)
            return
        handler(event)

    def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            self.error("Missing required parameter: 'session'.", "missing_required_parameter", "session",
                       client=event)
            return
        unknown = sorted(set(session) - SESSION_KEYS[self.api])
        if unknown:
            self.error(f"Unknown parameter: 'session.{unknown[0]}'.", "unknown_parameter", f"session.{unknown[0]}",
                       client=event)
            return
        if self.api == "ga" and session.get("type") != "realtime":
            self.error("Missing required parameter: 'session.type'.", "missing_required_parameter", "session.type",
                       client=event)
            return
        problem = self._format_problem(session)
        if problem:
            self.error(problem, "invalid_value", client=event)
            return
        _merge(self.config, session)
        self.send("session.updated", session=self.config)

    def _format_problem(self, session: dict[str, Any]) -> str:
        if self.api == "beta":
            for key in ("input_audio_format", "output_audio_format"):
                if key in session and session[key] not in BETA_FORMATS:
                    return f"session.{key} {session[key]!r} is not a telephony format ({', '.join(BETA_FORMATS)})"
            return ""
        audio = session.get("audio") or {}
        for side in ("input", "output"):
            fmt = (audio.get(side) or {}).get("format")
            if fmt is not None and fmt not in GA_FORMATS:
                return f"session.audio.{side}.format {fmt!r} is not a telephony format {GA_FORMATS}"
        return ""

    def _setting(self, name: str) -> Any:
        """A config value by its beta name, read from wherever this interface keeps it."""
        if self.api == "beta":
            return self.config.get(name)
        audio = self.config["audio"]
        return {"input_audio_format": audio["input"]["format"], "output_audio_format": audio["output"]["format"],
                "turn_detection": audio["input"].get("turn_detection"),
                "input_audio_transcription": audio["input"].get("transcription")}[name]

    def _is_pcmu(self, name: str) -> bool:
        value = self._setting(name)
        return value == "g711_ulaw" or (isinstance(value, dict) and value.get("type") == "audio/pcmu")

    def on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        try:
            data = base64.b64decode(event.get("audio", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self.error("Invalid 'audio'. Expected base64-encoded audio.", "invalid_value", "audio", client=event)
            return
        self.audio_bytes += len(data)
        if self._is_pcmu("input_audio_format"):
            pcm, rate = ulaw_decode(data), 8000
        elif len(data) % 2:
            self.error("pcm16 audio must be whole 16-bit samples", "invalid_value", "audio", client=event)
            return
        else:
            pcm, rate = data, 24000
        self._vad(pcm, rate)

    def on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        pass  # only needed without VAD (§3); accepted

    def on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self.send("input_audio_buffer.cleared")

    def _vad(self, pcm: bytes, rate: int) -> None:
        vad = self._setting("turn_detection")
        samples = np.frombuffer(pcm, "<i2").astype(np.float64)
        duration = len(samples) * 1000 / rate
        self._audio_ms += duration
        if not vad or not len(samples):
            return
        loud = float(np.sqrt(np.mean(samples * samples))) > SPEECH_RMS
        if loud and not self.speaking:
            self.speaking, self._quiet_ms = True, 0.0
            self.turns += 1
            self._caller_item = self._id("item")
            start = max(0, int(self._audio_ms - duration) - int(vad.get("prefix_padding_ms", 0)))
            self.send("input_audio_buffer.speech_started", audio_start_ms=start, item_id=self._caller_item)
            if self.response is not None and vad.get("interrupt_response", True):
                self._cancel("turn_detected")
        elif loud:
            self._quiet_ms = 0.0
        elif self.speaking:
            self._quiet_ms += duration
            if self._quiet_ms >= self.fake.silence_ms:
                self._turn_ended(vad)

    def _turn_ended(self, vad: dict[str, Any]) -> None:
        self.speaking = False
        item_id = self._caller_item
        self.send("input_audio_buffer.speech_stopped", audio_end_ms=int(self._audio_ms - self._quiet_ms),
                  item_id=item_id)
        self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=self._last_item)
        self._item_added({"id": item_id, "type": "message", "role": "user", "status": "completed",
                          "content": [{"type": "input_audio", "transcript": None}]})
        if self._setting("input_audio_transcription"):
            self.send("conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0,
                      transcript=f"[caller turn {self.turns}]")
        if vad.get("create_response", True) and self.response is None:
            self._respond(self._next_step())

    def _item_added(self, item: dict[str, Any]) -> None:
        self.send(self.names["item_added"], previous_item_id=self._last_item, item={"object": "realtime.item", **item})
        self._last_item = item["id"]

    def on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") not in ("message", "function_call_output", "function_call"):
            self.error("Invalid 'item.type'.", "invalid_value", "item.type", client=event)
            return
        if item["type"] == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in self.pending_calls:
                self.error(f"No function call with call_id {call_id!r} awaits an output", "invalid_value",
                           "item.call_id", client=event)
                return
            if not isinstance(item.get("output"), str):
                self.error("Invalid 'item.output': expected a string.", "invalid_type", "item.output", client=event)
                return
            self.pending_calls.discard(call_id)
            self.answered_calls.add(call_id)
        elif item["type"] == "message" and (item.get("role") not in ("user", "assistant", "system")
                                            or not isinstance(item.get("content"), list)):
            self.error("A message item needs a role and a content list", "invalid_value", "item", client=event)
            return
        self._item_added({**item, "id": item.get("id") or self._id("item"), "status": "completed"})

    def on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        sent = self.sent_ms.get(str(item_id))
        record = {"item_id": item_id, "audio_end_ms": end_ms, "sent_ms": sent, "accepted": False}
        self.fake.truncations.append(record)
        if sent is None:
            self.error(f"Item with item_id '{item_id}' not found or has no audio", "item_not_found", "item_id",
                       client=event)
        elif event.get("content_index") != 0:
            self.error("Invalid 'content_index'.", "invalid_value", "content_index", client=event)
        elif not isinstance(end_ms, int) or end_ms < 0 or end_ms > sent:
            self.error(f"audio_end_ms {end_ms} is beyond the {sent:.0f} ms of audio of item {item_id}",
                       "invalid_value", "audio_end_ms", client=event)
        else:
            record["accepted"] = True
            self.send("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)

    def on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        wrong = "modalities" if self.api == "ga" else "output_modalities"
        if not isinstance(params, dict) or wrong in params:
            self.error(f"Unknown parameter: 'response.{wrong}'.", "unknown_parameter", f"response.{wrong}",
                       client=event)
            return
        if self.pending_calls:
            self.violations.append(f"response.create before the output of function calls {sorted(self.pending_calls)}")
        self.answered_calls.clear()
        if self.response is not None:
            self.error("Conversation already has an active response in progress", "conversation_already_has_active_"
                       "response", client=event)
            return
        instructions = str(params.get("instructions") or "")
        marker = instructions.find("Say exactly:")
        self._respond({"say": instructions[marker + len("Say exactly:"):].strip()} if marker >= 0
                      else self._next_step())

    def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted and wanted != self.response["id"]):
            self.error("Cancellation failed: no active response found", "response_cancel_not_active",
                       violation=False, client=event)
            return
        self._cancel("client_cancelled")

    # --- responses -------------------------------------------------------------------------------

    def _next_step(self) -> dict[str, Any]:
        return self.script.pop(0) if self.script else dict(DEFAULT_STEP)

    def _respond(self, step: dict[str, Any]) -> None:
        if "error" in step:
            self.send("error", error={"type": "invalid_request_error", "code": None, "param": None,
                                      "event_id": None, **step["error"]})
            if step.get("close"):
                self._close()
            return
        response_id = self._id("resp")
        self.send("response.created", response={"id": response_id, "object": "realtime.response",
                                                "status": "in_progress", "output": []})
        if step.get("drop"):
            self._drop()
            return
        if "call" in step:
            self._function_call(response_id, step)
            return
        text = str(step.get("say", ""))
        item_id = self._id("item")
        item: dict[str, Any] = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
                                "content": []}
        self.send("response.output_item.added", response_id=response_id, output_index=0, item=item)
        self._item_added(item)
        pcm = self.fake.voice.render(text)
        audio = ulaw_encode(pcm) if self._is_pcmu("output_audio_format") else resample(pcm, 8000, 24000)
        per_ms = 8 if self._is_pcmu("output_audio_format") else 48
        self.sent_ms[item_id] = 0.0
        self.response = {"id": response_id, "item": item, "text": text, "words": text.split(), "audio": audio,
                         "per_ms": per_ms}
        self._stream()

    def _stream(self) -> None:
        response = self.response
        if response is None or not self.open:
            return
        item_id = response["item"]["id"]
        ids = {"response_id": response["id"], "item_id": item_id, "output_index": 0, "content_index": 0}
        chunk_bytes = CHUNK_MS * response["per_ms"]
        chunk, response["audio"] = response["audio"][:chunk_bytes], response["audio"][chunk_bytes:]
        if chunk:
            self.sent_ms[item_id] += len(chunk) / response["per_ms"]
            self.send(self.names["audio_delta"], delta=base64.b64encode(chunk).decode("ascii"), **ids)
            if response["words"]:
                self.send(self.names["transcript_delta"], delta=response["words"].pop(0) + " ", **ids)
        if response["audio"]:
            self._timer = self.fake.reactor.callLater(CHUNK_INTERVAL, self._stream)
            return
        if response["words"]:
            self.send(self.names["transcript_delta"], delta=" ".join(response["words"]), **ids)
        self.send(self.names["audio_done"], **ids)
        self.send(self.names["transcript_done"], transcript=response["text"], **ids)
        item = {**response["item"], "status": "completed",
                "content": [{"type": self.names["audio_part"], "transcript": response["text"]}]}
        self.send("response.output_item.done", response_id=response["id"], output_index=0, item=item)
        self.response = None
        self.send("response.done", response={"id": response["id"], "object": "realtime.response",
                                             "status": "completed", "output": [item]})

    def _cancel(self, reason: str) -> None:
        response, self.response = self.response, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if response is not None:
            self.send("response.done", response={"id": response["id"], "object": "realtime.response",
                                                 "status": "cancelled", "output": [response["item"]],
                                                 "status_details": {"type": "cancelled", "reason": reason}})

    def _function_call(self, response_id: str, step: dict[str, Any]) -> None:
        call_id, name = self._id("call"), str(step["call"])
        raw = step.get("arguments", {})
        arguments = raw if isinstance(raw, str) else json.dumps(raw)
        item = {"id": self._id("item"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                "name": name, "arguments": ""}
        ids = {"response_id": response_id, "item_id": item["id"], "output_index": 0, "call_id": call_id}
        self.send("response.output_item.added", response_id=response_id, output_index=0, item=item)
        self._item_added(item)
        self.send("response.function_call_arguments.delta", delta=arguments, **ids)
        self.send("response.function_call_arguments.done", name=name, arguments=arguments, **ids)
        self.calls.append((call_id, name))
        self.pending_calls.add(call_id)
        # the response stays in progress a moment after the arguments are done, as the service's does:
        # a client that asks for the follow-up before response.done gets the error it would get there
        self.response = {"id": response_id, "item": {**item, "status": "completed", "arguments": arguments}}
        self._timer = self.fake.reactor.callLater(CHUNK_INTERVAL, self._call_done)

    def _call_done(self) -> None:
        response, self.response = self.response, None
        if response is not None:
            self.send("response.output_item.done", response_id=response["id"], output_index=0, item=response["item"])
            self.send("response.done", response={"id": response["id"], "object": "realtime.response",
                                                 "status": "completed", "output": [response["item"]]})

    def closed(self) -> None:
        if not self.open:
            return
        self.open = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        # a function call left without its output is fine when the session ends with it (the tool hung
        # the call up); going on without it is not, which response.create checks
        self.violations += [f"the output of function call {c} was not followed by response.create"
                            for c in sorted(self.answered_calls)]


class RealtimeServerProtocol(WebSocketServerProtocol):
    """Thin: the handshake's checks, then frames to and from the :class:`FakeSession`."""

    factory: _FakeFactory
    transport: Any
    session: FakeSession | None = None

    def onConnect(self, request: Any) -> None:
        fake: FakeRealtime = self.factory.fake
        if request.headers.get("authorization") != f"Bearer {fake.api_key}":
            raise ConnectionDeny(401, "invalid_api_key: Incorrect API key provided")
        if request.path != "/v1/realtime" or not request.params.get("model"):
            fake.handshake_violations.append(f"bad request line: {request.path} {request.params}")
            raise ConnectionDeny(400, "expected /v1/realtime?model=<model>")
        api = "beta" if request.headers.get("openai-beta") == "realtime=v1" else "ga"
        self.session = FakeSession(fake, api, request.params["model"][0], self._send_json,
                                   lambda: self.transport.abortConnection(), lambda: self.sendClose(1000, "closing"))
        fake.sessions.append(self.session)
        fake.connections.append(self)

    def onOpen(self) -> None:
        if self.session is not None:
            self.session.send("session.created", session=self.session.config)

    def _send_json(self, body: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(body).encode("utf-8"), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        if isBinary:
            self.session.violations.append("a binary frame: the Realtime API takes JSON text frames only")
            return
        self.session.received_text(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.closed()
        if self in self.factory.fake.connections:
            self.factory.fake.connections.remove(self)


class _FakeFactory(WebSocketServerFactory):
    protocol = RealtimeServerProtocol  # type: ignore[assignment]

    def __init__(self, fake: FakeRealtime) -> None:
        super().__init__()
        self.fake = fake


class FakeRealtime:
    """``start()`` listens on 127.0.0.1 (a free port); ``url`` is the Realtime endpoint to give the client."""

    def __init__(self, reactor: Any, api_key: str = "test-key", *, silence_ms: int = 500) -> None:
        self.reactor = reactor
        self.api_key = api_key
        self.silence_ms = silence_ms
        #: the agent's voice (anything with ``render(text) -> 8 kHz s16le``)
        self.voice: Any = ToneVoice()
        self.script: list[dict[str, Any]] = []
        self.sessions: list[FakeSession] = []
        self.connections: list[RealtimeServerProtocol] = []
        self.truncations: list[dict[str, Any]] = []
        self.handshake_violations: list[str] = []
        self.url = ""
        self._port: Any = None

    @property
    def violations(self) -> list[str]:
        return self.handshake_violations + [v for s in self.sessions for v in s.violations]

    def start(self) -> Deferred[FakeRealtime]:
        factory = _FakeFactory(self)
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"ws://127.0.0.1:{self._port.getHost().port}/v1/realtime"
        return succeed(self)

    def stop(self) -> Deferred[None]:
        for connection in list(self.connections):
            if connection.session is not None:
                connection.session.closed()
            connection.transport.abortConnection()
        port, self._port = self._port, None
        return succeed(None) if port is None else maybeDeferred(port.stopListening)
