"""The whole path on each broker (embedded, Google's emulator), with main.py and subscriber.py as real
processes: browser form → topic → subscriber.py → POST /cmdb → cmdb.sqlite → /cmdb page, and /messages
with ACK."""
import time

import pytest
import requests

from pubsub_cmdb import events
from pubsub_cmdb.config import load_settings
from pubsub_cmdb.broker import make_broker

from .e2e import System, eventually, pulled_rows



def test_create_from_the_form_shows_on_cmdb_and_delete_removes_it(system):
    system.start_subscriber()
    published = system.publish("create", "web-01", "Customer 2", "first VM")
    assert published.status_code == 200 and "Published create web-01 (Customer 2) as message" in published.text
    page = system.page_with("/cmdb", "web-01")
    assert "Customer 2" in page and " - first VM" in page
    assert system.publish("delete", "web-01", "Customer 2").status_code == 200
    eventually(lambda: system.records() == [], what="web-01 to be deleted")
    assert [row[0] for row in system.event_log()] == ["create", "delete"]
    assert "subscriber.py: pulling " + system.env["SUBSCRIPTION_NAME"] in system.log("subscriber")
    assert system.env["SERVER_ADDRESS"] in system.log("subscriber")


def test_get_and_update_stay_on_the_queue_until_acked(system):
    # Subscriber stopped: both wait on /messages, each with its ACK button.
    system.publish("get", "vm-get")
    system.publish("update", "vm-update")
    rows = eventually(lambda: (r := pulled_rows(system.messages_page())) and len(r) == 2 and r,
                      what="get and update on /messages")
    assert set(rows) == {"vm-get", "vm-update"}
    assert "Acknowledged" in system.ack(rows["vm-get"]).text

    # Subscriber running: the update is refused and nacked, never applied, and comes back to it (the
    # retry policy spaces the deliveries); the acked get is gone for good.
    system.start_subscriber()
    system.publish("create", "vm-marker")
    eventually(lambda: system.records(), what="the marker create")
    eventually(lambda: system.log("subscriber").count("action not supported: update") >= 2, 60,
               what="the subscriber to refuse the update twice")
    assert system.stop_subscriber() == 0
    assert [r[1] for r in system.records()] == ["vm-marker"]
    assert "vm-get" not in system.log("subscriber")
    # Visible again on /messages once the backoff has passed (on the emulator also the stopped stream's
    # deadline: README), so an operator can look at it and ack it.
    eventually(lambda: "vm-update" in pulled_rows(system.messages_page()), 60,
               what="the refused update back on /messages")

    # Still on the queue: a new subscriber gets the update again; the get never comes back.
    first_run = system.log("subscriber").count("action not supported: update")
    system.start_subscriber()
    eventually(lambda: system.log("subscriber").count("action not supported: update") > first_run, 90,
               what="the update to be delivered again")
    assert "vm-get" not in system.log("subscriber")
    assert [r[1] for r in system.records()] == ["vm-marker"]


def test_messages_page_shows_fields_and_foreign_messages(system, backend_env):
    broker = make_broker(load_settings(backend_env))
    broker.publish(b"\xff raw bytes from another publisher", {"source": "elsewhere"})
    system.publish("update", "vm-shown", "Customer 3", "look at me")
    page = system.page_with("/messages", "vm-shown", "raw bytes")
    assert "Customer 3" in page and " - look at me" in page and "update" in page
    assert "\ufffd raw bytes from another publisher" in page
    broker.close()


def test_unknown_ack_id_is_a_flashed_error(system):
    answer = system.ack("projects/nope/subscriptions/nope:123")
    assert answer.status_code == 200 and answer.url.endswith("/messages")
    assert "Not acknowledged: the ack id is unknown or has expired" in answer.text


def test_invalid_form_input_is_400_and_nothing_is_published(system):
    answer = system.publish("create", "   ")
    assert answer.status_code == 400 and "vm_name must not be empty" in answer.text
    answer = system.publish("create", "bad\x07name")
    assert answer.status_code == 400 and "control characters" in answer.text
    answer = system.publish("create", "vm", namespace="Not A Customer")
    assert answer.status_code == 400 and "Not a valid choice" in answer.text
    system.publish("get", "vm-valid")
    rows = eventually(lambda: pulled_rows(system.messages_page()), what="the valid message")
    assert list(rows) == ["vm-valid"]


def test_a_redelivered_create_is_harmless(system, backend_env):
    """A create applied whose ack was lost (e.g. the subscriber died) comes back: no second row, then acked."""
    system.publish("create", "vm-twice")
    broker = make_broker(load_settings(backend_env))
    pulled = eventually(lambda: broker.pull(1), what="the create")[0]
    body = events.from_pubsub(pulled.data, pulled.attributes, pulled.message_id, pulled.publish_time)
    assert requests.post(system.url + "/cmdb", json=body).status_code == 201  # applied, never acked
    system.start_subscriber()  # gets the redelivery once the 10 s deadline runs out
    eventually(lambda: f"message {pulled.message_id} was applied before" in system.log("subscriber"), 40,
               what="the redelivery to reach the subscriber")
    assert [r[1] for r in system.records()] == ["vm-twice"]
    assert system.event_log() == [("create", "vm-twice", "created")]
    assert system.stop_subscriber() == 0
    time.sleep(11)
    assert broker.pull(10) == []  # the subscriber acked the redelivery
    broker.close()


def test_subscriber_waits_for_a_web_server_that_is_not_up_yet(backend_env, tmp_path):
    system = System(backend_env, tmp_path)
    try:
        system.start_subscriber()
        broker = make_broker(load_settings(backend_env))
        data, attributes = events.to_pubsub(events.Event("create", "vm-late", "Customer 1", "x"))
        broker.publish(data, attributes)
        time.sleep(3)
        system.start_web()
        eventually(lambda: system.records(), 60, what="the create once the server is up")
        assert "unavailable" in system.log("subscriber") and "is back" in system.log("subscriber")
        broker.close()
    finally:
        system.stop()


def test_subscriber_stops_cleanly_on_sigterm(system):
    system.start_subscriber()
    assert system.stop_subscriber() == 0
    assert "stopping" in system.log("subscriber")


def test_one_vms_events_end_in_the_last_published_state_across_two_subscribers(system, backend_env):
    broker = make_broker(load_settings(backend_env))
    broker.provision()
    sequence = ["create", "delete"] * 10 + ["create"]
    for i, action in enumerate(sequence):
        for vm in ("vm-a", "vm-b"):
            event = events.Event(action, vm, "Customer 1", f"step {i}")
            data, attributes = events.to_pubsub(event)
            broker.publish(data, attributes, events.ordering_key(event))
    system.start_subscriber()
    second = System(backend_env, system.logs / "second")
    (system.logs / "second").mkdir()
    second.start_subscriber()
    try:
        eventually(lambda: len(system.event_log()) == 2 * len(sequence), 60, what="every event applied")
    finally:
        second.stop()
    for vm in ("vm-a", "vm-b"):
        outcomes = [outcome for action, name, outcome in system.event_log() if name == vm]
        assert len(outcomes) == len(sequence)  # each event once
        assert set(outcomes) <= {"created", "deleted", "stale", "absent", "conflict"}
    assert sorted(r[1] for r in system.records()) == ["vm-a", "vm-b"]  # the last event of each was a create
    broker.close()
