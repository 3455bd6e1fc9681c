"""Test-wide settings: a deterministic Hypothesis profile, a guard against async tests that never run, and a
real redis-server fixture."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

settings.register_profile(
    "twisted-agent",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("twisted-agent")

_PYTEST_TWISTED_MARK = "_pytest_twisted_mark"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    """Fail any ``async def`` test that pytest-twisted does not drive.

    Without ``@pytest_twisted.ensureDeferred`` (or ``inlineCallbacks``) pytest calls the
    coroutine function, gets a coroutine back and reports a pass without running a line of it.
    """
    unwrapped = []
    for item in items:
        function = getattr(item, "obj", None)
        if function is None:
            continue
        chain = [function]
        while hasattr(chain[-1], "__wrapped__") and len(chain) < 20:
            chain.append(chain[-1].__wrapped__)
        # hypothesis keeps the test it wraps on .hypothesis.inner_test
        inner = getattr(getattr(function, "hypothesis", None), "inner_test", None)
        if inner is not None:
            chain.append(inner)
        if any(inspect.iscoroutinefunction(f) for f in chain) and not any(
            getattr(f, _PYTEST_TWISTED_MARK, None) for f in chain
        ):
            unwrapped.append(item.nodeid)
    if unwrapped:
        raise pytest.UsageError(
            "async tests must be decorated with @pytest_twisted.ensureDeferred: " + ", ".join(unwrapped))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of its own (see tests/redis_server.py); stopped after the test."""
    from tests.redis_server import RedisServer  # here: most test runs never start one

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
