"""Several engines on one PBX sharing one Redis, and Redis dying mid-call: with the simulator and a
real redis-server (started by the ``redis_server`` fixture on a free loopback port)."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq

from tests.calls.simstack import Stack, converse, sleep, until
from tests.web.conftest import hidden
from twisted_agent.web.auth import hash_password

PASSWORD = "two engines, one view"


async def health(stack: Stack) -> dict[str, Any]:
    assert stack.service is not None
    response = await treq.get(f"http://127.0.0.1:{stack.service.config.web.port}/health")
    return json.loads(await response.text())


async def admin_page(stack: Stack, path: str = "/admin/") -> str:
    """Log in to the stack's admin UI over real HTTP and fetch ``path``."""
    assert stack.service is not None
    base = f"http://127.0.0.1:{stack.service.config.web.port}"
    form = await treq.get(base + "/admin/login")
    cookies = {c.name: c.value or "" for c in form.cookies()}
    fields = {"password": PASSWORD, "csrf": hidden(await form.text(), "csrf"), "next": path}
    login = await treq.post(base + "/admin/login", data=fields, cookies=cookies, allow_redirects=False)
    assert login.code == 303, await login.text()
    cookies.update({c.name: c.value or "" for c in login.cookies()})
    page = await treq.get(base + path, cookies=cookies)
    assert page.code == 200
    return str(await page.text())


async def live_numbers(stack: Stack) -> list[str]:
    records = await stack.engine.store.live_calls()
    return sorted(record["caller_number"] for record in records)


async def _eventually_live(stack: Stack, wanted: list[str], timeout: float = 5) -> list[str]:
    numbers: list[str] = []
    for _ in range(int(timeout / 0.05)):
        numbers = await live_numbers(stack)
        if numbers == wanted:
            break
        await sleep(0.05)
    return numbers


@pytest_twisted.ensureDeferred
async def test_two_engines_one_redis_see_each_others_calls_and_a_full_engine_overflows(
        stacks: Any, redis_server: Any) -> None:
    admin = hash_password(PASSWORD)
    a = await stacks(ARI_APP="ai-a", ENGINE_ID="engine-a", REDIS_URL=redis_server.url, MAX_CALLS="1",
                     OVERFLOW_CONTEXT="ai-overflow", OVERFLOW_EXTENSION="s", DOWNSTREAM_MODE="stream",
                     ADMIN_PASSWORD_HASH=admin)
    b = await stacks(a.sim, ARI_APP="ai-b", ENGINE_ID="engine-b", REDIS_URL=redis_server.url,
                     DOWNSTREAM_MODE="stream", ADMIN_PASSWORD_HASH=admin)
    first = a.call(caller_number="1001")
    second = b.call(caller_number="1002")
    await first.answered
    await second.answered
    await until(lambda: len(a.engine.calls) == 1 and len(b.engine.calls) == 1, what="each engine to hold its call")
    for stack in (a, b):
        numbers = await _eventually_live(stack, ["1001", "1002"])
        assert numbers == ["1001", "1002"], f"{stack.app} sees {numbers}"
        records = await stack.engine.store.live_calls()
        assert {r["engine_id"] for r in records} == {"engine-a", "engine-b"}
        page = await admin_page(stack)  # what the operator sees on either engine
        for number, engine in (("1001", "engine-a"), ("1002", "engine-b")):
            assert number in page and engine in page, f"{stack.app}'s admin UI does not show {number} of {engine}"
        other = first if stack is b else second  # the other engine's call, opened from this one
        assert "Hang up" in await admin_page(stack, f"/admin/calls/{other.channel.id}")
    await until(lambda: a.engine.store.cluster_active() == 2 and b.engine.store.cluster_active() == 2,
                timeout=15, what="both engines to count two live calls in the cluster")
    for stack in (a, b):
        report = await health(stack)
        assert report["active_calls"] == 1 and report["cluster_active_calls"] == 2
        assert report["components"]["store"]["state"] == "connected"

    # engine a is full: the third call goes to the overflow context, unanswered
    third = a.call(caller_number="1003")
    await third.ended
    assert third.continued_to == ("ai-overflow", "s", 1)
    assert third.answered_at is None and not third.answered.called, "never answered"
    continues = [values for method, path, values in a.sim.requests
                 if method == "POST" and path.endswith(f"/channels/{third.channel.id}/continue")]
    assert [c.get("context") for c in continues] == ["ai-overflow"], "one continueInDialplan, to the overflow"
    refused = await b.engine.store.get_call(third.channel.id)
    assert refused is not None and refused["outcome"] == "refused" and refused["engine_id"] == "engine-a"

    # an operator on engine b hangs up engine a's call: through ARI; engine a cleans up and records it
    assert await b.engine.hang_up(first.channel.id) is True
    await first.ended
    await until(lambda: not a.engine.calls, what="engine a to release its call")
    finished = None
    for _ in range(100):
        finished = await b.engine.store.get_call(first.channel.id)
        if finished is not None and finished.get("state") == "ended":
            break
        await sleep(0.05)
    assert finished is not None and finished["state"] == "ended" and finished["engine_id"] == "engine-a"
    assert finished["outcome"] == "operator_hangup", "engine a knows an operator ended it, not the caller"
    assert finished["end_reason"] == "hung up by an operator on engine engine-b"
    marks = [values for method, path, values in a.sim.requests
             if method == "POST" and path.endswith(f"/channels/{first.channel.id}/variable")
             and values.get("variable") == "AI_AGENT_OPERATOR_HANGUP"]
    assert [m.get("value") for m in marks] == ["engine-b"], "marked by engine b, before its hang-up"
    assert await live_numbers(b) == ["1002"]
    await second.hangup()
    await until(lambda: not b.engine.calls, what="engine b to release its call")
    history = await a.engine.store.history()
    assert {r["caller_number"] for r in history} == {"1001", "1002", "1003"}


