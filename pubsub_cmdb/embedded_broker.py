"""Embedded Pub/Sub backend: topics, subscriptions and messages in one sqlite file, no server.

Several processes (main.py, one or more subscriber.py) share the file. The design:
- sqlite in WAL mode with a busy timeout: readers never block, writers queue for a moment.
- Publishing writes the message and one delivery row per subscription of its topic (fan-out) in one
  transaction, committed (and fsynced) before `publish` returns.
- A delivery row is visible when `visible_at` has passed. Claiming a batch sets a fresh lease token and
  `visible_at` = now + ack deadline in one BEGIN IMMEDIATE transaction, so no two holders ever have the
  same message; the ack id is "<message id>-<lease>", so an ack from an expired or superseded lease misses.
- A holder that dies simply stops extending its leases: its messages come back when the deadline passes.
  Nothing is ever lost by killing a process at any moment.
- Acked delivery rows are deleted; a message row goes with its last delivery row.

The streaming pull (`subscribe`) claims in batches, hands messages to a thread pool, and one writer thread
commits acks, nacks and lease extensions every few milliseconds in one transaction.
"""
from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Mapping

from .broker import (Broker, BrokerError, Message, PulledMessage, StreamingPull, UnknownAckId,
                     dead_letter_subscription, retry_delay)
from .sqlite_tx import write_transaction as _write

log = logging.getLogger(__name__)

ACK_DEADLINE_SECONDS = 10
MAX_ACK_DEADLINE_SECONDS = 600  # as on Pub/Sub
BUSY_TIMEOUT_SECONDS = 30  # how long a writer waits for another process's transaction
CLAIM_BATCH = 500  # most rows claimed in one transaction
POLL_SECONDS = 0.025  # idle subscribers look for new messages this often
FLUSH_SECONDS = 0.005  # acks and nacks wait at most this long to be committed
EXTEND_EVERY_SECONDS = 3  # held messages get a fresh ack deadline this often (well inside 10 s)
MAX_LEASE_SECONDS = 3600  # like the library's max_lease_duration: stop extending after an hour
CALLBACK_THREADS = 10  # the google library's default

