"""Whole calls through a real Asterisk: its dialplan, the engine as a process, callers, a TCP proxy.

A caller is a Local channel. Its ``;2`` half runs ``[from-ai-agent]`` and enters the engine's Stasis
app; once the engine answers, its ``;1`` half runs ``[caller]``: MixMonitor records what the caller
hears (``<rec>-heard.wav``) and says (``<rec>-said.wav``), then the caller follows its ``SCRIPT``, a
comma-separated list of steps: ``wait:SECONDS``, ``play:CLIP`` (a clip of :data:`CLIPS`),
``hangup``. When Stasis() returns (the engine sent the call back) the dialplan plays a 1004 Hz tone,
so the recording says whether the call was handed back. The engine runs as ``twistd -n ai-agent``,
configured by its environment, logging JSON lines to a file the tests read.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from tests.asterisk import audio
from tests.asterisk.instance import Asterisk
from tests.helpers import BIN, http_get, loopback_env

#: one app name per test run: two runs on one Asterisk never take each other's calls
APP = f"ai-agent-tests-{os.getpid()}"
#: the clips a caller plays: name -> text (espeak-ng, 8 kHz); see :func:`write_clips`
CLIPS = {
    "question": "Hello, what are your opening hours on Saturday?",
    "interrupt": "Wait, wait, I have a different question about my order.",
}
#: cut from the bundled question clip (the simulator's backchannels): "Hello?" (400 ms of voice) and "mm" (100 ms)
CUTS = {"hello": (12 * 320, 32 * 320), "mm": (13 * 320, 18 * 320)}


def dialplan(clips_dir: Path) -> str:
    return f"""[globals]
CLIPS={clips_dir}

[from-ai-agent]
exten => s,1,NoOp(call for the agent)
 same => n,Stasis({APP})
 same => n,NoOp(sent back: STASISSTATUS=${{STASISSTATUS}})
 same => n,Playtones({audio.HANDBACK_HZ})
 same => n,Wait(1.5)
 same => n,StopPlaytones()
 same => n,Hangup()

[caller]
exten => s,1,NoOp(caller ${{REC}}: ${{SCRIPT}})
 same => n,MixMonitor(${{REC}}.wav,r(${{REC}}-heard.wav)t(${{REC}}-said.wav))
 same => n,Set(i=1)
 same => n(step),Set(step=${{CUT(SCRIPT,\\,,${{i}})}})
 same => n,GotoIf($["${{step}}" = ""]?done)
 same => n,ExecIf($["${{CUT(step,:,1)}}" = "wait"]?Playtones(0))
 same => n,ExecIf($["${{CUT(step,:,1)}}" = "wait"]?Wait(${{CUT(step,:,2)}}))
 same => n,ExecIf($["${{CUT(step,:,1)}}" = "play"]?Playback(${{CLIPS}}/${{CUT(step,:,2)}}))
 same => n,ExecIf($["${{CUT(step,:,1)}}" = "hangup"]?Hangup())
 same => n,Set(i=$[${{i}} + 1])
 same => n,Goto(step)
 same => n(done),Hangup()
"""


#: What a Local-channel caller plays reaches the agent's half of the call 6 dB down (measured on
#: Asterisk 22.10.1: a clip whose loudest 20 ms frame averages 5133 arrives at the ``;2`` channel, in
#: Stasis, at 2602; the same on MixMonitor's read side and by TALK_DETECT's timing). A phone's audio
#: arrives at its own level, so the clips are written this much louder: the agent gets them at the
#: level they were made at. ``<clip>-soft`` is a clip as it arrives without the make-up.
LOCAL_CHANNEL_LOSS_DB = 6.0


def clips() -> dict[str, bytes]:
    """The caller's clips (8 kHz s16le) at the level they were made at: :data:`CLIPS` and :data:`CUTS`."""
    from tests.media.speech import require_speech_tools, speech
    from twisted_agent.demo import question_clip

    require_speech_tools()
    made = {name: speech(text, telephone=True) for name, text in CLIPS.items()}
    made.update({name: question_clip()[start:end] for name, (start, end) in CUTS.items()})
    return made


def write_clips(directory: Path) -> None:
    """The clips as signed-linear files (``.sln``) for the dialplan to play: each made up for the
    Local channel's loss, and ``<clip>-soft`` without the make-up."""
    from tests.media.speech import gain

    directory.mkdir(parents=True, exist_ok=True)
    for name, pcm in clips().items():
        (directory / f"{name}.sln").write_bytes(gain(pcm, LOCAL_CHANNEL_LOSS_DB))
        (directory / f"{name}-soft.sln").write_bytes(pcm)


# --- the engine ---------------------------------------------------------------------------------

