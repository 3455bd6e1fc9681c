"""What each part of the engine reports about itself, for /health, /ready and ``ai-agent check``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class ComponentStatus:
    #: running, connected, connecting, disconnected, listening, stopped, placeholder, error
    state: str
    #: True when this part does not stop the engine from taking calls
    ready: bool
    detail: str = ""
    #: False for a part that later work fills in; /health says so instead of pretending
    implemented: bool = True

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class IStatusSource(Interface):
    """A part of the engine that can say how it is doing, cheaply and synchronously."""

    component = Attribute("short name shown in /health, e.g. 'ari' or 'media'")

    def status() -> ComponentStatus:
        """The current state; must not block and must not raise."""
