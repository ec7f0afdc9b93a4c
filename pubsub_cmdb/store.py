"""The CMDB: a sqlite file with the `vms` table and the log of applied events.

Every change to `vms` is decided and written in one transaction together with its row in `events`,
keyed by the Pub/Sub message id: a redelivered message finds its row and changes nothing.

Events may also arrive out of publish order (a broker without ordering, redeliveries after a crash):
`vm_versions` keeps, per VM, the publish time of the latest create and of the latest delete seen, and
a VM exists exactly when its latest create is newer than its latest delete. An event that does not
change that is `stale` (or a `conflict`, for a create of an existing record). The CMDB thus ends in
the state of each VM's last published event, whatever the arrival order.
"""
from __future__ import annotations

import enum
import sqlite3
from datetime import datetime, timedelta, timezone

from .events import Event
from .sqlite_tx import write_transaction as transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_name         TEXT NOT NULL,
    namespace       TEXT NOT NULL,
    message         TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_message_id TEXT,
    UNIQUE (namespace, vm_name)
);
-- Per VM, the publish times of the latest create and delete seen (UTC ISO 8601: they sort as text).
CREATE TABLE IF NOT EXISTS vm_versions (
    namespace      TEXT NOT NULL,
    vm_name        TEXT NOT NULL,
    last_create    TEXT NOT NULL DEFAULT '',
    last_delete    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (namespace, vm_name)
);
-- One row per event that reached the CMDB with a message id: what happened to it, once.
CREATE TABLE IF NOT EXISTS events (
    message_id   TEXT PRIMARY KEY,
    action       TEXT NOT NULL,
    vm_name      TEXT NOT NULL,
    namespace    TEXT NOT NULL,
    publish_time TEXT,
    applied_at   TEXT NOT NULL,
    outcome      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_vm ON events (namespace, vm_name, applied_at);
"""

BUSY_TIMEOUT_SECONDS = 30  # another writer holds the lock: wait for it rather than fail the event


class Outcome(enum.Enum):
    CREATED = "created"
    DELETED = "deleted"
    ABSENT = "absent"            # delete of a record that is not there: nothing to do
    DUPLICATE = "duplicate"      # this message id was applied before: nothing changed
    CONFLICT = "conflict"        # create of a record another message already created
    STALE = "stale"              # published before the VM's latest applied change: nothing to do
    UNSUPPORTED = "unsupported"  # get / update: never applied


def connect(path: str, busy_timeout: float = BUSY_TIMEOUT_SECONDS) -> sqlite3.Connection:
    """A connection in autocommit mode; `transaction()` opens the write transactions explicitly."""
    con = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across process crashes
    return con


def init_schema(path: str) -> None:
    con = connect(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        con.executescript(SCHEMA)
    finally:
        con.close()


def is_busy(error: sqlite3.Error) -> bool:
    """True for "database is locked" / "busy": another writer kept the lock past the busy timeout."""
    return isinstance(error, sqlite3.OperationalError) and ("locked" in str(error) or "busy" in str(error))


def _now(offset_microseconds: int = 0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(microseconds=offset_microseconds)
    return moment.isoformat(timespec="microseconds")  # as events.parse writes publish times


def apply(con: sqlite3.Connection, event: Event) -> Outcome:
    """Apply one event to the CMDB, at most once per message id."""
    return apply_many(con, [event])[0]


def apply_many(con: sqlite3.Connection, events: list[Event]) -> list[Outcome]:
    """Apply events in order, in one transaction: each at most once per message id, all or none written."""
    outcomes = [Outcome.UNSUPPORTED] * len(events)
    supported = [i for i, event in enumerate(events) if event.action in ("create", "delete")]
    if not supported:
        return outcomes
    with transaction(con):
        for order, i in enumerate(supported):
            # Events posted without a publish time (not from Pub/Sub) count as published now, in order.
            outcomes[i] = _apply_one(con, events[i], _now(order))
    return outcomes


def _apply_one(con: sqlite3.Connection, event: Event, now: str) -> Outcome:
    if event.message_id is not None:
        seen = con.execute("SELECT 1 FROM events WHERE message_id = ?", (event.message_id,)).fetchone()
        if seen:
            return Outcome.DUPLICATE
    version = event.publish_time or now
    key = (event.namespace, event.vm_name)
    existed = con.execute("SELECT 1 FROM vms WHERE namespace = ? AND vm_name = ?", key).fetchone() is not None
    column = "last_create" if event.action == "create" else "last_delete"
    last_create, last_delete = con.execute(
        f"INSERT INTO vm_versions (namespace, vm_name, {column}) VALUES (?, ?, ?)"
        f" ON CONFLICT (namespace, vm_name) DO UPDATE SET {column} = max({column}, excluded.{column})"
        " RETURNING last_create, last_delete", (*key, version)).fetchone()
    exists = last_create > last_delete  # the latest published change wins; a tie counts as deleted
    if exists and not existed:
        con.execute("INSERT INTO vms (vm_name, namespace, message, created_at, updated_at, last_message_id)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (event.vm_name, event.namespace, event.message, now, now, event.message_id))
        return _logged(con, event, now, Outcome.CREATED)
    if existed and not exists:
        con.execute("DELETE FROM vms WHERE namespace = ? AND vm_name = ?", key)
        return _logged(con, event, now, Outcome.DELETED)
    if event.action == "create":
        return _logged(con, event, now, Outcome.CONFLICT if existed else Outcome.STALE)
    return _logged(con, event, now, Outcome.STALE if existed else Outcome.ABSENT)


def _logged(con: sqlite3.Connection, event: Event, now: str, outcome: Outcome) -> Outcome:
    if event.message_id is not None:
        con.execute(
            "INSERT INTO events (message_id, action, vm_name, namespace, publish_time, applied_at, outcome)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.message_id, event.action, event.vm_name, event.namespace, event.publish_time, now,
             outcome.value))
    return outcome


def records(con: sqlite3.Connection, limit: int = 500) -> list[sqlite3.Row]:
    """The newest records first."""
    return con.execute("SELECT id, vm_name, namespace, message, created_at, updated_at, last_message_id"
                       " FROM vms ORDER BY id DESC LIMIT ?", (limit,)).fetchall()


def count(con: sqlite3.Connection) -> int:
    return con.execute("SELECT count(*) FROM vms").fetchone()[0]
