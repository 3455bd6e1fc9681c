"""Test-wide settings: a deterministic Hypothesis profile and a guard against async tests that never run."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

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
