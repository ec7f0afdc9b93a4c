"""Ordering keys on the embedded broker: one message of a key out at a time, in publish order.
(Google's emulator runs its subscription without ordering: see google_broker.py.)"""
import queue
import time

from .test_broker_contract import Backend


def test_one_message_per_key_at_a_time_in_publish_order(tmp_path):
    backend = Backend("embedded", tmp_path, None)
    broker = backend.broker()
    try:
        for name in ("a1", "a2", "a3"):
            broker.publish(name.encode(), {"n": name}, ordering_key="vm-a")
        broker.publish(b"b1", {"n": "b1"}, ordering_key="vm-b")
        broker.publish(b"free", {"n": "free"})
        received = queue.Queue()
        streaming_pull = broker.subscribe(received.put, 10)
        held = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # collect what comes while nothing is acked
            try:
                message = received.get(timeout=0.5)
                held[message.attributes["n"]] = message
            except queue.Empty:
                pass
        assert set(held) == {"a1", "b1", "free"}  # a2 waits for a1
        held["a1"].nack()  # a nacked message keeps blocking its key until it is acked
        redelivered = received.get(timeout=30)
        assert redelivered.attributes["n"] == "a1" and redelivered.delivery_attempt == 2
        redelivered.ack()
        assert received.get(timeout=5).attributes["n"] == "a2"
        streaming_pull.cancel()
    finally:
        backend.close()
