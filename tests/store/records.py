"""Call records as the engine writes them, for the store tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor

from twisted_agent.store.interfaces import ICallStore

ENGINE = "engine-a"
DAY = 86400.0


def live(call_id: str, started: float, number: str = "+15550100", **changes: Any) -> dict[str, Any]:
    return {
        "call_id": call_id, "caller_number": number, "caller_name": "Ann Example",
        "provider": "echo", "provider_source": "default", "context": "default", "context_source": "channel",
        "state": "listening", "transport": "externalmedia", "downstream_mode": "file",
        "started_at": started, "updated_at": started,
        "transcript": [{"speaker": "agent", "text": "Hello, how can I help you?"}],
        "turns": [], "last_turn": None, **changes,
    }


def finished(record: dict[str, Any], ended: float, **changes: Any) -> dict[str, Any]:
    return {
        **record, "state": "ended", "updated_at": ended, "ended_at": ended,
        "duration_s": round(ended - record["started_at"], 3), "outcome": "completed",
        "end_reason": "caller hung up", "hangup_cause": "16",
        "transcript": [*record["transcript"], {"speaker": "caller", "text": "When do you open?"},
                       {"speaker": "agent", "text": "At nine."}],
        "turns": [{"voice_to_voice_ms": 812.5, "turn_end_wait_ms": 500.0, "stt_ms": 120.0}],
        "last_turn": {"voice_to_voice_ms": 812.5},
        "media": {"rx_packets": 1500, "tx_packets": 1480, "lost": 2, "jitter_ms": 1.25, "codec": "ulaw"},
        **changes,
    }


def stored(record: dict[str, Any]) -> dict[str, Any]:
    """What the store gives back: the record as written, stamped with the writing engine."""
    return {**record, "engine_id": ENGINE}


def now() -> float:
    return float(reactor.seconds())


async def the_call(store: ICallStore, call_id: str) -> dict[str, Any]:
    record = await store.get_call(call_id)
    assert record is not None, f"call {call_id} not found"
    return record


def ids(records: list[dict[str, Any]]) -> list[Any]:
    return [r["call_id"] for r in records]
