"""subscriber.py's per-message logic (EventForwarder) against the real app served over loopback."""
import sqlite3
import threading
from datetime import datetime, timezone

import pytest
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


@pytest.fixture
def server(env):
    app = create_app(load_settings(dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST="127.0.0.1:9",
                                        CMDB_API_TOKEN=TOKEN)))
    port = int(env["PORT"])
    http = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    http.shutdown()


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


def test_server_down_nacks_after_the_retries_and_logs_once(caplog):
    address = f"http://127.0.0.1:{services.free_port()}"  # nothing listens there
    forwarder = worker.EventForwarder(address, retry_delays=(0.05, 0.05))
    messages = [RecordedMessage("create", f"vm-{i}") for i in range(3)]
    with caplog.at_level("INFO", logger="subscriber"):
        for message in messages:
            forwarder(message)
        answered(messages)
    assert [m.answer for m in messages] == ["nack"] * 3
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    forwarder.close()


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
