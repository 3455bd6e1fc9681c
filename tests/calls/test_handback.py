"""Letting go of the caller: where in the dialplan each way of letting go sends them, that a caller
already gone is no error, and the outcome each way makes."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel, capturedLogs

from tests.calls.fakes import FakeARI
from twisted_agent.ari.errors import ARIError
from twisted_agent.calls.handback import continue_in_dialplan, let_go, outcome
from twisted_agent.config import load_config

CALLER = "1700000000.1"
BASE = {"ARI_URL": "http://10.0.0.5:8088/ari", "RTP_ADVERTISE_HOST": "10.0.0.9"}
ALL = {"FALLBACK_CONTEXT": "after-ai", "FALLBACK_EXTENSION": "s", "FALLBACK_PRIORITY": "3",
       "TRANSFER_CONTEXT": "agents", "TRANSFER_EXTENSION": "100", "OVERFLOW_CONTEXT": "queue",
       "OVERFLOW_PRIORITY": "2"}


def calls(**env: str) -> Any:
    return load_config(None, {**BASE, **env}).calls


def sent(ari: FakeARI) -> list[tuple[Any, ...]]:
    return [r for r in ari.requests if r[0] in ("continue_in_dialplan", "hangup")]


@pytest.mark.parametrize("why, env, where", [
    ("continue", ALL, ("after-ai", "s", 3)),
    ("transfer", ALL, ("agents", "100", 1)),
    ("refused", ALL, ("queue", None, 2)),
    ("transfer", {"FALLBACK_CONTEXT": "after-ai"}, ("after-ai", None, 1)),
    ("refused", {"FALLBACK_CONTEXT": "after-ai"}, ("after-ai", None, 1)),
    ("continue", {}, (None, None, None)),  # the priority after Stasis()
    ("transfer", {}, (None, None, None)),
    ("refused", {}, (None, None, None)),
])
def test_where_in_the_dialplan_the_caller_goes(why: str, env: dict[str, str], where: tuple[Any, ...]) -> None:
    ari = FakeARI()
    ari.add_caller(CALLER)
    continue_in_dialplan(ari, calls(**env), CALLER, why)
    assert sent(ari) == [("continue_in_dialplan", CALLER, *where)]


def test_letting_go_hangs_up_sends_on_or_leaves_alone() -> None:
    for caller, names in (("hangup", ["hangup"]), ("continue", ["continue_in_dialplan"]),
                          ("transfer", ["continue_in_dialplan"]), (None, [])):
        ari = FakeARI()
        ari.add_caller(CALLER)
        done = Deferred.fromCoroutine(let_go(ari, calls(**ALL), CALLER, caller, Logger()))
        assert done.called and [r[0] for r in sent(ari)] == names, caller


def test_a_caller_already_gone_is_no_error_and_other_failures_are_logged_not_raised() -> None:
    ari = FakeARI()  # the caller hung up meanwhile: 404
    results: list[Any] = []
    Deferred.fromCoroutine(let_go(ari, calls(), CALLER, "hangup", Logger())).addBoth(results.append)
    assert results == [None]
    ari.add_caller(CALLER)
    ari.failures["continue_in_dialplan"] = ARIError(500, "POST", "/channels/x/continue", "boom")
    with capturedLogs() as logged:
        Deferred.fromCoroutine(let_go(ari, calls(), CALLER, "continue", Logger())).addBoth(results.append)
    assert results == [None, None]
    assert [e for e in logged if e["log_level"] == LogLevel.warn and "boom" in e["error"]], "the failure is logged"


@pytest.mark.parametrize("caller, reason, failed, expected", [
    (None, "caller hung up", False, "completed"),
    ("hangup", "agent hung up", False, "agent_hangup"),
    ("transfer", "transferred", False, "transferred"),
    ("continue", "shutdown", False, "shutdown"),
    ("continue", "provider unavailable", False, "failed"),
    ("hangup", "provider died", True, "failed"),
    (None, "caller hung up", True, "failed"),
])
def test_the_outcome_of_each_way_of_letting_go(caller: str | None, reason: str, failed: bool, expected: str) -> None:
    assert outcome(caller, reason, failed) == expected
