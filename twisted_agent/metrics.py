"""``/metrics``: the engine in Prometheus' text format, through prometheus-client.

Counters the engine already keeps (calls by outcome, barge-ins, fillers, media packets, ARI
reconnects, store errors) are read when Prometheus scrapes, by a collector: nothing on the call
path updates a metric object for them. Latencies are histograms, observed as each turn is recorded.
A turn that ended in the apology instead of an answer has no voice-to-voice latency: it is counted
in ``ai_agent_turns_failed_total{reason}`` beside the histogram (answered + failed = every turn
but those the caller took back by going on speaking),
never dropped silently; its stages that did happen (the turn-end wait, the queue wait, STT) are
observed like any turn's.

Labels have low cardinality on purpose: outcome, stage, direction, reason. Never a call id, a
caller number or an engine-chosen free text.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from twisted_agent.calls.record import OUTCOMES
from twisted_agent.calls.timing import TURN_FAILURES, TurnTiming

#: turn timing key (calls.call.Call.turn_timings) -> the histogram's stage label
STAGES = {
    "turn_end_wait_ms": "turn_end_wait",
    "provider_stt_ms": "stt",
    "provider_llm_first_token_ms": "llm_first_token",
    "provider_tts_first_sentence_ms": "tts_first_byte",
    "after_turn_end_ms": "after_turn_end",
    "voice_to_voice_ms": "voice_to_voice",
}

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: a queue wait runs up to QUEUE_TIMEOUT (20 s by default, 300 at most): buckets past the latencies'
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)

#: engine.counters key -> (metric name without _total, help)
EVENT_COUNTERS = {
    "barge_ins": ("ai_agent_barge_ins", "Agent speech interrupted by the caller"),
    "backchannels": ("ai_agent_backchannels", "Caller sounds while the agent spoke that were not an interruption"),
    "playback_fallbacks": ("ai_agent_playback_fallbacks", "Calls whose streamed audio stalled and went on by files"),
    "fillers": ("ai_agent_fillers", "Fillers played because a reply was slow"),
    "no_audio": ("ai_agent_no_audio", "Calls that got no audio from Asterisk after bridging (no-audio diagnosis)"),
    "provider_failures": ("ai_agent_provider_failures", "Calls whose provider failed mid-call (apology played)"),
    "provider_unavailable": ("ai_agent_provider_unavailable", "Calls sent back because their provider was not ready"),
    "held_for_ready": ("ai_agent_held_for_ready",
                       "Calls answered and held (ringback) while their provider was still starting (READY_TIMEOUT)"),
    "inactivity_hangups": ("ai_agent_inactivity_hangups", "Calls ended because the caller stayed silent"),
    "transfers_by_key": ("ai_agent_transfers_by_key", "Transfers to a human asked for with TRANSFER_DIGIT"),
}


class EngineCollector:
    """Reads the engine's counters at scrape time."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        engine, media, ari, store = service.engine, service.media, service.ari, service.store

        yield GaugeMetricFamily("ai_agent_calls_active", "Calls this engine is handling now", value=len(engine.calls))
        cluster = store.cluster_active()
        if cluster is not None:
            yield GaugeMetricFamily("ai_agent_cluster_calls_active",
                                    "Live calls of all engines sharing the store, as last seen", value=cluster)
        calls = CounterMetricFamily("ai_agent_calls", "Calls finished (or refused), by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            calls.add_metric([outcome], engine.outcomes[outcome])
        yield calls
        refused = CounterMetricFamily("ai_agent_calls_refused", "Calls sent back to the dialplan unanswered",
                                      labels=["reason"])
        for reason in ("full", "draining"):
            refused.add_metric([reason], engine.counters[f"refused_{reason}"])
        yield refused
        for key, (name, text) in EVENT_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=engine.counters[key])

        totals = media.totals()
        packets = CounterMetricFamily("ai_agent_rtp_packets", "RTP packets of calls", labels=["direction"])
        packets.add_metric(["in"], totals["packets_in"])
        packets.add_metric(["out"], totals["packets_out"])
        yield packets
        yield CounterMetricFamily("ai_agent_rtp_packets_lost", "RTP packets never received (sequence gaps)",
                                  value=totals["lost"])
        yield CounterMetricFamily("ai_agent_rtp_packets_malformed", "RTP datagrams that could not be parsed",
                                  value=totals["malformed"])
        yield CounterMetricFamily("ai_agent_rtp_packets_foreign",
                                  "RTP packets that belong to no call (unknown or disallowed peer, foreign SSRC)",
                                  value=totals["foreign"])
        frames = CounterMetricFamily("ai_agent_media_frames", "20 ms audio frames of calls (RTP or AudioSocket)",
                                     labels=["direction"])
        frames.add_metric(["in"], totals["frames_in"])
        frames.add_metric(["out"], totals["frames_out"])
        yield frames

        yield GaugeMetricFamily("ai_agent_ari_connected", "1 while the ARI events WebSocket is connected",
                                value=1 if ari.connected else 0)
        yield CounterMetricFamily("ai_agent_ari_reconnects", "ARI events WebSocket reconnections",
                                  value=ari.events.reconnects)

        stats = store.stats()
        yield CounterMetricFamily("ai_agent_store_errors", "Store operations that failed", value=stats["errors"])
        yield GaugeMetricFamily("ai_agent_store_buffered", "Store writes waiting for the backend (Redis down)",
                                value=stats["buffered"])
        yield GaugeMetricFamily("ai_agent_store_up", "1 while the store's backend is reachable",
                                value=1 if stats.get("connected", True) else 0)


class EngineMetrics:
    """The engine's own registry (not prometheus-client's global one: two engines in one process,
    as in tests, must not mix)."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(service))
        self.latency = Histogram(
            "ai_agent_stage_latency_seconds",
            "Per-turn latency by stage: turn-end wait, STT, LLM first token, TTS first byte, voice to voice",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        for stage in STAGES.values():
            self.latency.labels(stage)  # every series exists from the start, at zero
        self.queue_wait = Histogram(
            "ai_agent_turn_queue_wait_seconds",
            "Per turn whose work started: from the turn's end until its first model job left the queue shared "
            "with other calls' turns (QUEUE_TIMEOUT bounds it)", buckets=QUEUE_BUCKETS, registry=self.registry)
        self.turns_failed = Counter(
            "ai_agent_turns_failed",
            "Turns that ended in the apology instead of an answer, by reason: queue_timeout, provider_timeout, "
            "provider_error, media_error (the voice_to_voice latency counts the answered turns)",
            ["reason"], registry=self.registry)
        for reason in TURN_FAILURES:
            self.turns_failed.labels(reason)
        service.engine.turn_listeners.append(self.turn_recorded)

    def turn_recorded(self, call: Any, timing: TurnTiming) -> None:
        failed = timing.get("failed")
        if isinstance(failed, str) and failed in TURN_FAILURES:
            self.turns_failed.labels(failed).inc()
        for key, stage in STAGES.items():
            value = timing.get(key)
            if isinstance(value, (int, float)) and value >= 0:
                self.latency.labels(stage).observe(value / 1000)
        queued = timing.get("queue_ms")
        if isinstance(queued, (int, float)) and queued >= 0:
            self.queue_wait.observe(queued / 1000)

    def exposition(self) -> tuple[str, bytes]:
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
