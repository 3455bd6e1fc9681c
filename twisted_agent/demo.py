"""``ai-agent demo``: a whole call, no PBX.

The real engine and the built-in Asterisk simulator run in one process on loopback. A simulated
caller rings, hears the greeting, asks a question (a bundled speech clip), hears the answer and
hangs up. The demo prints the conversation turn by turn with per-stage timings, checks that the
call left nothing behind, and writes what the caller heard to a WAV file.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from twisted_agent.config import AgentConfig
from twisted_agent.service import AgentService

APP = "asterisk-ai-voice-agent"


def loopback(config: AgentConfig) -> AgentConfig:
    """The same configuration on free loopback ports, so the demo never clashes with a running engine."""
    media = dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=free_port(socket.SOCK_DGRAM),
                                audiosocket_host="127.0.0.1", audiosocket_port=free_port(socket.SOCK_STREAM),
                                advertise_host="127.0.0.1")
    web = dataclasses.replace(config.web, host="127.0.0.1", port=0)
    return dataclasses.replace(config, media=media, web=web)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing on 127.0.0.1 holds right now (for loopback-only runs: demo, tests, benchmarks)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _why_not(provider: str, config: AgentConfig) -> str:
    """Why ``provider`` cannot take the demo call on this machine ("" when it can)."""
    from twisted_agent.providers.readiness import ProviderCatalog

    # without an engine: the local pipeline says whether it is installed (the engine loads it)
    readiness = ProviderCatalog(config).readiness()[provider]
    return "" if readiness.ready else f"{readiness.detail}; fix: {readiness.fix}"


def question_clip() -> bytes:
    """ "Hello, what are your opening hours on Saturday?" (espeak-ng), 8 kHz s16le."""
    return resources.files("twisted_agent.sim").joinpath("clips/question.sl").read_bytes()


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(reactor: Any, condition: Any, timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await sleep(reactor, 0.01)


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


async def _check_reply_heard(service: AgentService, caller: Any, spoke_until: float, agent_text: str,
                             out: Any) -> bool:
    """Transcribe what the caller heard after asking, with the pipeline's own Whisper, and check that
    it holds the agent's answer (not just that some audio came back). True for other providers."""
    factory = service.providers.factories.get("local")
    pipeline = getattr(factory, "pipeline", None)
    if service.config.calls.default_provider != "local" or pipeline is None:
        return True
    origin = caller.answered_at or spoke_until
    start = max(0, round((spoke_until - origin) * 8000)) * 2
    # up to half a second after the last sound heard: the silence the line carries afterwards, up
    # to now, is no part of the reply, and seconds of it can make Whisper loop on nothing
    segments = caller.heard_segments()
    end = round((segments[-1][1] + 0.5) * 8000) * 2 if segments else None
    reply_audio = caller.heard()[start:end]
    transcript = await pipeline.stt.transcribe(reply_audio, 8000, "en")
    said, heard = _words(agent_text), set(_words(transcript.text))
    found = sum(1 for word in said if word in heard) / max(1, len(said))
    out.write(f"  the reply as the caller heard it, transcribed again by Whisper: {transcript.text!r} "
              f"({found:.0%} of the answer's words)\n")
    if found < 0.6:
        why = f" (Whisper suppressed it: {transcript.reason})" if transcript.suppressed else ""
        out.write(f"  the recorded reply does not hold the answer{why}; {len(reply_audio) / 16000:.1f} s of it "
                  "were transcribed\n")
        return False
    return True


