"""A real Asterisk for the tests of this directory: one instance per test session.

Without an Asterisk 22.8+ (``AST_PREFIX``, default ``../shared/asterisk``) the tests skip, saying
how to provide one; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.asterisk import harness
from tests.asterisk.instance import Asterisk, AsteriskUnavailable, check, short_workdir
from tests.helpers import free_port, unavailable


@pytest.fixture(scope="session")
def asterisk() -> Iterator[Asterisk]:
    try:
        root = check()
    except AsteriskUnavailable as e:
        unavailable(str(e))
    workdir = short_workdir()
    harness.write_clips(workdir / "clips")
    base = random.randrange(20000, 29000, 200)
    instance = Asterisk(workdir, free_port(), (base, base + 198), harness.dialplan(workdir / "clips"), root=root)
    try:
        instance.start()
    except AsteriskUnavailable as e:
        shutil.rmtree(workdir, ignore_errors=True)
        unavailable(str(e))
    yield instance
    instance.stop()
    if os.environ.get("AST_KEEP_WORKDIR"):  # logs and recordings, to read after a failure
        print(f"Asterisk's work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def engines(asterisk: Asterisk, tmp_path: Path) -> Iterator[Callable[..., harness.Engine]]:
    """Starts engines (``twistd -n ai-agent``) on this Asterisk; each is stopped after the test."""
    started: list[harness.Engine] = []

    def start(registered: bool = True, ari_url: str = "", **settings: Any) -> harness.Engine:
        engine = harness.Engine(asterisk, tmp_path / f"engine-{len(started)}",
                                {k: str(v) for k, v in settings.items()}, ari_url=ari_url).start()
        started.append(engine)
        if registered:
            engine.wait_registered()
        return engine

    yield start
    for engine in started:
        engine.stop()
    # a failed test may leave its callers: the next test starts from an empty Asterisk
    for channel in asterisk.ari("GET", "/channels") if asterisk.running else []:
        try:
            asterisk.ari("DELETE", f"/channels/{channel['id']}")
        except OSError:
            pass
