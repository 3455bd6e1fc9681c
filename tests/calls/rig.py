"""An engine rig: the call engine with a fake ARI, a real media plane on a fake UDP transport, and task.Clock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from tests.calls.fakes import FakeARI, FakeARIService, channel_json, event
from tests.media.fakes import FakeUDPTransport, detector_factory, tone
from twisted_agent.calls.engine import APOLOGY_NAME, CallEngine
from twisted_agent.calls.registry import CallRegistry
from twisted_agent.config import load_config
from twisted_agent.media.codecs import ulaw_encode
from twisted_agent.media.rtp import RTPPacket, build
from twisted_agent.media.service import MediaService
from twisted_agent.providers.readiness import ProviderCatalog

CALLER = "1700000000.1"


class FakePort:
    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", 18080)

    def stopListening(self) -> None:
        pass


class Rig:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        settings = {"ARI_URL": "http://10.0.0.5:8088/ari", "RTP_ADVERTISE_HOST": "10.0.0.9",
                    "MEDIA_DIR": str(tmp_path), "AI_PROVIDER": "echo", "NO_AUDIO_SECONDS": "0", **env}
        self.config = load_config(None, settings)
        self.media_dir = tmp_path
        self.clock = Clock()
        self.clock.advance(1000)
        self.ari = FakeARI()
        self.ari_service = FakeARIService(self.ari)
        self.events = self.ari_service.events
        self.media = MediaService(self.clock, self.config.media)
        self.udp = FakeUDPTransport()
        self.media.rtp.makeConnection(self.udp)  # type: ignore[arg-type]
        self.media.rtp_port = FakePort()  # type: ignore[assignment]
        self.media._detector = detector_factory()  # type: ignore[method-assign]
        self.media.pacer.start()
        self.registry = CallRegistry(self.clock, max_calls=self.config.calls.max_calls)
        self.providers = ProviderCatalog(self.config, clock=self.clock)
        self.engine = CallEngine(self.clock, self.config, self.ari_service, self.media, self.registry, self.providers)
        self.engine.blocking = lambda f, *a: maybeDeferred(f, *a)  # type: ignore[method-assign]
        self.engine.startService()
        self.clock.advance(0)
        self.seq = 0

    def ring(self, channel_id: str = CALLER, variables: dict[str, str] | None = None,
             in_event: dict[str, str] | None = None) -> None:
        self.ari.add_caller(channel_id, variables)
        self.events.emit(event("StasisStart", channel=channel_json(channel_id, variables=in_event), args=[]))

    def media_up(self, channel_id: str = CALLER) -> None:
        media_id = f"ai-media-{channel_id}"
        self.ari.in_stasis.add(media_id)
        self.events.emit(event("StasisStart", channel=channel_json(media_id, state="Up",
                                                                   name="UnicastRTP/10.0.0.9:18080-0x1"), args=[]))

    def answered_call(self, channel_id: str = CALLER, **kw: Any) -> Any:
        self.ring(channel_id, **kw)
        self.media_up(channel_id)
        return self.engine.calls[channel_id]

    def playback_done(self, call: Any) -> None:
        """Asterisk plays every queued file to the end."""
        for _, _, media, playback_id in [r for r in self.ari.requests if r[0] == "play"]:
            if playback_id in self.engine._playbacks:
                playback = {"id": playback_id, "media_uri": media, "target_uri": f"channel:{call.call_id}",
                            "state": "playing", "language": "en"}
                self.events.emit(event("PlaybackStarted", playback=playback))
                self.events.emit(event("PlaybackFinished", playback={**playback, "state": "done"}))

    def speak(self, ms: int, loud: bool = True, channel_id: str = CALLER) -> None:
        peer = self.ari.peers[f"ai-media-{channel_id}"]
        payload = ulaw_encode(tone(20, amplitude=8000 if loud else 0))
        for _ in range(ms // 20):
            packet = RTPPacket(payload_type=0, sequence=self.seq, timestamp=160 * self.seq, ssrc=77, payload=payload)
            self.media.rtp.router.datagram(build(packet), peer)
            self.seq += 1
            self.clock.advance(0.02)

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.02)):
            self.clock.advance(0.02)

    def files(self) -> list[str]:
        return sorted(p for p in os.listdir(self.media_dir) if not p.startswith(APOLOGY_NAME))
