"""Crash safety with real processes: SIGKILL subscriber.py and main.py at random moments while
thousands of create and delete events drain, restart them, and check the CMDB is exactly right:
every event applied once, in order per VM, nothing lost."""
import random
import signal
import threading
import time

import pytest

from pubsub_cmdb import events
from pubsub_cmdb.broker import make_broker
from pubsub_cmdb.config import load_settings

from . import services
from .e2e import System, eventually, nothing_comes

pytestmark = pytest.mark.slow


def scripted_events(rng: random.Random, vms: int) -> tuple[list[events.Event], set[tuple[str, str]]]:
    """Per VM a valid history (create, delete, create, ...); returns the events and the expected records."""
    history, expected = [], set()
    for i in range(vms):
        namespace = f"Customer {i % 3 + 1}"
        steps = rng.randint(1, 8)
        for step in range(steps):
            history.append(events.Event("delete" if step % 2 else "create", f"crash-vm-{i}", namespace,
                                        f"step {step}"))
        if steps % 2:
            expected.add((namespace, f"crash-vm-{i}"))
    return history, expected


def test_random_sigkills_lose_nothing_and_apply_nothing_twice(backend_env, tmp_path):
    rng = random.Random(20261204)
    history, expected = scripted_events(rng, 600)
    broker = make_broker(load_settings(backend_env))
    broker.provision()

    def publish_over(seconds):  # events keep arriving while processes die
        pace = seconds / len(history)
        for event in history:
            data, attributes = events.to_pubsub(event)
            broker.publish(data, attributes, events.ordering_key(event))
            time.sleep(pace)

    publisher = threading.Thread(target=publish_over, args=(20,))
    system = System(backend_env, tmp_path)
    system.start_web()
    system.start_subscriber()
    publisher.start()
    kills = {"main": 0, "subscriber": 0}
    try:
        while publisher.is_alive():
            # Every few seconds: each crash costs its messages a retry-policy backoff (10 s, 20 s, ...).
            time.sleep(rng.uniform(1.5, 4.0))
            victim = rng.choice(["main", "subscriber"])
            kills[victim] += 1
            if victim == "main":
                services.stop(system.web, signal.SIGKILL)
                time.sleep(rng.uniform(0, 1))
                system.start_web()
            else:
                services.stop(system.subscriber, signal.SIGKILL)
                time.sleep(rng.uniform(0, 1))
                system.start_subscriber()
        eventually(lambda: len(system.event_log()) >= len(history), 240, interval=1,
                   what=f"all {len(history)} events applied (kills: {kills})")
        # Applied but not acked when a subscriber died: such messages come back within 25 s (the ack
        # deadline; on the emulator also a dead stream's deadline) and are acked as duplicates.
        time.sleep(30)
        system.stop()
        nothing_comes(broker, 30)  # what a dead stream on the emulator holds shows within 25 s
    finally:
        publisher.join()
        system.stop()
        broker.close()

    log = system.event_log()
    assert len(log) == len(history)  # events.message_id is the primary key: each applied exactly once
    assert {(namespace, vm) for namespace, vm, _ in system.records()} == expected  # each VM's last event wins
    assert kills["main"] and kills["subscriber"]  # the chaos did happen