@dataclass
class Engine:
    """``twistd -n ai-agent`` against ``asterisk`` (or ``ari_url``), configured by ``settings``."""

    asterisk: Asterisk
    workdir: Path
    settings: dict[str, str] = field(default_factory=dict)
    ari_url: str = ""
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.media_dir = self.workdir / "media"
        self.log_path = self.workdir / "engine.log"
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.env = loopback_env(**{
            "ARI_URL": self.ari_url or self.asterisk.ari_url, "ARI_USERNAME": self.asterisk.ari_user,
            "ARI_PASSWORD": self.asterisk.ari_password, "ARI_APP": APP, "AI_PROVIDER": "echo",
            "LOG_FORMAT": "json", "MEDIA_DIR": str(self.media_dir), "INACTIVITY_PROMPT_SECONDS": "0",
            "AI_AGENT_CONFIG": "/dev/null", **self.settings})

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HEALTH_PORT']}"

    def start(self) -> Engine:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "ai-agent"],
                                        stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.workdir)
        log.close()
        return self

    def registered(self) -> bool:
        try:
            self.asterisk.ari("GET", f"/applications/{APP}")
            return True
        except (urllib.error.URLError, OSError):
            return False

    def wait_registered(self, timeout: float = 30.0) -> None:
        until(self.registered, timeout, "the engine's Stasis app registered", self)

    def ready(self) -> bool:
        try:
            return http_get(self.health_url + "/ready")[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        until(self.ready, timeout, "the engine ready (/ready)", self)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def events(self) -> list[dict[str, Any]]:
        """The engine's log events (JSON lines), in order."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def messages(self) -> list[str]:
        return [e.get("text") or e.get("message") or e.get("log_format", "") for e in self.events()]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def reply_files(self) -> list[str]:
        """Reply files left in MEDIA_DIR (the apology, kept on purpose, is not one)."""
        from twisted_agent.calls.playback import FILE_PREFIX

        return sorted(p.name for p in self.media_dir.iterdir() if p.name.startswith(FILE_PREFIX))


def until(condition: Callable[[], Any], timeout: float, what: str, engine: Engine | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- engine log (end)\n{engine.log_tail()}" if engine is not None else ""
            raise AssertionError(f"not within {timeout:g}s: {what}{tail}")
        time.sleep(0.05)


# --- callers ------------------------------------------------------------------------------------

_numbers = count(1)


@dataclass
class Caller:
    asterisk: Asterisk
    channel_id: str  # the ;1 half, running [caller]
    agent_channel_id: str  # the ;2 half, in the engine's Stasis app
    rec: str
    placed_at: float

    def gone(self) -> bool:
        for channel in (self.channel_id, self.agent_channel_id):
            try:
                self.asterisk.ari("GET", f"/channels/{channel}")
                return False
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
        return True

    def wait_gone(self, timeout: float = 60.0, engine: Engine | None = None) -> None:
        until(self.gone, timeout, f"caller {self.rec} finished", engine)
        # MixMonitor closes its files when the channel is destroyed; give the writer a moment
        until(lambda: self.path("heard").exists() and self.path("heard").stat().st_size > 44, 5,
              f"{self.rec}-heard.wav written")

    def path(self, which: str) -> Path:
        return self.asterisk.spool / "monitor" / f"{self.rec}-{which}.wav"

    def heard(self) -> np.ndarray:
        return audio.read(self.path("heard"))

    def said(self) -> np.ndarray:
        return audio.read(self.path("said"))


def call(asterisk: Asterisk, script: str, **variables: str) -> Caller:
    """Place a call to the agent; the caller then follows ``script`` (see the module docstring)."""
    n = next(_numbers)
    rec = f"caller-{os.getpid()}-{n}"
    channel_id, agent_id = f"{rec}-a", f"{rec}-b"
    asterisk.ari("POST", "/channels", body={"variables": {"SCRIPT": script, "REC": rec, **variables}},
                 endpoint="Local/s@from-ai-agent/n", context="caller", extension="s", priority=1,
                 channelId=channel_id, otherChannelId=agent_id, callerId=f"Test {n} <555{n:04d}>")
    return Caller(asterisk, channel_id, agent_id, rec, time.monotonic())


def leftovers(asterisk: Asterisk, engine: Engine) -> dict[str, list[str]]:
    """What a finished test must not leave: channels, bridges, reply files."""
    return {
        "channels": [c["name"] for c in asterisk.ari("GET", "/channels")],
        "bridges": [b["id"] for b in asterisk.ari("GET", "/bridges")],
        "reply files": engine.reply_files(),
    }


def nothing_left(asterisk: Asterisk, engine: Engine, timeout: float = 10.0) -> None:
    """Wait until no channel, bridge or reply file is left; fail saying which remain."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(asterisk, engine)
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {left}\n--- engine log (end)\n{engine.log_tail()}")
        time.sleep(0.1)


# --- a TCP proxy between the engine and Asterisk's HTTP server ------------------------------------

class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`drop_websockets` cuts the upgraded
    (WebSocket) connections while plain HTTP requests keep working: the events socket dropped
    while Asterisk stays up."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, list[bool]]] = []
        self._closed = False
        self.refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upgraded = [False]
            with self._lock:
                self._pairs.append((client, upstream, upgraded))
            threading.Thread(target=self._pump, args=(client, upstream, upgraded), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, upgraded: list[bool]) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and b"upgrade: websocket" in data[:2048].lower():
                        upgraded[0] = True
                    peers[sock].sendall(data)
        except OSError:
            pass
        finally:
            for sock in peers:
                sock.close()
            with self._lock:
                self._pairs = [p for p in self._pairs if p[0] is not client]

    def websockets(self) -> int:
        with self._lock:
            return sum(1 for _, _, upgraded in self._pairs if upgraded[0])

    def drop_websockets(self) -> int:
        with self._lock:
            dropped = [p for p in self._pairs if p[2][0]]
        for client, upstream, _ in dropped:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(dropped)

    def close(self) -> None:
        self._closed = True
        self._server.close()