async def run_demo(reactor: Any, config: AgentConfig, out: Any, wav_path: str = "demo-call.wav",
                   provider: str | None = None) -> int:
    from twisted_agent.sim import AsteriskSimulator

    media_dir = tempfile.mkdtemp(prefix="ai-agent-demo-")
    sim = AsteriskSimulator(reactor, username="ai-agent", password="demo-secret")
    await sim.start()
    config = loopback(config)
    config = dataclasses.replace(
        config,
        ari=dataclasses.replace(config.ari, url=sim.ari_url, username="ai-agent", password="demo-secret",
                                app=APP, reconnect_max_delay=1.0),
        media=dataclasses.replace(config.media, media_dir=media_dir),
        calls=dataclasses.replace(config.calls, default_provider=provider or config.calls.default_provider,
                                  no_audio_seconds=0, drain_timeout=2),
    )
    chosen = config.calls.default_provider
    unavailable = _why_not(chosen, config)
    if provider is None and unavailable:
        out.write(f"provider {chosen} cannot run here ({unavailable}); the demo uses the echo provider\n")
        config = dataclasses.replace(config, calls=dataclasses.replace(config.calls, default_provider="echo"))
    service = AgentService(config, reactor)
    service.privilegedStartService()
    service.startService()
    code = 1
    try:
        await until(reactor, lambda: service.ari.connected, 10, "the engine to connect to ARI")
        factory = service.providers.factories[config.calls.default_provider]
        if not factory.readiness().ready:
            out.write("loading the models...\n")
            loading = reactor.seconds()
            try:
                await until(reactor, lambda: factory.readiness().ready, 300, "the models")
            except TimeoutError:
                readiness = factory.readiness()
                out.write(f"the provider is not ready: {readiness.detail}\n  fix: {readiness.fix}\n")
                return 1
            out.write(f"models ready in {reactor.seconds() - loading:.1f} s: {factory.readiness().detail}\n")
        out.write(f"engine connected to the simulated Asterisk at {sim.ari_url}; transport "
                  f"{config.media.transport}, replies by {config.media.downstream_mode}, provider "
                  f"{config.calls.default_provider}\n")
        rang = reactor.seconds()
        caller = sim.originate(APP, caller_number="+15551230000", caller_name="Demo Caller")
        answered = caller.answered
        await until(reactor, lambda: answered.called or caller.ended.called, 30, "the agent to answer")
        if not answered.called:
            record = await service.engine.store.get_call(caller.channel_id)
            out.write(f"the agent did not answer: {record['end_reason'] if record else caller.end_reason}\n")
            return 1
        await until(reactor, lambda: caller.first_heard_at() is not None, 10, "the greeting")
        greeting_at = caller.first_heard_at()
        assert greeting_at is not None
        engine = service.engine
        call = engine.calls.get(caller.channel_id)
        if call is None:
            record = await engine.store.get_call(caller.channel_id)
            out.write(f"the call did not start: {record['end_reason'] if record else '?'}\n")
            return 1
        out.write(f"\n  call {call.call_id} from {call.caller_number}: provider {call.provider_name}, "
                  f"context {call.context_name}\n")
        out.write(f"  [{1000 * (greeting_at - rang):6.1f} ms] agent:  {call.conversation[0][1]}\n")
        await until(reactor, lambda: call.state == "listening", 30, "the greeting to finish")
        speech = question_clip()
        await caller.say(speech)
        spoke_until = reactor.seconds()
        heard_before = len(caller.heard_segments())
        await until(reactor, lambda: len(caller.heard_segments()) > heard_before, 30, "the answer")
        try:
            await until(reactor, lambda: bool(call.turn_timings), 60, "the turn's timings")
        except TimeoutError:
            out.write(f"no answer: state {call.state}, conversation {call.conversation}, heard "
                      f"{caller.heard_segments()}\n")
            raise
        turn = call.turn_timings[-1]
        # the reply's text is complete once it has been spoken (its first audio comes much earlier)
        await until(reactor, lambda: call.state == "listening", 30, "the answer to finish")
        caller_text = next((text for speaker, text in reversed(call.conversation) if speaker == "caller"), "")
        agent_text = next((text for speaker, text in reversed(call.conversation) if speaker == "agent"), "")
        out.write(f"  [{1000 * (spoke_until - rang):6.1f} ms] caller: {caller_text}  "
                  f"({len(speech) / 16:.0f} ms clip)\n")
        heard_at = (caller.answered_at or rang) + caller.heard_segments()[heard_before][0]
        out.write(f"  [{1000 * (heard_at - rang):6.1f} ms] agent:  {agent_text}\n")
        out.write("\n  per-stage latency of the turn:\n")
        for key in ("turn_end_wait_ms", "after_turn_end_ms", "voice_to_voice_ms"):
            if key in turn:
                out.write(f"    {key[:-3].replace('_', ' '):<24} {turn[key]:7.1f} ms\n")
        for key, value in turn.items():
            if key.startswith("provider_"):
                out.write(f"    {key[9:-3].replace('_', ' '):<24} {value:7.1f} ms\n")
        heard_ok = await _check_reply_heard(service, caller, spoke_until, agent_text, out)
        await caller.hangup()
        await until(reactor, lambda: not engine.calls, 10, "the call to be released")
        await until(reactor, lambda: not sim.live_channels() and not sim.live_bridges(), 10, "Asterisk to be clean")
        leftovers = [name for name in os.listdir(media_dir) if name.startswith("ai-")]
        out.write(f"\n  call ended: {call.end_reason}; channels left {len(sim.live_channels())}, bridges left "
                  f"{len(sim.live_bridges())}, reply files left {len(leftovers)}\n")
        caller.write_wav(wav_path)
        out.write(f"  what the caller heard: {wav_path} ({len(caller.heard()) / 16000:.1f} s)\n")
        code = 0 if not leftovers and heard_ok else 1
    finally:
        await service.stopService()
        await sim.stop()
        for name in os.listdir(media_dir):
            os.unlink(os.path.join(media_dir, name))
        os.rmdir(media_dir)
    return code

