"""CallStates: which input moves a call where, and which arrivals the call is told of."""

from __future__ import annotations

import pytest

from twisted_agent.calls.states import CallStates

INPUTS = ("set_up", "turn_over", "audio_out", "reply_done", "caller_took_floor", "end")


def make() -> tuple[CallStates, list[str]]:
    entered: list[str] = []
    return CallStates(entered.append), entered


def test_a_conversation_goes_round_listening_thinking_speaking() -> None:
    states, entered = make()
    assert states.name == "connecting"
    for name in ("set_up", "turn_over", "audio_out", "audio_out", "reply_done", "turn_over", "reply_done"):
        getattr(states, name)()
    assert entered == ["listening", "thinking", "speaking", "listening", "thinking", "listening"]
    assert states.name == "listening"


def test_after_a_barge_in_the_callers_turn_ends_as_any_other() -> None:
    states, entered = make()
    for name in ("set_up", "turn_over", "audio_out", "caller_took_floor", "turn_over"):
        getattr(states, name)()
    assert entered == ["listening", "thinking", "speaking", "listening", "thinking"]


@pytest.mark.parametrize("path, where", [
    (("set_up", "turn_over", "audio_out", "caller_took_floor"), "listening"),  # a barge-in
    (("set_up", "turn_over", "caller_took_floor"), "listening"),  # the caller went on before the reply
    (("set_up", "audio_out"), "speaking"),  # the greeting
    (("turn_over", "audio_out", "reply_done", "caller_took_floor"), "connecting"),  # nothing before set-up
    (("set_up", "reply_done", "caller_took_floor"), "listening"),
])
def test_inputs_a_state_does_not_expect_leave_it_where_it_is(path: tuple[str, ...], where: str) -> None:
    states, _ = make()
    for name in path:
        getattr(states, name)()
    assert states.name == where


@pytest.mark.parametrize("before", [(), ("set_up",), ("set_up", "turn_over"), ("set_up", "audio_out")])
def test_the_end_is_reached_from_anywhere_and_nothing_leaves_it(before: tuple[str, ...]) -> None:
    states, entered = make()
    for name in before:
        getattr(states, name)()
    arrived = len(entered)
    states.end()
    assert states.name == "ended"
    for name in INPUTS:
        getattr(states, name)()
    assert states.name == "ended" and len(entered) == arrived, "the call is not told of the end: finish() did it"