SCHEMA_VERSION = 1
_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    ack_deadline_seconds INTEGER NOT NULL,
    min_backoff_seconds REAL NOT NULL,   -- retry policy for nacks: min * 2^(attempt-1), at most max
    max_backoff_seconds REAL NOT NULL,
    dead_letter_topic TEXT,              -- NULL: no dead-letter policy
    max_delivery_attempts INTEGER
);
CREATE INDEX IF NOT EXISTS subscriptions_by_topic ON subscriptions (topic);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a message id is never reused
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    attributes TEXT NOT NULL,              -- JSON object of strings
    ordering_key TEXT NOT NULL DEFAULT '', -- '' or a key: one message of a key out at a time, oldest first
    publish_time INTEGER NOT NULL          -- microseconds since the Unix epoch, UTC
);
CREATE TABLE IF NOT EXISTS deliveries (
    message_id INTEGER NOT NULL,
    subscription_id INTEGER NOT NULL,
    visible_at REAL NOT NULL,              -- Unix time from which it may be (re)delivered
    lease TEXT,                            -- token of the current or last claim; part of the ack id
    attempts INTEGER NOT NULL DEFAULT 0,   -- deliveries so far
    PRIMARY KEY (message_id, subscription_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (subscription_id, visible_at);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (ordering_key, id) WHERE ordering_key != '';
PRAGMA user_version = 1;
COMMIT;
"""

# Pub/Sub's attributes on a message forwarded to a dead-letter topic.
_DEAD_LETTER_ATTRIBUTES = ("CloudPubSubDeadLetterSourceDeliveryCount", "CloudPubSubDeadLetterSourceSubscription",
                           "CloudPubSubDeadLetterSourceSubscriptionProject",
                           "CloudPubSubDeadLetterSourceTopicPublishTime")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write transaction is an explicit BEGIN IMMEDIATE.
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    return con


def _now_us() -> int:
    return time.time_ns() // 1000


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


@dataclass(frozen=True)
class _Subscription:
    """A subscription's row, read once: subscriptions never change once created."""
    id: int
    name: str
    ack_deadline: int
    min_backoff: float
    max_backoff: float
    dead_letter_topic: str | None
    max_delivery_attempts: int | None
    project: str  # only for the dead-letter attributes, which name it

    def retry_delay(self, attempt: int) -> float:
        """How long a message nacked after delivery `attempt` stays away (the retry policy)."""
        return retry_delay(attempt, (self.min_backoff, self.max_backoff),
                           self.max_delivery_attempts if self.dead_letter_topic else None)


def _insert_message(con, topic: str, data: bytes, attributes: Mapping[str, str], publish_us: int,
                    ordering_key: str = "") -> int:
    """Store a message and fan it out: one delivery row per subscription of the topic. Returns its id."""
    message_id = con.execute("INSERT INTO messages (topic, data, attributes, ordering_key, publish_time) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (topic, data, json.dumps(attributes), ordering_key, publish_us)).lastrowid
    fanned_out = con.execute("INSERT INTO deliveries (message_id, subscription_id, visible_at) "
                             "SELECT ?, id, 0 FROM subscriptions WHERE topic = ?", (message_id, topic)).rowcount
    if not fanned_out:  # a topic without subscriptions keeps nothing, as on Pub/Sub
        con.execute("DELETE FROM messages WHERE id = ?", (message_id,))
    return message_id


def _forget_messages(con, message_ids) -> None:
    """Delete message rows that no subscription needs any more."""
    con.executemany("DELETE FROM messages WHERE id = ?1 AND NOT EXISTS "
                    "(SELECT 1 FROM deliveries WHERE message_id = ?1)", [(i,) for i in message_ids])


# Due deliveries, except a message whose ordering key has an older message still unacked on this
# subscription (held, waiting or backing off): per key, one at a time and in publish order.
_CLAIM = """
UPDATE deliveries SET visible_at = :until, lease = :lease, attempts = attempts + 1
WHERE subscription_id = :sub AND message_id IN (
    SELECT d.message_id FROM deliveries d JOIN messages m ON m.id = d.message_id
    WHERE d.subscription_id = :sub AND d.visible_at <= :now
      AND (m.ordering_key = '' OR NOT EXISTS (
          SELECT 1 FROM messages older JOIN deliveries od ON od.message_id = older.id
          -- "!= ''" is implied, but without it sqlite cannot use the partial index and scans every delivery
          WHERE older.ordering_key = m.ordering_key AND older.ordering_key != '' AND older.id < m.id
            AND od.subscription_id = :sub))
    ORDER BY d.visible_at LIMIT :n)
RETURNING message_id, attempts
"""


def _claim(con, sub: _Subscription, n: int) -> list[tuple]:
    """Lease up to n due messages for the ack deadline, atomically.

    Returns rows (message id, lease, attempts, data, attributes JSON, ordering key, publish µs), oldest first.
    Messages past their max delivery attempts go to the dead-letter topic instead, in the same transaction.
    """
    # A plain read first: an idle poll must not take the write lock from publishers.
    if con.execute("SELECT 1 FROM deliveries WHERE subscription_id = ? AND visible_at <= ? LIMIT 1",
                   (sub.id, time.time())).fetchone() is None:
        return []
    lease = secrets.token_hex(8)
    with _write(con):
        now = time.time()  # after BEGIN: waiting for the lock must not shorten the lease
        claimed = dict(con.execute(_CLAIM, {"until": now + sub.ack_deadline, "lease": lease, "sub": sub.id,
                                            "now": now, "n": n}).fetchall())
        if sub.dead_letter_topic:
            dead = [i for i, attempts in claimed.items() if attempts > sub.max_delivery_attempts]
            if dead:
                _dead_letter(con, sub, dead)
                for i in dead:
                    del claimed[i]
        if not claimed:
            return []
        rows = con.execute("SELECT id, data, attributes, ordering_key, publish_time FROM messages "
                           f"WHERE id IN ({_placeholders(len(claimed))}) ORDER BY id", list(claimed)).fetchall()
    return [(i, lease, claimed[i], data, attributes, key, publish_us) for i, data, attributes, key, publish_us in rows]


def _dead_letter(con, sub: _Subscription, message_ids: list[int]) -> None:
    """Forward messages delivered max_delivery_attempts times to the dead-letter topic, as Pub/Sub does."""
    rows = con.execute(f"SELECT id, data, attributes, publish_time FROM messages "
                       f"WHERE id IN ({_placeholders(len(message_ids))})", message_ids).fetchall()
    now_us = _now_us()
    for _, data, attributes, publish_us in rows:
        published = (_EPOCH + timedelta(microseconds=publish_us)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        extra = dict(zip(_DEAD_LETTER_ATTRIBUTES,
                         (str(sub.max_delivery_attempts), sub.name, sub.project, published)))
        _insert_message(con, sub.dead_letter_topic, data, {**json.loads(attributes), **extra}, now_us)
    con.executemany("DELETE FROM deliveries WHERE message_id = ? AND subscription_id = ?",
                    [(i, sub.id) for i in message_ids])
    _forget_messages(con, message_ids)
    log.info("%d message(s) of %s forwarded to dead-letter topic %s after %d delivery attempts",
             len(message_ids), sub.name, sub.dead_letter_topic, sub.max_delivery_attempts)


def _ack_id(message_id: int, lease: str) -> str:
    return f"{message_id}-{lease}"


def _parse_ack_id(ack_id: str) -> tuple[int, str] | None:
    message_id, _, lease = ack_id.partition("-")
    if not message_id.isdigit() or len(lease) != 16:
        return None
    return int(message_id), lease


class EmbeddedBroker(Broker):
    def __init__(self, settings):
        self.path = settings.pubsub_database
        self.description = f"embedded broker in {self.path}"
        self._topic = settings.topic_name
        self._subscription_name = settings.subscription_name
        self._dead_letter_topic = settings.dead_letter_topic
        self._max_delivery_attempts = settings.max_delivery_attempts
        self._retry_backoff = settings.retry_backoff
        self._project = settings.gcp_project
        self._local = threading.local()  # one connection per thread (the web app serves on several)
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pulls: list[_StreamingPull] = []
        self._subscription: _Subscription | None = None
        self._topic_exists = False
        try:
            con = self._con()
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                con.executescript(_SCHEMA)
            elif version != SCHEMA_VERSION:
                raise BrokerError(f"{self.path} has schema version {version}; this broker knows {SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise BrokerError(f"cannot open {self.path}: {error}") from error

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # FULL: a publish is fsynced before it returns, so not even a power cut loses it.
            con = self._local.con = _connect(self.path, synchronous="FULL")
            with self._lock:
                self._connections.append(con)
        return con

    # ---------------------------------------------------------------------------------------------
    def provision(self) -> list[str]:
        warnings: list[str] = []
        wanted = {"topic": self._topic, "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
                  "min_backoff_seconds": self._retry_backoff[0], "max_backoff_seconds": self._retry_backoff[1],
                  "dead_letter_topic": self._dead_letter_topic,
                  "max_delivery_attempts": self._max_delivery_attempts if self._dead_letter_topic else None}
        try:
            with _write(self._con()) as con:
                topics = [self._topic] + ([self._dead_letter_topic] if self._dead_letter_topic else [])
                con.executemany("INSERT OR IGNORE INTO topics (name) VALUES (?)", [(t,) for t in topics])
                if self._dead_letter_topic:
                    # What lands on the dead-letter topic stays there, to be looked at. No retry policy (as
                    # GoogleBroker creates it): a nack there redelivers at once.
                    self._create_subscription(con, dead_letter_subscription(self._dead_letter_topic), {
                        "topic": self._dead_letter_topic, "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
                        "min_backoff_seconds": 0, "max_backoff_seconds": 0,
                        "dead_letter_topic": None, "max_delivery_attempts": None}, warnings)
                self._create_subscription(con, self._subscription_name, wanted, warnings)
        except sqlite3.Error as error:
            raise BrokerError(f"cannot provision in {self.path}: {error}") from error
        return warnings

    @staticmethod
    def _create_subscription(con, name: str, wanted: dict, warnings: list[str]) -> None:
        """Create it if missing; an existing one is used as it is (as on Pub/Sub), with a warning if it differs."""
        columns = list(wanted)
        existing = con.execute(f"SELECT {', '.join(columns)} FROM subscriptions WHERE name = ?", (name,)).fetchone()
        if existing is None:
            con.execute(f"INSERT INTO subscriptions (name, {', '.join(columns)}) "
                        f"VALUES (?, {_placeholders(len(columns))})", (name, *wanted.values()))
        elif existing != tuple(wanted.values()):
            differs = ", ".join(f"{c}={v!r}" for c, v in zip(columns, existing) if v != wanted[c])
            warnings.append(f"subscription {name} exists with {differs}; using it as it is")

    def _sub(self) -> _Subscription:
        if self._subscription is None:
            query = ("SELECT id, name, ack_deadline_seconds, min_backoff_seconds, max_backoff_seconds, "
                     "dead_letter_topic, max_delivery_attempts FROM subscriptions WHERE name = ?")
            row = self._con().execute(query, (self._subscription_name,)).fetchone()
            if row is None:  # as GoogleBroker after NotFound: create what is missing, as at start
                self.provision()
                row = self._con().execute(query, (self._subscription_name,)).fetchone()
            self._subscription = _Subscription(*row, project=self._project)
        return self._subscription

    # ---------------------------------------------------------------------------------------------
    def publish(self, data: bytes, attributes: Mapping[str, str], ordering_key: str = "") -> str:
        """Store the message; messages with the same ordering key are delivered one at a time, in order."""
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        attributes = dict(attributes)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
            raise TypeError("attribute names and values must be strings")
        if not data and not attributes:
            raise BrokerError("publish failed: a message needs data or at least one attribute")
        try:
            if not self._topic_exists:
                if self._con().execute("SELECT 1 FROM topics WHERE name = ?", (self._topic,)).fetchone() is None:
                    self.provision()  # as GoogleBroker after NotFound: create what is missing, as at start
                self._topic_exists = True  # topics are never deleted
            with _write(self._con()) as con:
                message_id = _insert_message(con, self._topic, data, attributes, _now_us(), ordering_key)
        except sqlite3.Error as error:
            raise BrokerError(f"publish failed: {error}") from error
        return str(message_id)

    def pull(self, max_messages: int = 10) -> list[PulledMessage]:
        try:
            sub = self._sub()
            rows = _claim(self._con(), sub, max_messages)
        except sqlite3.Error as error:
            raise BrokerError(f"pull failed: {error}") from error
        return [PulledMessage(ack_id=_ack_id(i, lease), message_id=str(i), data=data,
                              attributes=json.loads(attributes), publish_time=_EPOCH + timedelta(microseconds=us),
                              delivery_attempt=attempts)
                for i, lease, attempts, data, attributes, _, us in rows]

    def acknowledge(self, ack_id: str) -> None:
        parsed = _parse_ack_id(ack_id)
        if parsed is None:
            raise UnknownAckId(f"not an ack id of this broker: {ack_id!r}")
        message_id, lease = parsed
        try:
            with _write(self._con()) as con:
                # Only the current lease, and only before its deadline: the message may be someone else's now.
                acked = con.execute("DELETE FROM deliveries WHERE message_id = ? AND subscription_id = ? "
                                    "AND lease = ? AND visible_at > ?",
                                    (message_id, self._sub().id, lease, time.time())).rowcount
                if acked:
                    _forget_messages(con, [message_id])
        except sqlite3.Error as error:
            raise BrokerError(f"acknowledge failed: {error}") from error
        if not acked:
            raise UnknownAckId(f"unknown or expired ack id: {ack_id}")

    def subscribe(self, callback: Callable[[Message], None], max_messages: int) -> StreamingPull:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        try:
            sub = self._sub()
        except sqlite3.Error as error:
            raise BrokerError(f"subscribe failed: {error}") from error
        pull = _StreamingPull(self.path, sub, callback, max_messages)
        with self._lock:
            self._pulls.append(pull)
        return pull

    def close(self) -> None:
        with self._lock:
            pulls, self._pulls = self._pulls, []
            connections, self._connections = self._connections, []
        for pull in pulls:
            pull.close()
        for con in connections:
            con.close()
        self._local = threading.local()


# What a held message's settlement does to its delivery row (the writer thread applies them in order).
_ACK, _NACK, _RELEASE, _UNDELIVERED, _EXTEND = "ack", "nack", "release", "undelivered", "extend"
_in_callback = threading.local()


class _Message:
    """What a `subscribe` callback receives: the shape of google.cloud.pubsub_v1's Message."""
    __slots__ = ("message_id", "data", "attributes", "ordering_key", "publish_time", "delivery_attempt",
                 "_pull", "_id", "_lease")

    def __init__(self, pull: _StreamingPull, row: tuple):
        self._id, self._lease, self.delivery_attempt, self.data, attributes, self.ordering_key, us = row
        self.message_id = str(self._id)
        self.attributes = json.loads(attributes)
        self.publish_time = _EPOCH + timedelta(microseconds=us)
        self._pull = pull

    @property
    def ack_id(self) -> str:
        return _ack_id(self._id, self._lease)

    def ack(self) -> None:
        self._pull._settle(self, _ACK)

    def nack(self) -> None:
        """Give it back; it is redelivered after the retry policy's backoff."""
        self._pull._settle(self, _NACK)

    def modify_ack_deadline(self, seconds: int) -> None:
        """Set the deadline to `seconds` from now; 0 gives the message back for immediate redelivery."""
        if not 0 <= seconds <= MAX_ACK_DEADLINE_SECONDS:
            raise ValueError(f"seconds must be from 0 to {MAX_ACK_DEADLINE_SECONDS}")
        self._pull._settle(self, _RELEASE if seconds == 0 else _EXTEND, seconds)

    def __repr__(self):
        return f"Message(message_id={self.message_id!r}, delivery_attempt={self.delivery_attempt})"


class _StreamingPull:
    """A running `subscribe`: a fetcher thread claims batches into a callback thread pool, at most
    `max_messages` held (delivered, not yet acked or nacked) at once; a writer thread commits the
    settlements and extends the leases of what is held. The shape of google's StreamingPullFuture."""

    def __init__(self, path: str, sub: _Subscription, callback, max_messages: int):
        self._sub = sub
        self._callback = callback
        self._max = max_messages
        # Refill by batches, not one row per ack: wait for a quarter of the window (or for POLL_SECONDS).
        self._refill = max(1, max_messages // 4)
        self._con = _connect(path, synchronous="NORMAL")  # a lost ack or claim only means a redelivery
        self._db_lock = threading.Lock()  # fetcher and writer share the connection
        self._state = threading.Condition()  # guards _held and _pending
        self._held: dict[int, tuple[str, float]] = {}  # message id → (lease, when claimed, monotonic)
        self._pending: list[tuple] = []  # settlements the writer has not committed yet
        self._stopping = threading.Event()
        self._callbacks_done = threading.Event()
        self._closed = False  # the writer has stopped: settlements are written by whoever makes them
        self._finished = threading.Event()
        self._shutdown_started = False
        self._error: BaseException | None = None
        self._executor = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="embedded-pubsub-callback")
        self._fetcher = threading.Thread(target=self._fetch_loop, name="embedded-pubsub-fetch", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="embedded-pubsub-write", daemon=True)
        self._fetcher.start()
        self._writer.start()

    # the future -----------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Stop fetching, let running callbacks finish, give back what was fetched but not handed over."""
        self._begin_shutdown()
        if not getattr(_in_callback, "active", False):  # a callback cancelling must not wait for itself
            self._finished.wait()
        return True

    def cancelled(self) -> bool:
        return self._stopping.is_set() and self._error is None

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None):
        """Block until the pull has stopped: True after cancel(), the error if it failed."""
        if not self._finished.wait(timeout):
            raise TimeoutError("the streaming pull is still running")
        if self._error is not None:
            raise self._error
        return True

    # threads --------------------------------------------------------------------------------------
    def _fetch_loop(self):
        try:
            while not self._stopping.is_set():
                with self._state:
                    self._state.wait_for(lambda: self._stopping.is_set() or self._free() >= self._refill,
                                         POLL_SECONDS)
                    free = self._free()
                if self._stopping.is_set():
                    break
                rows = []
                if free:
                    with self._db_lock:
                        rows = _claim(self._con, self._sub, min(free, CLAIM_BATCH))
                if not rows:
                    self._stopping.wait(POLL_SECONDS)
                    continue
                claimed_at = time.monotonic()
                with self._state:
                    for row in rows:
                        self._held[row[0]] = (row[1], claimed_at)
                for row in rows:
                    self._executor.submit(self._deliver, _Message(self, row))
        except Exception as error:
            self._fail(error)

    def _free(self) -> int:
        return self._max - len(self._held)

    def _deliver(self, message: _Message):
        if self._stopping.is_set():
            self._settle(message, _UNDELIVERED)  # fetched, never handed over: straight back to the queue
            return
        _in_callback.active = True
        try:
            self._callback(message)
        except Exception:
            # As the google library does: log it and nack, so the message is not stuck until cancel().
            log.exception("subscribe callback failed on message %s: nacked", message.message_id)
            message.nack()
        finally:
            _in_callback.active = False

    def _settle(self, message: _Message, kind: str, seconds: float = 0):
        with self._state:
            held = self._held.get(message._id)
            if held is None or held[0] != message._lease:
                return  # settled already (or given up after MAX_LEASE_SECONDS): a no-op, as in the library
            if kind != _EXTEND:
                del self._held[message._id]
                if self._free() == self._refill:
                    self._state.notify()
            self._pending.append((kind, message._id, message._lease, message.delivery_attempt, seconds))
        if self._closed:  # a late ack after the writer stopped: nobody else will write it
            try:
                self._flush()
            except Exception as error:  # ack() never raises in the library either; the message comes back
                log.warning("embedded streaming pull on %s: late %s not written: %s", self._sub.name, kind, error)

    def _write_loop(self):
        next_extension = time.monotonic() + EXTEND_EVERY_SECONDS
        try:
            while True:
                last = self._callbacks_done.wait(FLUSH_SECONDS)
                self._flush()
                if time.monotonic() >= next_extension:
                    self._extend_leases()
                    next_extension = time.monotonic() + EXTEND_EVERY_SECONDS
                if last:
                    return
        except Exception as error:
            self._fail(error)

    def _flush(self):
        """Commit the pending acks, nacks and deadline changes in one transaction."""
        with self._state:
            batch, self._pending = self._pending, []
        if not batch:
            return
        now = time.time()
        acks, moves = [], []
        for kind, message_id, lease, attempt, seconds in batch:
            key = (message_id, self._sub.id, lease)
            if kind == _ACK:
                acks.append(key)
            elif kind == _NACK:
                moves.append((now + self._sub.retry_delay(attempt), 0, *key))
            elif kind == _EXTEND:
                moves.append((now + seconds, 0, *key))
            else:  # _RELEASE counts as a delivery; _UNDELIVERED was never handed over, so it does not
                moves.append((now, 1 if kind == _UNDELIVERED else 0, *key))
        with self._db_lock, _write(self._con) as con:
            # A row whose lease changed (expired and claimed by someone else) is left alone.
            con.executemany("UPDATE deliveries SET visible_at = ?, attempts = attempts - ? "
                            "WHERE message_id = ? AND subscription_id = ? AND lease = ?", moves)
            con.executemany("DELETE FROM deliveries WHERE message_id = ? AND subscription_id = ? AND lease = ?",
                            acks)
            _forget_messages(con, [key[0] for key in acks])

    def _extend_leases(self):
        """Keep what this pull holds invisible to others for another ack deadline, like the library's leaser."""
        now = time.monotonic()
        with self._state:
            expired = [i for i, (_, since) in self._held.items() if now - since > MAX_LEASE_SECONDS]
            for i in expired:
                del self._held[i]  # given up: it comes back when its deadline passes
            if expired:
                self._state.notify()
            leases = [(i, lease) for i, (lease, _) in self._held.items()]
        if not leases:
            return
        until = time.time() + self._sub.ack_deadline
        with self._db_lock, _write(self._con) as con:
            con.executemany("UPDATE deliveries SET visible_at = max(visible_at, ?) "
                            "WHERE message_id = ? AND subscription_id = ? AND lease = ?",
                            [(until, i, self._sub.id, lease) for i, lease in leases])

    def close(self):
        """cancel() and release the connection (EmbeddedBroker.close does this)."""
        self.cancel()
        with self._db_lock:
            self._con.close()

    # shutting down --------------------------------------------------------------------------------
    def _fail(self, error: BaseException):
        log.error("embedded streaming pull on %s stopped: %s", self._sub.name, error)
        if self._error is None:
            self._error = error if isinstance(error, BrokerError) else BrokerError(f"streaming pull failed: {error}")
        self._begin_shutdown()

    def _begin_shutdown(self):
        with self._state:
            if self._shutdown_started:
                return
            self._shutdown_started = True
            self._stopping.set()
            self._state.notify_all()
        # Its own thread: the fetcher, the writer or a callback may be the one asking.
        threading.Thread(target=self._shutdown, name="embedded-pubsub-shutdown", daemon=True).start()

    def _shutdown(self):
        self._fetcher.join()
        self._executor.shutdown(wait=True)  # running callbacks finish; queued ones give their message back
        self._callbacks_done.set()
        self._writer.join()  # its last round commits what the callbacks settled
        self._closed = True
        try:
            self._flush()  # what was settled meanwhile, or everything if the writer stopped on an error
        except Exception as error:
            log.error("embedded streaming pull on %s: last flush failed: %s", self._sub.name, error)
        self._finished.set()
