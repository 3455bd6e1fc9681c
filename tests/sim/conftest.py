"""Fixtures: a started simulator on loopback, a REST client for it, and an events WebSocket."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor

from tests.sim.client import Ari, Events
from twisted_agent.sim import AsteriskSimulator


@pytest_twisted.async_yield_fixture()
async def sim(tmp_path) -> AsyncIterator[AsteriskSimulator]:
    simulator = AsteriskSimulator(reactor, media_root=str(tmp_path), rng=random.Random(1234))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest_twisted.async_fixture()
async def ari(sim: AsteriskSimulator) -> Ari:
    return Ari(sim.ari_url)


@pytest_twisted.async_yield_fixture()
async def events(sim: AsteriskSimulator) -> AsyncIterator[Events]:
    connection = await Events.connect(sim.ari_url)
    yield connection
    connection.close()