@pytest_twisted.ensureDeferred
async def test_redis_killed_mid_call_and_restarted_loses_nothing(stacks: Any, redis_server: Any) -> None:
    stack = await stacks(ENGINE_ID="engine-a", REDIS_URL=redis_server.url, DOWNSTREAM_MODE="stream")
    store = stack.engine.store
    await until(lambda: store.status().state == "connected", what="the store to connect")
    caller = stack.call(caller_number="2001")
    await caller.answered
    await until(lambda: stack.engine.calls and store.cluster_active() == 1, timeout=15, what="the live record")

    redis_server.kill()
    await until(lambda: store.status().state != "connected", what="the store to notice Redis is gone")
    report = await health(stack)
    assert report["status"] == "degraded" and report["components"]["store"]["ready"] is True
    # the call goes on: a whole turn while Redis is down
    await converse(caller)
    call = stack.engine.calls[caller.channel.id]
    assert len(call.turn_timings) == 1
    assert store.stats()["buffered"] > 0
    live = await store.live_calls()  # this engine's own calls are still shown
    assert [r["caller_number"] for r in live] == ["2001"] and len(live[0]["transcript"]) == 3
    await caller.hangup()
    await until(lambda: not stack.engine.calls, what="the call to end")

    redis_server.restart()
    await until(lambda: store.status().state == "connected", timeout=20, what="the store to reconnect")
    await until(lambda: store.stats()["buffered"] == 0, what="the buffered records to be written")
    history = await store.history(number="2001")
    assert len(history) == 1
    record = history[0]
    assert record["outcome"] == "completed" and len(record["transcript"]) == 3 and len(record["turns"]) == 1
    assert record["turns"][0]["voice_to_voice_ms"] > 0
    assert await store.live_calls() == []
    report = await health(stack)
    assert report["status"] == "ok"
    await stack.all_released()
