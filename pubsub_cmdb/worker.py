"""What subscriber.py does with each message: POST it to `/cmdb`, then ack or nack it by the answer.

No business rules here: the web app decides; its answer decides ack or nack.
- 2xx (applied, or already applied) and 409 (another message created the record): ack.
- other 4xx (unsupported action, invalid event): nack, so it stays on the queue; the subscription's
  retry policy (10 s to 10 min backoff) spaces the redeliveries.
- no answer, 502/503/504 (the server is down, restarting, or its database is locked): an outage.
  Hold the messages and retry with a growing pause (at most OUTAGE_MAX_PAUSE_SECONDS) for as long as
  it lasts; flow control stops new deliveries meanwhile and the broker's lease keeps the held ones.
  Nacking instead would hand them to the retry policy's backoff, which grows to 10 minutes.
- other 5xx (the server failed on this batch): retry a few times in place, then nack, so that a
  message the server cannot take reaches the dead-letter topic rather than blocking the rest.

Messages are sent in batches (one POST, one CMDB transaction for up to BATCH_SIZE events): the
streaming pull's callback only queues the message; sender threads post what has gathered.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import requests

from . import events
from .broker import Message

log = logging.getLogger("subscriber")

BATCH_SIZE = 500
BATCH_BYTES = 1024 * 1024  # POST /cmdb takes up to 2 MB: half of it leaves room for JSON escaping
BATCH_LINGER_SECONDS = 0.005  # how long a sender waits for a batch to fill once it has one message
SENDERS = 2  # one posts while the other gathers the next batch
RETRY_DELAYS_SECONDS = (0.5, 1, 2, 4, 8)  # in-place retries of a batch the server failed on (HTTP 500)
OUTAGE_FIRST_PAUSE_SECONDS = 0.5  # the server unreachable: pauses double from this ...
OUTAGE_MAX_PAUSE_SECONDS = 10     # ... up to this, until it answers again
OUTAGE_STATUSES = (502, 503, 504)  # a proxy's "nothing behind me", or the CMDB locked / overloaded
REQUEST_TIMEOUT_SECONDS = 60  # longer than the server's 30 s wait for a locked CMDB

_UNCHANGED = {"duplicate": "was applied before (a redelivery)",
              "conflict": "creates a record another message created",
              "stale": "is older than the VM's latest change"}


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
    """The subscribe callback: queues each message; sender threads POST them in batches to /cmdb."""

    def __init__(self, server_address: str, api_token: str | None = None, retry_delays=RETRY_DELAYS_SECONDS,
                 outage_pauses=(OUTAGE_FIRST_PAUSE_SECONDS, OUTAGE_MAX_PAUSE_SECONDS)):
        self.url = f"{server_address}/cmdb"
        self._headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self._retry_delays = retry_delays
        self._outage_pauses = outage_pauses
        self._health = _ServerHealth(server_address)
        self._waiting: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._senders = [threading.Thread(target=self._send_batches, name=f"sender-{i}", daemon=True)
                         for i in range(SENDERS)]
        for sender in self._senders:
            sender.start()

    def __call__(self, message: Message) -> None:
        if self._closing.is_set():
            message.nack()  # shutting down: give it straight back
            return
        self._waiting.put((message, events.from_pubsub(message.data, message.attributes, message.message_id,
                                                        message.publish_time)))

    def close(self, seconds: float = 60) -> None:
        """Stop taking messages, finish the batches in hand (ack or nack each), then return."""
        self._closing.set()
        for _ in self._senders:
            self._waiting.put(None)
        deadline = time.monotonic() + seconds
        for sender in self._senders:
            sender.join(max(0.0, deadline - time.monotonic()))

    # senders -------------------------------------------------------------------------------------
    def _send_batches(self) -> None:
        session = requests.Session()  # keep-alive: one connection per sender
        session.headers.update(self._headers)
        carry = None  # a message that did not fit the last batch: it starts the next one
        while True:
            batch, carry = self._gather(carry)
            if batch is None:
                return
            self._deliver(session, batch)

    @staticmethod
    def _size(item) -> int:
        """About how many bytes an event adds to a batch: its text plus room for the other fields."""
        return len(item[1]["message"]) * 2 + 512  # a character may take 2 bytes or more in JSON

    def _gather(self, first):
        """(batch, carry): up to BATCH_SIZE queued messages under BATCH_BYTES, waiting briefly for more once
        there is one; a message that would overflow the batch is carried to the next. (None, None) at the end."""
        first = first or self._waiting.get()
        if first is None:
            return None, None
        batch, size = [first], self._size(first)
        deadline = time.monotonic() + BATCH_LINGER_SECONDS
        while len(batch) < BATCH_SIZE:
            try:
                item = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._waiting.put(None)  # leave the end marker for this sender's next round
                break
            if size + self._size(item) > BATCH_BYTES:
                return batch, item  # an oversized message (another publisher's) goes alone: refused alone
            batch.append(item)
            size += self._size(item)
        return batch, None

    def _post(self, session: requests.Session, bodies: list[dict]):
        """The list of per-event results, or None when the batch should be nacked: the server failed on
        it RETRY_DELAYS_SECONDS times, or it was unreachable when the subscriber began to stop.

        A request the server refuses as a whole (413 too large, 401 no token) is answered for each event:
        the server is up, and retrying the same request cannot help.
        """
        failures = iter(self._retry_delays)
        pause, max_pause = self._outage_pauses
        while True:
            try:
                response = session.post(self.url, json=bodies, timeout=REQUEST_TIMEOUT_SECONDS)
            except requests.RequestException as error:
                response, outage = None, type(error).__name__
            else:
                outage = f"HTTP {response.status_code}" if response.status_code in OUTAGE_STATUSES else None
            if outage:
                self._health.down(outage)
                if self._closing.wait(pause):
                    return None  # stopping: give the messages back rather than wait for the server
                pause = min(pause * 2, max_pause)
                continue
            pause = self._outage_pauses[0]
            self._health.up()
            if response.status_code == 200:
                results = _results(response, len(bodies))
                if results is not None:
                    return results
                log.warning("unexpected answer from %s: %s", self.url, response.text[:200])
            elif response.status_code < 500:
                refused = {"status": response.status_code, "error": f"the server refused the request: "
                           f"HTTP {response.status_code} {response.reason}"}
                return [refused] * len(bodies)
            else:
                log.warning("%s failed on a batch of %d: HTTP %s", self.url, len(bodies), response.status_code)
            delay = next(failures, None)
            if delay is None or self._closing.wait(delay):
                return None

    def _deliver(self, session: requests.Session, batch: list) -> None:
        results = self._post(session, [body for _, body in batch])
        if results is None:
            for message, _ in batch:
                message.nack()
            return
        for (message, body), result in zip(batch, results):
            status, outcome = result.get("status"), result.get("outcome")
            if isinstance(status, int) and (200 <= status < 300 or status == 409):
                message.ack()
                if outcome in _UNCHANGED:
                    log.info("message %s %s: acked, nothing changed", message.message_id, _UNCHANGED[outcome])
                continue
            log.info("message %s (%s %s/%s, delivery %s) not applied: %s; nacked, it stays on the queue",
                     message.message_id, body["action"], body["namespace"], body["vm_name"],
                     message.delivery_attempt or "?", result.get("error", f"HTTP {status}"))
            message.nack()


def _results(response: requests.Response, expected: int) -> list | None:
    """The per-event results of a 200 answer to a batch, or None if it is not that."""
    try:
        results = response.json().get("results")
    except (ValueError, AttributeError):
        return None
    return results if isinstance(results, list) and len(results) == expected else None
