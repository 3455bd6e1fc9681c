"""What the admin UI needs of the engine beyond the store."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface


class ICallControl(Interface):
    """Actions an operator can take on a live call."""

    def hang_up(call_id: str) -> Deferred[bool]:
        """End the call: this engine's own calls through their normal clean-up, another engine's
        through ARI (the channel is hung up; its engine sees the hang-up and cleans up). Fires True
        when the call was found and ended, False when no such call is live. Never fails."""
