"""How many calls one core of the media plane carries.

The engine's media plane (MediaService: one RTP socket, the shared pacer, VAD on every inbound
frame) runs in one process pinned to core 0; a load generator pinned to core 1 plays N Asterisk
UnicastRTP channels, each from its own UDP socket: 50 μ-law packets/s in, and it receives the 50
packets/s the engine paces back. For each N the engine reports its outbound send lateness (how late
each frame left against its 20 ms deadline), the inbound packets it got against what was sent, CPU
and memory. The largest N with p99 lateness ≤ 5 ms and zero inbound loss is the figure of merit.

    .venv/bin/python bench/media_capacity.py [--calls 100,200,...] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

P99_LIMIT_MS = 5.0
ENGINE_CORE, GENERATOR_CORE = 0, 1


def udp_rcvbuf_errors() -> int:
    """The kernel's count of datagrams dropped because a socket's receive buffer was full."""
    with open("/proc/net/snmp") as stream:
        lines = [line.split() for line in stream if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib() -> int:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- the engine -----------------------------------------------------------------------------------


def run_engine(calls: int, ports: list[int], seconds: float, pacing: str) -> None:
    import dataclasses
    import math

    from twisted.internet import reactor
    from zope.interface import implementer

    from twisted_agent.config import load_config
    from twisted_agent.media.interfaces import IMediaConsumer
    from twisted_agent.media.pacer import Pacer
    from twisted_agent.media.service import MediaService

    @implementer(IMediaConsumer)
    class Counter:
        """The call engine's stand-in: counts what arrives and keeps the agent talking."""

        frames = 0
        speech = 0

        def __init__(self) -> None:
            self.session: Any = None

        def audio_received(self, frame: bytes) -> None:
            Counter.frames += 1

        def speech_started(self) -> None:
            Counter.speech += 1

        def speech_ended(self) -> None:
            pass

        def utterance_sent(self, utterance_id: str, ms: int) -> None:
            self.session.play(reply, 8000, utterance_id + "+")

        def dtmf_received(self, digit: str) -> None:
            pass

        def media_closed(self, reason: str) -> None:
            pass

        def stream_failed(self, reason: str) -> None:
            pass

    config = load_config(None, {"ARI_URL": "http://127.0.0.1:1/ari"})
    media = dataclasses.replace(config.media, rtp_host="127.0.0.1", rtp_port=0)
    service = MediaService(reactor, media)
    service.privilegedStartService()
    rss_before = rss_kib()
    reply = struct.pack("<8000h", *(int(6000 * math.sin(2 * math.pi * 300 * i / 8000)) for i in range(8000)))
    sessions = []
    timers = []
    for n, port in enumerate(ports):
        if pacing == "per-call":  # the alternative design: one timer per call, its phase random
            service.pacer = Pacer(reactor, phases=1)
            timers.append((service.pacer, random.random() * 0.02))
        session = service.create_session(f"call-{n}")
        counter = Counter()
        counter.session = session
        session.set_consumer(counter)
        session.bind_peer("127.0.0.1", port)
        # two 1 s replies queued; each one sent queues another, so the agent talks all the time
        session.play(reply, 8000, f"reply-{n}")
        session.play(reply, 8000, f"reply-{n}-b")
        sessions.append(session)
    bound = service.bound_address()
    assert bound is not None
    print(json.dumps({"engine_port": bound[1]}), flush=True)
    sys.stdin.readline()  # the generator is ready
    service.startService()
    for timer, phase in timers:
        reactor.callLater(phase, timer.start)
    errors_before = udp_rcvbuf_errors()
    cpu_before, wall_before = cpu_seconds(), time.monotonic()

    def finish() -> None:
        cpu = cpu_seconds() - cpu_before
        wall = time.monotonic() - wall_before
        lateness = service.lateness()
        stats = [s.stats() for s in sessions]
        print(json.dumps({
            "calls": calls,
            "cpu_percent": round(100 * cpu / wall, 1),
            "rss_per_call_kib": round((rss_kib() - rss_before) / max(calls, 1), 1),
            "rss_mib": round(rss_kib() / 1024, 1),
            "p50_ms": lateness.percentile_ms(0.5),
            "p99_ms": lateness.percentile_ms(0.99),
            "max_ms": round(lateness.maximum * 1000, 2),
            "frames_out": lateness.count,
            "packets_out": sum(s["packets_out"] for s in stats),
            "packets_in": sum(s["packets_in"] for s in stats),
            "lost": sum(s["lost"] for s in stats),
            "late": sum(s["late"] for s in stats),
            "frames_in": Counter.frames,
            "speech_starts": Counter.speech,
            "rcvbuf_errors": udp_rcvbuf_errors() - errors_before,
            "pacer_skipped": service.pacer.skipped,
        }), flush=True)
        reactor.stop()

    reactor.callLater(seconds + 0.5, finish)  # the generator stops at `seconds`; late packets drain
    reactor.run()


# --- the load generator ---------------------------------------------------------------------------


