"""Fixtures shared by the model registry and installer tests."""

from __future__ import annotations

from typing import Any

import pytest

from twisted_agent.config import LocalProviderConfig


@pytest.fixture
def models_config(tmp_path: Any) -> LocalProviderConfig:
    """An empty MODELS_DIR of the test's own."""
    return LocalProviderConfig(models_dir=str(tmp_path / "models"))
