"""Outages with real processes: the web server down for a minute, the CMDB locked by another writer,
Google's emulator restarting under a running subscriber, and foreign messages that can never be
applied. subscriber.py must survive each, log once per change of state, and lose nothing."""
import sqlite3
import time
import uuid

import pytest

from pubsub_cmdb import emulator as pubsub_emulator
from pubsub_cmdb import events, store
from pubsub_cmdb.broker import dead_letter_subscription, make_broker
from pubsub_cmdb.config import load_settings

from . import services
from .e2e import System, eventually

pytestmark = pytest.mark.slow


def publish_create(broker, vm_name):
    event = events.Event("create", vm_name, "Customer 1", "12:00:00 - outage test")
    data, attributes = events.to_pubsub(event)
    return broker.publish(data, attributes, events.ordering_key(event))


@pytest.fixture
def running(backend_env, tmp_path):
    """main.py and subscriber.py on the broker of `backend_env`, and a broker client to publish with."""
    system = System(backend_env, tmp_path)
    broker = make_broker(load_settings(backend_env))
    system.start_web()
    system.start_subscriber()
    yield system, broker
    system.stop()
    broker.close()


def test_web_server_down_for_a_minute_loses_nothing_and_catches_up(running):
    system, broker = running
    publish_create(broker, "vm-0")
    eventually(lambda: system.records(), what="the first create")
    services.stop(system.web)  # SIGTERM: main.py goes away
    down_since = time.monotonic()
    for i in range(1, 31):  # events keep coming while it is down
        publish_create(broker, f"vm-{i}")
        time.sleep(1.5)
    time.sleep(max(0.0, 60 - (time.monotonic() - down_since)))
    assert len(system.records()) == 1  # nothing could be applied meanwhile
    system.start_web()
    # Held, not nacked: they are applied as soon as the server answers, not after the retry
    # policy's backoff (which would have grown to minutes after a minute of nacks).
    eventually(lambda: len(system.records()) == 31, 30, what="all 31 creates once the server is back")
    assert sorted(outcome for _, _, outcome in system.event_log()) == ["created"] * 31  # each once
    log = system.log("subscriber")
    assert log.count("unavailable") == 1 and log.count("is back") == 1, log
    assert "nacked" not in log
    assert system.subscriber.poll() is None


def test_a_locked_cmdb_delays_events_and_loses_none(running):
    system, broker = running
    locker = sqlite3.connect(system.env["CMDB_DATABASE"], isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the CMDB for 5 s
    try:
        for i in range(5):
            publish_create(broker, f"vm-{i}")
        time.sleep(5)
        assert system.records() == []  # readers still read (WAL); nothing written while locked
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    eventually(lambda: len(system.records()) == 5, 30, what="the 5 creates after the lock is released")
    assert len(system.event_log()) == 5
    assert "nacked" not in system.log("subscriber")


def test_foreign_messages_end_on_the_dead_letter_topic_and_the_rest_is_applied(backend_env, tmp_path):
    dead_letter_topic = f"dead-{uuid.uuid4().hex[:8]}"
    # A retry policy of 0 s: the five deliveries before dead-lettering take seconds, not minutes.
    env = dict(backend_env, DEAD_LETTER_TOPIC=dead_letter_topic, MAX_DELIVERY_ATTEMPTS="5",
               RETRY_MIN_BACKOFF="0", RETRY_MAX_BACKOFF="0")
    system = System(env, tmp_path)
    broker = make_broker(load_settings(env))
    dead = make_broker(load_settings(dict(env, TOPIC_NAME=dead_letter_topic, DEAD_LETTER_TOPIC="",
                                          SUBSCRIPTION_NAME=dead_letter_subscription(dead_letter_topic))))
    try:
        system.start_web()
        system.start_subscriber()
        foreign_id = broker.publish(b"\xff\xfe not an event", {"source": "another-team"})
        publish_create(broker, "vm-ok")
        [landed] = eventually(lambda: dead.pull(1), 120, what="the foreign message on the dead-letter topic")
        assert landed.data == b"\xff\xfe not an event" and landed.attributes["source"] == "another-team"
        assert [r[1] for r in system.records()] == ["vm-ok"]
        assert system.subscriber.poll() is None  # never crashed the subscriber
        log = system.log("subscriber")
        assert f"message {foreign_id}" in log and "action is required" in log
        con = store.connect(env["CMDB_DATABASE"])
        [row] = store.not_applied(con)  # and the CMDB's event log says what happened to it, and why
        con.close()
        assert (row["message_id"], row["outcome"], row["deliveries"]) == (foreign_id, "invalid", 5)
        assert "action is required" in row["detail"]
    finally:
        system.stop()
        broker.close()
        dead.close()


def test_subscriber_and_web_ride_out_an_emulator_restart(env, emulator_host, tmp_path):
    """The emulator keeps nothing across a restart: both processes create the topic and subscription again
    and carry on. (The embedded broker has no server process to restart.)"""
    port = services.free_port()
    emulator = pubsub_emulator.start(port)
    system = System(dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST=f"127.0.0.1:{port}"), tmp_path)
    try:
        system.start_web()
        system.start_subscriber()
        assert system.publish("create", "vm-before").status_code == 200
        eventually(lambda: system.records(), what="vm-before")
        pubsub_emulator.stop(emulator)
        down = system.publish("create", "vm-while-down")  # the form says it was not published
        assert down.status_code == 503 and "Not published" in down.text
        emulator = pubsub_emulator.start(port)
        eventually(lambda: "subscribed again" in system.log("subscriber"), 60,
                   what="subscriber.py to provision and subscribe again")
        assert system.publish("create", "vm-after").status_code == 200
        eventually(lambda: len(system.records()) == 2, 60, what="vm-after applied after the restart")
        assert sorted(r[1] for r in system.records()) == ["vm-after", "vm-before"]
        # The restarted emulator numbered its first message 1 again: a new event all the same.
        con = store.connect(system.env["CMDB_DATABASE"])
        assert [r["message_id"] for r in store.history(con, "Customer 1", "vm-after")] == \
            [r["message_id"] for r in store.history(con, "Customer 1", "vm-before")]
        con.close()
        assert system.subscriber.poll() is None  # the same process throughout
        log = system.log("subscriber")
        assert log.count("subscribed again") == 1 and 1 <= log.count("streaming pull stopped") <= 2, log
    finally:
        system.stop()
        pubsub_emulator.stop(emulator)


def test_after_an_emulator_restart_publish_and_pull_provision_again(env, emulator_host):
    port = services.free_port()
    emulator = pubsub_emulator.start(port)
    broker = make_broker(load_settings(dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST=f"127.0.0.1:{port}")))
    try:
        broker.provision()
        publish_create(broker, "vm-before")
        pubsub_emulator.stop(emulator)
        emulator = pubsub_emulator.start(port)  # empty: no topic, no subscription
        assert broker.pull(10) == []  # NotFound → provisioned again, not an error
        message_id = publish_create(broker, "vm-after")
        assert [m.message_id for m in eventually(lambda: broker.pull(10), what="the message")] == [message_id]
    finally:
        broker.close()
        pubsub_emulator.stop(emulator)
