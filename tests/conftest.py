"""Shared fixtures: a tiny SD-shaped pipeline built from configs (no Hub, no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket  # noqa: E402

import pytest  # noqa: E402

from explainer.models import LoadedModel  # noqa: E402
from explainer.families.sd1_tiny import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return LoadedModel.from_pipeline(tiny_pipeline(), model_id="tiny-random")


@pytest.fixture(scope="session")
def embedded_model() -> LoadedModel:
    """The shipped shapes model (skips where assets/ lacks it)."""
    from explainer import config
    from explainer.models import load_model

    if config.default_model_id() != config.EMBEDDED_MODEL_ID:
        pytest.skip("the embedded model is not in assets/")
    return load_model(config.EMBEDDED_MODEL_ID)


FULL_ONLY = "slow: the full suite runs it (python -m pytest --full, as bash .ci/run does)"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full suite, as CI runs it: also the tests marked slow (meaning checks on the embedded "
                          "model, the evaluation, the browser, README's examples)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: more than a few seconds (real weights, browser); runs with --full")


def pytest_collection_modifyitems(config, items):
    """The fast tier by default (every change); the slow tests only with --full."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason=FULL_ONLY)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def url():
    """The app, launched once for the whole test session on a free port."""
    import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, mcp_server=True)
    app.example.ready(timeout=120)  # as `python app.py` serves: with the first view's example made
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()
