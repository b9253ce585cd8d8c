"""Shared fixtures: a tiny SD-shaped pipeline built from configs (no Hub, no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from explainer.models import LoadedModel  # noqa: E402
from explainer.tiny import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return LoadedModel.from_pipeline(tiny_pipeline(), model_id="tiny-random")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs more than a few seconds (real weights, browser)")
