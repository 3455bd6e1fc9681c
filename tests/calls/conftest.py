"""Fixtures of the call tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.calls.simstack import Stack


@pytest.fixture
def stacks(tmp_path: Path) -> Any:
    started: list[Stack] = []

    async def make(sim: Any = None, **env: str) -> Stack:
        stack = Stack(tmp_path / f"stack{len(started)}", sim, **env)
        started.append(stack)
        return await stack.start()

    yield make
    for stack in reversed(started):  # a stack that shares another's simulator stops before it
        pytest_twisted.blockon(Deferred.fromCoroutine(stack.stop()))
