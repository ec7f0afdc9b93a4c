"""The CMDB: a sqlite file with the `vms` table and the log of applied events.

Every change to `vms` is decided and written in one transaction together with its row in `events`,
keyed by the Pub/Sub message id and publish time: a redelivered message finds its row and changes
nothing. Deliveries that change nothing (get/update, invalid events) are logged there too, with the reason.

Events may also arrive out of publish order (a broker without ordering, redeliveries after a crash):
`vm_versions` keeps, per VM, the publish time of the latest create and of the latest delete seen, and
a VM exists exactly when its latest create is newer than its latest delete. An event that does not
change that is `stale` (or a `conflict`, for a create of an existing record). The CMDB thus ends in
the state of each VM's last published event, whatever the arrival order.
"""
from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .events import MAX_NAME, SUPPORTED_ACTIONS, Event
from .sqlite_tx import write_transaction as transaction

TABLES = [
    """CREATE TABLE IF NOT EXISTS vms (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_name         TEXT NOT NULL,
        namespace       TEXT NOT NULL,
        message         TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        last_message_id TEXT,
        UNIQUE (namespace, vm_name)
    )""",
    # Per VM, the publish times of the latest create and delete seen (UTC ISO 8601: they sort as text).
    """CREATE TABLE IF NOT EXISTS vm_versions (
        namespace      TEXT NOT NULL,
        vm_name        TEXT NOT NULL,
        last_create    TEXT NOT NULL DEFAULT '',
        last_delete    TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (namespace, vm_name)
    )""",
    # The event log: one row per message that reached the CMDB, applied or not. A message is its id
    # *and* publish time: the emulator numbers messages from 1 again after each restart, so an id alone
    # would take a new event for an old one. ('' stands for "no publish time": posted, not from Pub/Sub.)
    # `outcome` is what its first delivery did; redeliveries (duplicates, nacked get/update coming
    # back) only count up `deliveries` and move `last_delivery_at`.
    """CREATE TABLE IF NOT EXISTS events (
        message_id       TEXT NOT NULL,
        action           TEXT NOT NULL,
        vm_name          TEXT NOT NULL,
        namespace        TEXT NOT NULL,
        publish_time     TEXT NOT NULL DEFAULT '',
        applied_at       TEXT NOT NULL,  -- when its first delivery was handled
        outcome          TEXT NOT NULL,
        deliveries       INTEGER NOT NULL DEFAULT 1,
        last_delivery_at TEXT,
        detail           TEXT NOT NULL DEFAULT '',  -- why it was not applied (unsupported, invalid)
        PRIMARY KEY (message_id, publish_time)
    )""",
]
INDEXES = [
    "CREATE INDEX IF NOT EXISTS events_by_vm ON events (namespace, vm_name, applied_at)",
    # Partial: only the few rows that were never applied.
    "CREATE INDEX IF NOT EXISTS events_not_applied ON events (last_delivery_at)"
    " WHERE outcome IN ('unsupported', 'invalid')",
]
# A CMDB file from before the event log took publish times into its key: its rows, into the new table.
UPGRADE_EVENTS = [
    "ALTER TABLE events RENAME TO events_before_upgrade",
    TABLES[2],
    "INSERT INTO events (message_id, action, vm_name, namespace, publish_time, applied_at, outcome,"
    " last_delivery_at) SELECT message_id, action, vm_name, namespace, coalesce(publish_time, ''), applied_at,"
    " outcome, applied_at FROM events_before_upgrade",
    "DROP TABLE events_before_upgrade",
]

BUSY_TIMEOUT_SECONDS = 30  # another writer holds the lock: wait for it rather than fail the event


class Outcome(enum.Enum):
    CREATED = "created"
    DELETED = "deleted"
    ABSENT = "absent"            # delete of a record that is not there: nothing to do
    DUPLICATE = "duplicate"      # this message id was applied before: nothing changed
    CONFLICT = "conflict"        # create of a record another message already created
    STALE = "stale"              # published before the VM's latest applied change: nothing to do
    UNSUPPORTED = "unsupported"  # get / update: never applied
    INVALID = "invalid"          # a delivery that is not a valid event (e.g. another publisher's message)


@dataclass(frozen=True)
class Rejected:
    """A delivery that failed validation, kept in the event log under its message id with the reason.

    Fields are as received, made storable: text only, cut to MAX_NAME characters.
    """
    message_id: str
    action: str
    vm_name: str
    namespace: str
    publish_time: str | None
    reason: str

    @classmethod
    def of(cls, message_id: str, fields: dict, publish_time: str | None, reason: str) -> "Rejected":
        def storable(value) -> str:
            text = value if isinstance(value, str) else ""
            return text[:MAX_NAME].encode("utf-8", errors="replace").decode("utf-8")
        return cls(message_id, storable(fields.get("action")), storable(fields.get("vm_name")),
                   storable(fields.get("namespace")), publish_time, reason)


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
        with transaction(con):  # two processes starting at once: one creates or upgrades, the other waits
            key = [row["name"] for row in con.execute("PRAGMA table_info(events)") if row["pk"]]
            if key == ["message_id"]:
                for statement in UPGRADE_EVENTS:
                    con.execute(statement)
            for statement in TABLES + INDEXES:
                con.execute(statement)
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


