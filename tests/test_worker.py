"""subscriber.py's per-message logic (EventForwarder) against the real app served over loopback."""
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
from flask import Flask
from werkzeug.serving import make_server

from pubsub_cmdb import worker
from pubsub_cmdb.config import load_settings
from pubsub_cmdb.web import create_app

from . import services
from .e2e import eventually


class RecordedMessage:
    """A received message as the broker hands it over; records whether it was acked or nacked."""
    _ids = iter(range(1, 10**9))

    def __init__(self, action, vm_name, namespace="ns", message_id=None, data=b"12:00:00 - hi", attributes=None):
        self.data = data
        self.attributes = attributes if attributes is not None else {
            "action": action, "vm_name": vm_name, "namespace": namespace}
        self.message_id = message_id or str(next(self._ids))
        self.publish_time = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.delivery_attempt = 1
        self.answer = None

    def ack(self):
        self.answer = "ack"

    def nack(self):
        self.answer = "nack"

    def modify_ack_deadline(self, seconds):
        pass


TOKEN = "worker-test-token"


@contextmanager
def serving(env, port, **config):
    """The real app served over loopback on `port` (werkzeug's threaded server) while in the block."""
    app = create_app(load_settings(dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST="127.0.0.1:9",
                                        CMDB_API_TOKEN=TOKEN)))
    app.config.update(config)
    http = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.shutdown()
        http.server_close()


@pytest.fixture
def server(env):
    with serving(env, int(env["PORT"])) as address:
        yield address


def answered(messages, seconds=10):
    return eventually(lambda: all(m.answer for m in messages), seconds, interval=0.02, what="every answer")


def test_acks_applied_and_already_applied_nacks_the_rest(server, env):
    forwarder = worker.EventForwarder(server, TOKEN)
    messages = [RecordedMessage("create", "vm-1", message_id="a"), RecordedMessage("create", "vm-1", message_id="a"),
                RecordedMessage("create", "vm-1", message_id="b"), RecordedMessage("get", "vm-1"),
                RecordedMessage("update", "vm-1"), RecordedMessage("delete", "vm-9"),
                RecordedMessage(None, None, attributes={}, data=b"\xff from elsewhere")]
    for message in messages:
        forwarder(message)
    answered(messages)
    assert [m.answer for m in messages] == ["ack", "ack", "ack", "nack", "nack", "ack", "nack"]
    forwarder.close()


def test_many_messages_are_applied_once_each(server, env):
    forwarder = worker.EventForwarder(server, TOKEN)
    messages = [RecordedMessage("create", f"vm-{i}") for i in range(2000)]
    for message in messages:
        forwarder(message)
    answered(messages, 60)
    assert {m.answer for m in messages} == {"ack"}
    with sqlite3.connect(env["CMDB_DATABASE"]) as con:
        assert con.execute("SELECT count(*), count(DISTINCT vm_name) FROM vms").fetchone() == (2000, 2000)
    forwarder.close()


def test_server_down_holds_the_messages_until_it_is_back_and_logs_each_change_once(env, caplog):
    port = int(env["PORT"])
    forwarder = worker.EventForwarder(f"http://127.0.0.1:{port}", TOKEN, outage_pauses=(0.05, 0.2))
    messages = [RecordedMessage("create", f"vm-{i}") for i in range(3)]
    with caplog.at_level("INFO", logger="subscriber"):
        for message in messages:
            forwarder(message)
        time.sleep(2)  # nothing listens: many attempts, no answer given to the broker
        assert [m.answer for m in messages] == [None] * 3
        with serving(env, port):
            answered(messages)
            assert [m.answer for m in messages] == ["ack"] * 3
            forwarder.close()
    logged = [r.getMessage() for r in caplog.records]
    assert sum("unavailable (ConnectionError)" in line for line in logged) == 1, logged
    assert sum("is back" in line for line in logged) == 1, logged


def test_stopping_during_an_outage_nacks_the_messages_in_hand():
    forwarder = worker.EventForwarder(f"http://127.0.0.1:{services.free_port()}", outage_pauses=(0.05, 0.2))
    messages = [RecordedMessage("create", f"vm-{i}") for i in range(3)]
    for message in messages:
        forwarder(message)
    time.sleep(0.5)
    assert [m.answer for m in messages] == [None] * 3
    forwarder.close(seconds=5)
    assert [m.answer for m in messages] == ["nack"] * 3


def test_a_locked_cmdb_is_an_outage_waited_out_not_a_lost_event(env, caplog):
    """The server answers 503 when sqlite stays locked past its busy timeout; the events wait, then apply."""
    port = int(env["PORT"])
    with serving(env, port, CMDB_BUSY_TIMEOUT_SECONDS=0.1) as address:
        locker = sqlite3.connect(env["CMDB_DATABASE"], isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        forwarder = worker.EventForwarder(address, TOKEN, outage_pauses=(0.05, 0.2))
        messages = [RecordedMessage("create", f"vm-{i}") for i in range(3)]
        with caplog.at_level("INFO", logger="subscriber"):
            for message in messages:
                forwarder(message)
            time.sleep(1.5)
            assert [m.answer for m in messages] == [None] * 3
            locker.execute("ROLLBACK")
            answered(messages)
        forwarder.close()
        locker.close()
    assert [m.answer for m in messages] == ["ack"] * 3
    assert any("unavailable (HTTP 503)" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(env["CMDB_DATABASE"]) as con:
        assert con.execute("SELECT count(*) FROM vms").fetchone() == (3,)


def test_a_batch_the_server_fails_on_is_retried_a_few_times_then_nacked(env):
    failing = Flask("failing")
    calls = []

    @failing.post("/cmdb")
    def fail():
        calls.append(1)
        return "boom", 500

    port = int(env["PORT"])
    http = make_server("127.0.0.1", port, failing, threaded=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        forwarder = worker.EventForwarder(f"http://127.0.0.1:{port}", retry_delays=(0.05, 0.05))
        message = RecordedMessage("create", "vm-1")
        forwarder(message)
        answered([message])
        forwarder.close()
    finally:
        http.shutdown()
        http.server_close()
    assert message.answer == "nack" and len(calls) == 3  # the first attempt and two retries


def test_after_close_new_messages_are_nacked(server):
    forwarder = worker.EventForwarder(server, TOKEN)
    forwarder.close()
    late = RecordedMessage("create", "vm-late")
    forwarder(late)
    assert late.answer == "nack"


def test_close_finishes_the_messages_in_hand(server):
    forwarder = worker.EventForwarder(server, TOKEN)
    messages = [RecordedMessage("create", f"vm-{i}") for i in range(300)]
    for message in messages:
        forwarder(message)
    forwarder.close()
    assert all(m.answer == "ack" for m in messages)


def test_without_the_token_nothing_is_applied(server):
    forwarder = worker.EventForwarder(server, "not-the-token")
    message = RecordedMessage("create", "vm-1")
    forwarder(message)
    answered([message], 5)  # a refusal is not retried in place
    assert message.answer == "nack"
    forwarder.close()


def test_an_oversized_message_is_refused_alone_and_the_rest_applied(server):
    forwarder = worker.EventForwarder(server, TOKEN)
    small = [RecordedMessage("create", f"vm-{i}") for i in range(3)]
    huge = RecordedMessage("create", "vm-huge", data=b"x" * (3 * 1024 * 1024))  # past the server's 2 MB
    for message in (small[0], huge, small[1], small[2]):
        forwarder(message)
    answered(small + [huge], 5)  # refused at once: no in-place retries for a request the server refuses
    assert [m.answer for m in small] == ["ack"] * 3 and huge.answer == "nack"
    forwarder.close()
