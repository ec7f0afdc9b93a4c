"""What subscriber.py does with each message: POST it to `/cmdb`, then ack or give it back.

No business rules here: the web app decides; the answer decides ack or nack.
- 2xx (applied, or already applied) and 409 (another message created the record): ack.
- other 4xx (unsupported action, invalid event): nack, so it stays on the queue; the subscription's
  retry policy (10 s to 10 min backoff) spaces the redeliveries.
- 5xx or no answer: retry a few times in place (holding the message, which also pauses new work
  while the server is down), then nack.
"""
from __future__ import annotations

import logging
import threading
import time

import requests

from . import events
from .broker import Message

log = logging.getLogger("subscriber")

RETRY_DELAYS_SECONDS = (0.5, 1, 2, 4, 8)  # in-place retries while the server is down or failing
REQUEST_TIMEOUT_SECONDS = 30


_UNCHANGED = {"duplicate": "was applied before (a redelivery)",
              "conflict": "creates a record another message created"}


class _ServerHealth:
    """Logs when the server goes away and when it is back: once per change, not once per message."""

    def __init__(self, address):
        self._address = address
        self._lock = threading.Lock()
        self._problem = None

    def down(self, problem: str):
        with self._lock:
            changed, self._problem = self._problem is None, problem
        if changed:
            log.warning("server %s unavailable (%s): holding messages and retrying", self._address, problem)

    def up(self):
        with self._lock:
            changed, self._problem = self._problem is not None, None
        if changed:
            log.info("server %s is back: catching up", self._address)


class EventForwarder:
    """The subscribe callback: one instance serves all of the streaming pull's callback threads."""

    def __init__(self, server_address: str, retry_delays=RETRY_DELAYS_SECONDS):
        self.url = f"{server_address}/cmdb"
        self._retry_delays = retry_delays
        self._local = threading.local()  # one keep-alive session per callback thread
        self._health = _ServerHealth(server_address)

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, body: dict):
        """The server's answer, or None when it stayed unreachable or failing through every retry."""
        for delay in (*self._retry_delays, None):
            try:
                response = self._session().post(self.url, json=body, timeout=REQUEST_TIMEOUT_SECONDS)
                if response.status_code < 500:
                    self._health.up()
                    return response
                self._health.down(f"HTTP {response.status_code}")
            except requests.RequestException as error:
                self._health.down(type(error).__name__)
            if delay is None:
                return None
            time.sleep(delay)

    @staticmethod
    def _outcome(response) -> str | None:
        try:
            return response.json().get("outcome")
        except ValueError:
            return None

    def __call__(self, message: Message) -> None:
        body = events.from_pubsub(message.data, message.attributes, message.message_id, message.publish_time)
        response = self._post(body)
        if response is not None and (response.ok or response.status_code == 409):
            message.ack()
            unchanged = _UNCHANGED.get(self._outcome(response))
            if unchanged:
                log.info("message %s %s: acked, nothing changed", message.message_id, unchanged)
            return
        if response is None:
            message.nack()
            return
        try:
            reason = response.json().get("error", response.reason)
        except ValueError:
            reason = f"HTTP {response.status_code}"
        log.info("message %s (%s %s/%s, delivery %s) not applied: %s; nacked, it stays on the queue",
                 message.message_id, body["action"], body["namespace"], body["vm_name"],
                 message.delivery_attempt or "?", reason)
        message.nack()
