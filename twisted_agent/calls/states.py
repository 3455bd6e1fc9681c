"""The states of a call and the inputs that move it between them (automat).

Connecting → Listening → Thinking → Speaking → Ended. The table below is the whole of the rules:
an input a state does not expect leaves it where it is, and nothing leaves Ended. What the call
does on arriving in Listening, Thinking or Speaking is the call's business (``entered``); this
object only keeps the table, and says which state the call is in (:attr:`CallStates.name`).
"""

from __future__ import annotations

from collections.abc import Callable

from automat import MethodicalMachine


class CallStates:
    _machine = MethodicalMachine()

    def __init__(self, entered: Callable[[str], None]) -> None:
        self._entered = entered

    @property
    def name(self) -> str:
        """The current state: "connecting", "listening", "thinking", "speaking" or "ended"."""
        return self._current()

    @_machine.serializer()
    def _current(self, name: str) -> str:
        return name

    @_machine.state(initial=True, serialized="connecting")
    def connecting(self) -> None:
        "Answering, bridging and bringing up the media."

    @_machine.state(serialized="listening")
    def listening(self) -> None:
        "The caller has the floor."

    @_machine.state(serialized="thinking")
    def thinking(self) -> None:
        "The caller's turn ended; the provider is working on the answer."

    @_machine.state(serialized="speaking")
    def speaking(self) -> None:
        "The agent's audio is going to the caller (caller audio is gated)."

    @_machine.state(serialized="ended")
    def done(self) -> None:
        "Everything is released (the call does that itself, once: Call.finish)."

    @_machine.input()
    def set_up(self) -> None:
        "The media is bridged."

    @_machine.input()
    def turn_over(self) -> None:
        "The caller's turn ended."

    @_machine.input()
    def audio_out(self) -> None:
        "Agent audio is going out."

    @_machine.input()
    def reply_done(self) -> None:
        "The caller has heard all the agent had to say."

    @_machine.input()
    def caller_took_floor(self) -> None:
        "The caller spoke over the agent (barge-in), or went on speaking before the reply began."

    @_machine.input()
    def end(self) -> None:
        "The call is over."

    @_machine.output()
    def _arrived(self) -> None:
        # automat moves to the new state before it runs the outputs: the name is the new one
        self._entered(self.name)

    connecting.upon(set_up, enter=listening, outputs=[_arrived])
    connecting.upon(end, enter=done, outputs=[])
    connecting.upon(audio_out, enter=connecting, outputs=[])
    connecting.upon(reply_done, enter=connecting, outputs=[])
    connecting.upon(turn_over, enter=connecting, outputs=[])
    listening.upon(turn_over, enter=thinking, outputs=[_arrived])
    listening.upon(audio_out, enter=speaking, outputs=[_arrived])
    listening.upon(reply_done, enter=listening, outputs=[])
    listening.upon(end, enter=done, outputs=[])
    thinking.upon(audio_out, enter=speaking, outputs=[_arrived])
    thinking.upon(reply_done, enter=listening, outputs=[_arrived])
    thinking.upon(turn_over, enter=thinking, outputs=[])
    thinking.upon(end, enter=done, outputs=[])
    speaking.upon(audio_out, enter=speaking, outputs=[])
    speaking.upon(reply_done, enter=listening, outputs=[_arrived])
    speaking.upon(turn_over, enter=speaking, outputs=[])
    speaking.upon(end, enter=done, outputs=[])
    speaking.upon(caller_took_floor, enter=listening, outputs=[_arrived])
    thinking.upon(caller_took_floor, enter=listening, outputs=[_arrived])
    connecting.upon(caller_took_floor, enter=connecting, outputs=[])
    listening.upon(caller_took_floor, enter=listening, outputs=[])
    for _input in (set_up, turn_over, audio_out, reply_done, end, caller_took_floor):
        done.upon(_input, enter=done, outputs=[])
    del _input