def apply_many(con: sqlite3.Connection, items: list[Event | Rejected]) -> list[Outcome]:
    """Apply events in order, in one transaction: each at most once per message id, all or none written.

    get/update events and `Rejected` deliveries change no record; those with a message id are logged
    (UNSUPPORTED / INVALID with the reason), so the log shows what stays stuck on the queue and why.
    """
    if not any(isinstance(item, Event) and item.action in SUPPORTED_ACTIONS or item.message_id is not None
               for item in items):
        return [Outcome.INVALID if isinstance(item, Rejected) else Outcome.UNSUPPORTED for item in items]
    outcomes = []
    with transaction(con):
        for order, item in enumerate(items):
            # Events posted without a publish time (not from Pub/Sub) count as published now, in order.
            now = _now(order)
            if isinstance(item, Rejected):
                outcomes.append(_logged(con, item, now, Outcome.INVALID, item.reason))
            elif item.action not in SUPPORTED_ACTIONS:
                reason = f"action not supported: {item.action}"
                outcomes.append(_logged(con, item, now, Outcome.UNSUPPORTED, reason))
            else:
                outcomes.append(_apply_one(con, item, now))
    return outcomes


def _apply_one(con: sqlite3.Connection, event: Event, now: str) -> Outcome:
    if event.message_id is not None:
        seen = con.execute("UPDATE events SET deliveries = deliveries + 1, last_delivery_at = ?"
                           " WHERE message_id = ? AND publish_time = ? RETURNING 1",
                           (now, event.message_id, event.publish_time or "")).fetchone()
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


def _logged(con, item: Event | Rejected, now: str, outcome: Outcome, reason: str = "") -> Outcome:
    """The event log row of a message (one with a message id): new, or one more delivery of it."""
    if item.message_id is not None:
        con.execute(
            "INSERT INTO events (message_id, action, vm_name, namespace, publish_time, applied_at, outcome,"
            " last_delivery_at, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (message_id, publish_time) DO UPDATE SET deliveries = deliveries + 1,"
            " last_delivery_at = excluded.last_delivery_at",
            (item.message_id, item.action, item.vm_name, item.namespace, item.publish_time or "", now,
             outcome.value, now, reason))
    return outcome


# What the pages show of a record.
_RECORD_COLUMNS = "id, vm_name, namespace, message, created_at, updated_at, last_message_id"


def records(con: sqlite3.Connection, limit: int = 500) -> list[sqlite3.Row]:
    """The newest records first."""
    return con.execute(f"SELECT {_RECORD_COLUMNS} FROM vms ORDER BY id DESC LIMIT ?", (limit,)).fetchall()


def record(con: sqlite3.Connection, namespace: str, vm_name: str) -> sqlite3.Row | None:
    """The VM's record, or None where it is not in the CMDB (never created, or deleted)."""
    return con.execute(f"SELECT {_RECORD_COLUMNS} FROM vms WHERE namespace = ? AND vm_name = ?",
                       (namespace, vm_name)).fetchone()


def history(con: sqlite3.Connection, namespace: str, vm_name: str, limit: int = -1) -> list[sqlite3.Row]:
    """One VM's event log, oldest first: every message that named it, with what it did.
    With `limit`, only the latest `limit` of them (-1: all)."""
    return con.execute("SELECT * FROM (SELECT message_id, action, publish_time, applied_at, outcome, deliveries,"
                       " last_delivery_at, detail, rowid AS seq FROM events WHERE namespace = ? AND vm_name = ?"
                       " ORDER BY applied_at DESC, rowid DESC LIMIT ?) ORDER BY applied_at, seq",
                       (namespace, vm_name, limit)).fetchall()


def not_applied(con: sqlite3.Connection, limit: int = 100) -> list[sqlite3.Row]:
    """Deliveries that were never applied (unsupported, invalid), most recently delivered first."""
    return con.execute("SELECT message_id, action, vm_name, namespace, outcome, deliveries, last_delivery_at,"
                       " detail FROM events WHERE outcome IN ('unsupported', 'invalid')"  # as in the partial index
                       " ORDER BY last_delivery_at DESC LIMIT ?", (limit,)).fetchall()


def count(con: sqlite3.Connection) -> int:
    return con.execute("SELECT count(*) FROM vms").fetchone()[0]
