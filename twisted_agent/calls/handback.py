"""Letting go of the caller: hung up, or sent on in the dialplan, and the outcome that makes.

How the call lets go (``caller``): None, the caller is already gone; "hangup"; "continue", back to
the dialplan at FALLBACK_CONTEXT (the provider failed, or the engine shuts down); "transfer", on to
TRANSFER_CONTEXT (a human), else as "continue"; "refused", a call the engine did not take, on to
OVERFLOW_CONTEXT, else as "continue". Without a configured context the caller goes on at the
priority after ``Stasis()``. A caller who hung up meanwhile makes these requests fail with 404:
that is not an error.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_agent.ari.errors import ARIError, ARINotFound


def outcome(caller: str | None, reason: str, failed: bool) -> str:
    """The call's outcome (calls.record.OUTCOMES) from how it let go, when nothing said otherwise."""
    if failed:
        return "failed"
    if caller == "transfer":
        return "transferred"
    if caller == "hangup":
        return "agent_hangup"
    if caller == "continue":
        return "shutdown" if reason == "shutdown" else "failed"
    return "completed"


def continue_in_dialplan(ari: Any, calls: Any, call_id: str, why: str) -> Deferred[None]:
    """Send the caller on in the dialplan; ``why``: "continue", "transfer" or "refused"."""
    if why == "refused" and calls.overflow_context:
        return ari.continue_in_dialplan(call_id, context=calls.overflow_context,
                                        extension=calls.overflow_extension or None, priority=calls.overflow_priority)
    if why == "transfer" and calls.transfer_context:
        context, extension, priority = calls.transfer_context, calls.transfer_extension, calls.transfer_priority
    elif calls.fallback_context:
        context, extension, priority = calls.fallback_context, calls.fallback_extension, calls.fallback_priority
    else:
        return ari.continue_in_dialplan(call_id)  # the priority after Stasis()
    return ari.continue_in_dialplan(call_id, context=context, extension=extension or None, priority=priority)


async def let_go(ari: Any, calls: Any, call_id: str, caller: str | None, log: Logger) -> None:
    """Hang the caller up or send them on, as ``caller`` says; never raises an ARI error."""
    if caller == "hangup":
        await gone_ok(ari.hangup(call_id), log, call_id)
    elif caller in ("continue", "transfer"):
        await gone_ok(continue_in_dialplan(ari, calls, call_id, caller), log, call_id)


async def gone_ok(d: Deferred[Any], log: Logger, call_id: str) -> None:
    """Teardown: 404 means already gone; anything else is logged, never raised."""
    try:
        await d
    except ARINotFound:
        pass
    except ARIError as e:
        log.warn("call {call_id}: clean-up request failed: {error}", call_id=call_id, error=str(e))
