"""A call as the store keeps it: the live record while it runs, the history record when it ends.

Times are epoch seconds from the reactor (the real reactor's clock is the wall clock), so records
written by several engines sort together.
"""

from __future__ import annotations

from typing import Any

#: how a call ended, for the history and the calls_total{outcome} metric (low cardinality)
OUTCOMES = ("completed", "agent_hangup", "operator_hangup", "transferred", "failed", "inactivity", "shutdown",
            "refused", "setup_failed", "lost")


#: the Q.850 causes a caller's hang-up usually carries (Asterisk's cause_txt wording)
Q850 = {16: "Normal Clearing", 17: "User busy", 18: "No user responding", 19: "User alerting, no answer",
        21: "Call Rejected", 27: "Destination out of order", 31: "Normal, unspecified",
        34: "Circuit/channel congestion", 38: "Network out of order", 41: "Temporary failure",
        127: "Interworking, unspecified"}


def hangup_cause(event: Any) -> str:
    """Why the caller's channel went, from ChannelHangupRequest / ChannelDestroyed ("" if unknown)."""
    text = getattr(event, "cause_txt", None)
    if text:
        return str(text)
    cause = getattr(event, "cause", None)
    if cause is None:
        return ""
    return f"{Q850[cause]} ({cause})" if cause in Q850 else f"cause {cause}"


def live_record(call: Any) -> dict[str, Any]:
    config = call.config
    return {
        "call_id": call.call_id,
        "engine_id": call.engine.engine_id,
        "caller_number": call.caller_number,
        "caller_name": call.caller_name,
        "provider": call.provider_name,
        "provider_source": call.provider_source,
        "context": call.context_name,
        "context_source": call.context_source,
        "state": call.state,
        "transport": config.media.transport,
        "downstream_mode": config.media.downstream_mode,
        "started_at": call.started_at,
        "updated_at": call.reactor.seconds(),
        "transcript": [{"speaker": speaker, "text": text} for speaker, text in call.conversation],
        "turns": [dict(timing) for timing in call.turn_timings],
        "last_turn": dict(call.turn_timings[-1]) if call.turn_timings else None,
    }


def history_record(call: Any) -> dict[str, Any]:
    record = live_record(call)
    ended = call.reactor.seconds()
    media = call.session.stats() if call.session is not None else {}
    record.update({
        "state": "ended",
        "ended_at": ended,
        "duration_s": round(ended - call.started_at, 3),
        "outcome": call.outcome or "completed",
        "end_reason": call.end_reason,
        "hangup_cause": call.hangup_cause,
        "media": _plain(media),
        "barge_ins": len(call.barge_ins),
        "fillers": len(call.fillers),
        "stream_fallback": call.stream_fallback,
    })
    return record


def _plain(value: Any) -> Any:
    """JSON-able copy of media statistics (tuples become lists, other objects their text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
