import os
import uuid

import pytest

from pubsub_cmdb import emulator as pubsub_emulator
from pubsub_cmdb.config import load_settings
from pubsub_cmdb.web import create_app

from . import services
from .e2e import System

REQUIRE_EMULATOR = os.environ.get("PUBSUB_CMDB_REQUIRE_EMULATOR") == "1"  # set by .ci/run


@pytest.fixture(scope="session")
def emulator_host():
    """Google's Pub/Sub emulator for the whole session (skipped loudly where it is not installed)."""
    if pubsub_emulator.binary() is None:
        reason = f"SKIPPED LOUDLY: the emulator tests did not run: {pubsub_emulator.INSTALL_HINT}"
        if REQUIRE_EMULATOR:
            pytest.fail(reason)
        pytest.skip(reason)
    with services.emulator() as host:
        yield host


@pytest.fixture
def names():
    """Fresh topic and subscription names: tests share one emulator but never a subscription."""
    run = uuid.uuid4().hex[:10]
    return {"TOPIC_NAME": f"topic-{run}", "SUBSCRIPTION_NAME": f"sub-{run}"}


@pytest.fixture
def env(tmp_path, names):
    """Environment for the project's processes and settings: an isolated CMDB and fresh names."""
    port = services.free_port()
    return dict(
        {k: v for k, v in os.environ.items() if k not in ("PUBSUB_EMULATOR_HOST", "GCP_PROJECT")},
        **names,
        GCP_PROJECT="test-project",
        CMDB_DATABASE=str(tmp_path / "cmdb.sqlite"),
        PORT=str(port),
        SERVER_ADDRESS=f"http://127.0.0.1:{port}",
        SECRET="test-secret",
    )


@pytest.fixture
def emulator_env(env, emulator_host):
    return dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST=emulator_host)


@pytest.fixture(params=["embedded", "emulator"])
def backend_env(request, env):
    """The environment for each broker in turn: the embedded one, then Google's emulator."""
    if request.param == "emulator":
        return dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST=request.getfixturevalue("emulator_host"))
    return dict(env, BROKER="embedded")


@pytest.fixture
def system(backend_env, tmp_path):
    """main.py serving on the broker of `backend_env`; tests start subscriber.py when they need it."""
    running = System(backend_env, tmp_path)
    running.start_web()
    yield running
    running.stop()


@pytest.fixture
def app(env):
    """The Flask app over a fresh CMDB. Tests that publish or pull use `emulator_env` instead."""
    env = dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST="127.0.0.1:9")  # never contacted by these routes
    return create_app(load_settings(env))


@pytest.fixture
def client(app):
    return app.test_client()