def run_generator(calls: int, seconds: float) -> None:
    sockets = []
    for _ in range(calls):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        sockets.append(sock)
    print(json.dumps({"ports": [s.getsockname()[1] for s in sockets]}), flush=True)
    engine_port = json.loads(sys.stdin.readline())["engine_port"]
    target = ("127.0.0.1", engine_port)
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    rng = random.Random(1)
    # speech-like payload: alternating loud and quiet stretches so the VAD has work to do
    loud = bytes(rng.randrange(0x00, 0x40) for _ in range(160))
    quiet = b"\xff" * 160
    ssrcs = [rng.getrandbits(32) for _ in sockets]
    header = struct.Struct("!BBHII")
    received = 0
    sent = 0
    # Calls start at random times on a real PBX, so each channel's 20 ms rhythm has its own phase:
    # the period is cut into 1 ms slots and each call sends in its own slot.
    slots = 20
    start = time.monotonic()
    step = 0  # 1 ms steps
    while True:
        deadline = start + step * 0.001
        now = time.monotonic()
        if now >= deadline:
            if now - start >= seconds:
                break
            tick, slot = divmod(step, slots)
            payload = loud if (tick // 50) % 2 == 0 else quiet
            for n in range(slot, len(sockets), slots):
                sockets[n].sendto(header.pack(0x80, 0, tick & 0xFFFF, (160 * tick) & 0xFFFFFFFF, ssrcs[n]) + payload,
                                  target)
                sent += 1
            step += 1
            continue
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            sock = key.fileobj  # type: ignore[assignment]
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    sock.recv(2048)
                    received += 1
                except BlockingIOError:
                    break
    print(json.dumps({"sent": sent, "received": received}), flush=True)


# --- the orchestrator -----------------------------------------------------------------------------


def pinned(core: int, argv: list[str]) -> subprocess.Popen[str]:
    command = (["taskset", "-c", str(core)] if os.path.exists("/usr/bin/taskset") else []) + argv
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def measure(calls: int, seconds: float, pacing: str) -> dict[str, Any]:
    me = [sys.executable, os.path.abspath(__file__)]
    generator = pinned(GENERATOR_CORE, [*me, "generator", str(calls), str(seconds)])
    assert generator.stdout is not None and generator.stdin is not None
    ports = json.loads(generator.stdout.readline())["ports"]
    engine = pinned(ENGINE_CORE, [*me, "engine", str(calls), str(seconds), pacing])
    assert engine.stdout is not None and engine.stdin is not None
    engine.stdin.write(json.dumps(ports) + "\n")
    engine.stdin.flush()
    engine_port = engine.stdout.readline()
    generator.stdin.write(engine_port)
    generator.stdin.flush()
    engine.stdin.write("go\n")
    engine.stdin.flush()
    generated = json.loads(generator.stdout.readline())
    result = json.loads(engine.stdout.readline())
    engine.wait(30)
    generator.wait(30)
    result.update(generated)
    result["inbound_loss"] = generated["sent"] - result["packets_in"]
    result["outbound_expected"] = int(calls * seconds * 50)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="50,100,200,300,400,500,600,700,800")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pacing", choices=["shared", "per-call"], default="shared",
                        help="one shared pacer (the engine's design) or one timer per call (for comparison)")
    args = parser.parse_args()
    print(f"media capacity: engine on core {ENGINE_CORE}, load generator on core {GENERATOR_CORE}, "
          f"{args.seconds:g} s per step, {args.pacing} pacing, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores")
    print(f"{'calls':>6} {'cpu%':>6} {'p50ms':>6} {'p99ms':>6} {'maxms':>7} {'sent':>8} {'in':>8} {'loss':>6} "
          f"{'kdrop':>6} {'out':>8} {'back':>8} {'vad on':>7} {'rss MiB':>8} {'KiB/call':>9} {'ok':>3}")
    best = 0
    for calls in [int(c) for c in args.calls.split(",")]:
        r = measure(calls, args.seconds, args.pacing)
        ok = r["p99_ms"] <= P99_LIMIT_MS and r["inbound_loss"] == 0 and r["lost"] == 0
        if ok:
            best = max(best, calls)
        print(f"{calls:>6} {r['cpu_percent']:>6} {r['p50_ms']:>6.2f} {r['p99_ms']:>6.2f} {r['max_ms']:>7.2f} "
              f"{r['sent']:>8} {r['packets_in']:>8} {r['inbound_loss']:>6} {r['rcvbuf_errors']:>6} "
              f"{r['packets_out']:>8} {r['received']:>8} {r['speech_starts']:>7} "
              f"{r['rss_mib']:>8} {r['rss_per_call_kib']:>9} {'yes' if ok else 'no':>3}", flush=True)
    print(f"calls per core (p99 send lateness <= {P99_LIMIT_MS:g} ms, zero inbound loss): {best}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "engine":
        ports_line = sys.stdin.readline()
        run_engine(int(sys.argv[2]), json.loads(ports_line), float(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "generator":
        run_generator(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
