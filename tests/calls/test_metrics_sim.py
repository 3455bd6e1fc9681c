"""/metrics after a simulated call, read back by prometheus-client's own parser."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from tests.calls.simstack import converse, until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(stack: Any) -> tuple[str, str]:
    port = stack.service.config.web.port
    response = await treq.get(f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    return response.headers.getRawHeaders("content-type")[0], (await response.text())


@pytest_twisted.ensureDeferred
async def test_metrics_after_a_simulated_call(stacks: Any) -> None:
    stack = await stacks(DOWNSTREAM_MODE="stream")
    content_type, text = await scrape(stack)
    assert content_type.startswith("text/plain; version=")
    before = samples(text)
    assert before[("ai_agent_calls_total", (("outcome", "completed"),))] == 0
    assert before[("ai_agent_stage_latency_seconds_count", (("stage", "voice_to_voice"),))] == 0

    caller = stack.call(caller_number="5551234")
    await converse(caller)
    _, text = await scrape(stack)
    during = samples(text)
    assert during[("ai_agent_calls_active", ())] == 1
    assert during[("ai_agent_rtp_packets_total", (("direction", "in"),))] > 50, "the caller's audio"
    assert during[("ai_agent_rtp_packets_total", (("direction", "out"),))] > 50, "the agent's audio"

    await caller.hangup()
    await until(lambda: not stack.engine.calls, what="the call to end")
    _, text = await scrape(stack)
    after = samples(text)
    assert after[("ai_agent_calls_active", ())] == 0
    assert after[("ai_agent_calls_total", (("outcome", "completed"),))] == 1
    assert after[("ai_agent_calls_total", (("outcome", "failed"),))] == 0
    for stage in ("turn_end_wait", "voice_to_voice", "after_turn_end"):
        assert after[("ai_agent_stage_latency_seconds_count", (("stage", stage),))] == 1, stage
    v2v = after[("ai_agent_stage_latency_seconds_sum", (("stage", "voice_to_voice"),))]
    assert 0.4 < v2v < 3, "TURN_END_MS (500 ms) plus the echo provider's answer"
    for stage in ("stt", "llm_first_token", "tts_first_byte"):  # the echo provider reports none of these
        assert after[("ai_agent_stage_latency_seconds_count", (("stage", stage),))] == 0, stage
    # packets in and out are totals: the ended call's packets are still counted
    assert after[("ai_agent_rtp_packets_total", (("direction", "in"),))] >= during[
        ("ai_agent_rtp_packets_total", (("direction", "in"),))]
    for name in ("ai_agent_barge_ins_total", "ai_agent_playback_fallbacks_total", "ai_agent_fillers_total",
                 "ai_agent_no_audio_total", "ai_agent_rtp_packets_lost_total", "ai_agent_rtp_packets_foreign_total",
                 "ai_agent_rtp_packets_malformed_total", "ai_agent_ari_reconnects_total",
                 "ai_agent_store_errors_total"):
        assert after[(name, ())] == 0, name
    assert after[("ai_agent_ari_connected", ())] == 1
    assert after[("ai_agent_store_up", ())] == 1
    # low cardinality: no call id, number or engine name in any label
    for (_, labels) in after:
        for _, value in labels:
            assert caller.channel.id not in value and "5551234" not in value
