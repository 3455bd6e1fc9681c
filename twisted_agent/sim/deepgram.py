"""A fake Deepgram Voice Agent (V1) for tests, the demo and benchmarks (PROTOCOLS.md §2).

It checks what a client sends as strictly as the spec allows and records every departure in
``violations`` (tests assert the list is empty), and it behaves like the service on the wire:
``Welcome`` at once, ``Settings`` first and well-formed, ``SettingsApplied``, the greeting, the
caller's turns found by the energy of the μ-law audio received, barge-in (``UserStartedSpeaking``
stops the agent's turn), client-side function calls, injections, and an idle close.

What the agent does after each caller turn comes from ``FakeDeepgram.script``, one step per turn,
in order, for each session: ``{"say": text}``, ``{"call": name, "arguments": {...} or a raw
string, "say": follow-up}``, ``{"drop": True}`` (abort the TCP connection) or ``{"error": text}``.
When the script runs out, the agent answers ``You said something.``. The agent's voice is
:class:`ToneVoice`, sent faster than real time, as the real service does.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger

from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.providers.voices import ToneVoice
from twisted_agent.sim.control import Timers

__all__ = ["DEFAULT_REPLY", "DeepgramSession", "FakeDeepgram", "settings_problems"]

PATH = "/v1/agent/converse"
DEFAULT_REPLY = "You said something."
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
#: RMS (s16) above which a 20 ms frame counts as speech; the simulator's silence is zeros
SPEECH_RMS = 400.0
THINK_PROVIDERS = {"open_ai", "anthropic", "google", "groq", "aws_bedrock"}
SETTINGS_KEYS = {"type", "tags", "experimental", "mip_opt_out", "flags", "audio", "agent"}
AGENT_KEYS = {"listen", "think", "speak", "greeting", "context", "language"}
CLIENT_TYPES = {"Settings", "KeepAlive", "InjectAgentMessage", "InjectUserMessage", "FunctionCallResponse",
                "UpdatePrompt", "UpdateSpeak", "UpdateThink", "UpdateListen"}
UPDATE_ACKS = {"UpdatePrompt": "PromptUpdated", "UpdateSpeak": "SpeakUpdated", "UpdateThink": "ThinkUpdated",
               "UpdateListen": "ListenUpdated"}


def settings_problems(settings: dict[str, Any]) -> list[str]:
    """What is wrong with a ``Settings`` message for a telephony call (μ-law at 8 kHz both ways)."""
    problems = [f"Settings: unknown field {key!r}" for key in settings if key not in SETTINGS_KEYS]
    audio = settings.get("audio")
    if not isinstance(audio, dict):
        return [*problems, "Settings: audio is missing"]
    source, sink = audio.get("input"), audio.get("output")
    if not isinstance(source, dict) or source.get("encoding") != "mulaw" or source.get("sample_rate") != 8000:
        problems.append(f"Settings: audio.input must be mulaw at 8000 Hz, got {source!r}")
    if (not isinstance(sink, dict) or sink.get("encoding") != "mulaw" or sink.get("sample_rate") != 8000
            or sink.get("container") != "none"):
        problems.append(f"Settings: audio.output must be mulaw at 8000 Hz in container none, got {sink!r}")
    agent = settings.get("agent")
    if not isinstance(agent, dict):
        return [*problems, "Settings: agent is missing"]
    problems += [f"Settings: unknown field agent.{key}" for key in agent if key not in AGENT_KEYS]
    problems += _provider_problems(agent.get("listen"), "agent.listen", {"deepgram"})
    think = agent.get("think")
    for i, part in enumerate(think if isinstance(think, list) else [think]):
        where = f"agent.think[{i}]" if isinstance(think, list) else "agent.think"
        problems += _provider_problems(part, where, THINK_PROVIDERS)
        if isinstance(part, dict):
            if not isinstance(part.get("prompt", ""), str):
                problems.append(f"Settings: {where}.prompt must be a string")
            problems += _function_problems(part.get("functions", []), where)
    speak = agent.get("speak")
    for part in speak if isinstance(speak, list) else [speak]:
        problems += _provider_problems(part, "agent.speak", None)
    for key in ("greeting", "language"):
        if key in agent and not isinstance(agent[key], str):
            problems.append(f"Settings: agent.{key} must be a string")
    return problems


def _provider_problems(part: Any, where: str, types: set[str] | None) -> list[str]:
    provider = part.get("provider") if isinstance(part, dict) else None
    if not isinstance(provider, dict):
        return [f"Settings: {where}.provider is missing"]
    problems = []
    if not isinstance(provider.get("type"), str) or (types is not None and provider["type"] not in types):
        problems.append(f"Settings: {where}.provider.type {provider.get('type')!r} is not one of {sorted(types or [])}")
    if "model" in provider and not (isinstance(provider["model"], str) and provider["model"]):
        problems.append(f"Settings: {where}.provider.model must be a non-empty string")
    return problems


def _function_problems(functions: Any, where: str) -> list[str]:
    if not isinstance(functions, list):
        return [f"Settings: {where}.functions must be a list"]
    problems = []
    for i, function in enumerate(functions):
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"Settings: {where}.functions[{i}] has no name")
            continue
        if not isinstance(function.get("description", ""), str):
            problems.append(f"Settings: function {name}: description must be a string")
        parameters = function.get("parameters")
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            problems.append(f"Settings: function {name}: parameters must be a JSON Schema object")
        elif not isinstance(parameters.get("properties", {}), dict):
            problems.append(f"Settings: function {name}: parameters.properties must be an object")
    return problems


class DeepgramSession:
    """One connection's conversation and record. Plain logic: the protocol hands it frames."""

    log = Logger()

    def __init__(self, fake: FakeDeepgram, link: Any) -> None:
        self._fake = fake
        self._link = link
        self._timers = fake.timers
        self.request_id = str(uuid.uuid4())
        self.settings: dict[str, Any] | None = None
        self.received: list[dict[str, Any]] = []
        self.audio_bytes = 0
        self.sent: list[dict[str, Any]] = []
        self.audio_bytes_sent = 0
        self.function_responses: list[dict[str, Any]] = []
        self.user_messages: list[str] = []
        self.violations: list[str] = []
        self.closed = False
        #: an Error was sent: the session ignores the client from then on, and closes
        self.failed = False
        self.idle_closed = False
        self.turns = 0
        self.barge_ins = 0
        self._step = 0
        self._frame = bytearray()
        self._caller_speaking = False
        self._silence_ms = 0
        self._chunks: list[bytes] = []  # the agent turn being streamed
        self._streaming: IDelayedCall | None = None
        self._pending_call: dict[str, Any] | None = None
        self._idle: IDelayedCall | None = None

    # --- from the connection -------------------------------------------------------------------

    def opened(self) -> None:
        self._send({"type": "Welcome", "request_id": self.request_id})
        self._touch()

    def text(self, body: Any) -> None:
        if self.closed or self.failed:
            return
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            self._violate(f"a text frame that is not a JSON object with a type: {body!r:.200}", fatal=False)
            return
        self.received.append(body)
        kind = body["type"]
        if kind not in CLIENT_TYPES:
            self._violate(f"unknown message type {kind!r}", fatal=False)
        elif kind == "Settings":
            self._settings(body)
        elif self.settings is None:
            self._violate(f"{kind} before Settings (Settings must be sent first)")
        elif kind == "KeepAlive":
            self._touch()
        elif kind == "InjectAgentMessage":
            self._inject_agent(body)
        elif kind == "InjectUserMessage":
            if isinstance(body.get("content"), str):
                self.user_messages.append(body["content"])
            else:
                self._violate("InjectUserMessage without a content string", fatal=False)
        elif kind == "FunctionCallResponse":
            self._function_response(body)
        else:
            self._send({"type": UPDATE_ACKS[kind]})

    def audio(self, data: bytes) -> None:
        if self.closed or self.failed:
            return
        if self.settings is None:
            self._violate("audio before Settings (Settings must be sent first)")
            return
        self.audio_bytes += len(data)
        self._touch()
        self._frame += data
        while len(self._frame) >= FRAME_BYTES:
            frame, self._frame = bytes(self._frame[:FRAME_BYTES]), self._frame[FRAME_BYTES:]
            self._hear(frame)

    def connection_closed(self) -> None:
        self.closed = True
        self._stop_streaming()
        for call in (self._idle, self._streaming):
            self._timers.cancel(call)

    # --- the conversation ----------------------------------------------------------------------

    def _settings(self, body: dict[str, Any]) -> None:
        if self.settings is not None:
            self._violate("Settings sent twice", fatal=False)
            return
        problems = settings_problems(body)
        if problems:
            for problem in problems:
                self._violate(problem, fatal=False)
            self._error("; ".join(problems), "INVALID_SETTINGS")
            return
        self.settings = body
        if self._fake.answer_settings:
            self._send({"type": "SettingsApplied"})
            greeting = body["agent"].get("greeting")
            if greeting and self._fake.greeting_delay > 0:  # the service synthesises it first
                self._streaming = self._timers.later(self._fake.greeting_delay, self._agent_says, greeting, False)
            elif greeting:
                self._agent_says(greeting, latency=False)

    def _hear(self, frame: bytes) -> None:
        samples = np.frombuffer(ulaw_decode(frame), dtype="<i2").astype(np.float64)
        loud = float(np.sqrt(np.mean(samples * samples))) > SPEECH_RMS
        if loud:
            self._silence_ms = 0
            if not self._caller_speaking:
                self._caller_speaking = True
                self._send({"type": "UserStartedSpeaking"})
                if self._chunks or self._streaming is not None:
                    self._barge_in()
        elif self._caller_speaking:
            self._silence_ms += 20
            if self._silence_ms >= self._fake.turn_silence_ms:
                self._caller_speaking = False
                self._turn_ended()

    def _barge_in(self) -> None:
        """The caller talks over the agent: the rest of its turn is never sent (no AgentAudioDone)."""
        self.barge_ins += 1
        for chunk in self._chunks[:self._fake.audio_after_barge_in]:
            self._send_audio(chunk)  # what the service had already queued
        self._stop_streaming()

    def _turn_ended(self) -> None:
        script = self._fake.script
        step = script[self._step] if self._step < len(script) else {"say": DEFAULT_REPLY}
        self._step += 1
        self.turns += 1
        if step.get("drop"):
            self.log.info("fake Deepgram {request_id}: dropping the connection", request_id=self.request_id)
            self._link.abort()
            return
        if "error" in step:
            self._error(str(step["error"]), "FAKE_ERROR")
            return
        self._send({"type": "ConversationText", "role": "user", "content": f"[caller turn {self.turns}]"})
        self._send({"type": "AgentThinking", "content": ""})
        if "call" in step:
            self._function_request(step)
        else:
            self._agent_says(str(step.get("say", DEFAULT_REPLY)))

    def _agent_says(self, text: str, latency: bool = True) -> None:
        started: dict[str, Any] = {"type": "AgentStartedSpeaking", "total_latency": 0.0, "tts_latency": 0.0,
                                   "ttt_latency": 0.0}
        if latency:
            started.update(total_latency=0.42, tts_latency=0.12, ttt_latency=0.3)
        self._send(started)
        self._send({"type": "ConversationText", "role": "assistant", "content": text})
        audio = ulaw_encode(self._fake.voice.render(text))
        size = 8 * self._fake.chunk_ms
        self._chunks = [audio[i:i + size] for i in range(0, len(audio), size)]
        self._stream()

    def _stream(self) -> None:
        self._streaming = None
        if self.closed:
            return
        if not self._chunks:
            self._send({"type": "AgentAudioDone"})
            return
        self._send_audio(self._chunks.pop(0))
        self._streaming = self._timers.later(self._fake.chunk_interval, self._stream)

    def _stop_streaming(self) -> None:
        self._chunks = []
        self._timers.cancel(self._streaming)
        self._streaming = None

    def _busy(self) -> bool:
        return self._caller_speaking or self._streaming is not None or self._pending_call is not None

    def _inject_agent(self, body: dict[str, Any]) -> None:
        message = body.get("message")
        if not isinstance(message, str) or not message:
            self._violate("InjectAgentMessage without a message string", fatal=False)
        elif self._busy():
            self._send({"type": "InjectionRefused", "message": "Someone is speaking; the message was not injected."})
        else:
            self._agent_says(message)

    def _function_request(self, step: dict[str, Any]) -> None:
        arguments = step.get("arguments", {})
        call = {"id": f"call_{uuid.uuid4().hex[:16]}", "name": str(step["call"]),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments), "client_side": True}
        self._pending_call = {**call, "then": step.get("say")}
        self._send({"type": "FunctionCallRequest", "functions": [call]})

    def _function_response(self, body: dict[str, Any]) -> None:
        self.function_responses.append(body)
        pending, self._pending_call = self._pending_call, None
        if pending is None:
            self._violate(f"FunctionCallResponse {body.get('id')!r} answers no FunctionCallRequest", fatal=False)
            return
        for key in ("id", "name"):
            if body.get(key) != pending[key]:
                self._violate(f"FunctionCallResponse {key} {body.get(key)!r} does not match the request's "
                              f"{pending[key]!r}", fatal=False)
        if not isinstance(body.get("content"), str):
            self._violate("FunctionCallResponse content must be a string", fatal=False)
        if pending["then"]:
            self._agent_says(str(pending["then"]))

    # --- sending, idle, errors -------------------------------------------------------------------

    def _send(self, body: dict[str, Any]) -> None:
        if not self.closed:
            self.sent.append(body)
            self._link.send_json(body)

    def _send_audio(self, chunk: bytes) -> None:
        if not self.closed:
            self.audio_bytes_sent += len(chunk)
            self._link.send_audio(chunk)

    def _touch(self) -> None:
        self._timers.cancel(self._idle)
        self._idle = self._timers.later(self._fake.idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self.closed:
            return
        self.idle_closed = True
        self.log.info("fake Deepgram {request_id}: no audio or KeepAlive for {timeout}s; closing",
                      request_id=self.request_id, timeout=self._fake.idle_timeout)
        self._stop_streaming()
        self._link.close(1000, f"NET-0001: no audio or KeepAlive received for {self._fake.idle_timeout:g}s")

    def _violate(self, problem: str, fatal: bool = True) -> None:
        self.log.warn("fake Deepgram {request_id}: protocol violation: {problem}", request_id=self.request_id,
                      problem=problem)
        self.violations.append(problem)
        if fatal:
            self._error(problem, "PROTOCOL_VIOLATION")

    def _error(self, description: str, code: str) -> None:
        """Errors are fatal: the service closes the connection after one."""
        self._send({"type": "Error", "description": description, "code": code})
        self.failed = True
        self._stop_streaming()
        self._link.close(1000, None)


class DeepgramServerProtocol(WebSocketServerProtocol):
    """Thin: checks the upgrade, then hands frames to the session."""

    fake: FakeDeepgram
    session: DeepgramSession | None = None

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path != PATH:
            raise ConnectionDeny(404, f"no such endpoint {request.path}")
        if request.headers.get("authorization") != f"Token {self.fake.api_key}":
            self.fake.refused += 1
            raise ConnectionDeny(401, "Unauthorized: invalid credentials")

    def onOpen(self) -> None:
        self.session = DeepgramSession(self.fake, self)
        self.fake.sessions.append(self.session)
        self.fake.connections.add(self)
        self.session.opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        if isBinary:
            self.session.audio(payload)
            return
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = payload[:200]
        self.session.text(body)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.fake.connections.discard(self)
        if self.session is not None:
            self.session.connection_closed()

    def send_json(self, body: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(body).encode("utf-8"), isBinary=False)

    def send_audio(self, chunk: bytes) -> None:
        self.sendMessage(chunk, isBinary=True)

    def close(self, code: int, reason: str | None) -> None:
        self.sendClose(code, reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)


class FakeDeepgram:
    """The fake service on a free loopback port: ``start()``, then connect to ``url``; ``stop()``."""

    def __init__(self, reactor: Any, api_key: str = "test-key", *, idle_timeout: float = 10.0,
                 turn_silence_ms: int = 400) -> None:
        self.reactor = reactor
        self.api_key = api_key
        self.idle_timeout = idle_timeout
        self.turn_silence_ms = turn_silence_ms
        self.timers = Timers(reactor)
        self.voice = ToneVoice()
        self.script: list[dict[str, Any]] = []
        #: 100 ms of agent audio every 50 ms: faster than real time, as the service sends it
        self.chunk_ms = 100
        self.chunk_interval = 0.05
        #: agent audio chunks still sent after UserStartedSpeaking (already queued when it heard the caller)
        self.audio_after_barge_in = 0
        #: False: never answer Settings (to test a client's bounded wait)
        self.answer_settings = True
        #: seconds from SettingsApplied to the greeting's first audio (the real service takes about a second)
        self.greeting_delay = 0.0
        self.sessions: list[DeepgramSession] = []
        self.connections: set[DeepgramServerProtocol] = set()
        self.refused = 0
        self.url = ""
        self._port: IListeningPort | None = None

    @property
    def violations(self) -> list[str]:
        return [problem for session in self.sessions for problem in session.violations]

    def start(self) -> Deferred[None]:
        factory = WebSocketServerFactory()

        class BoundDeepgramServerProtocol(DeepgramServerProtocol):
            """A protocol class per fake, so two fakes in one process never share state."""

        BoundDeepgramServerProtocol.fake = self
        factory.protocol = BoundDeepgramServerProtocol
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"ws://127.0.0.1:{cast(IPv4Address, self._port.getHost()).port}{PATH}"
        return succeed(None)

    def stop(self) -> Deferred[None]:
        for connection in list(self.connections):
            connection.abort()
        for session in self.sessions:
            session.connection_closed()
        self.timers.cancel_all()
        port, self._port = self._port, None
        stopping = port.stopListening() if port is not None else None
        return stopping if stopping is not None else succeed(None)
