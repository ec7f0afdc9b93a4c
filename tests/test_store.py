import sqlite3
import threading

import pytest

from pubsub_cmdb import store
from pubsub_cmdb.events import Event
from pubsub_cmdb.store import Outcome


@pytest.fixture
def con(tmp_path):
    path = str(tmp_path / "cmdb.sqlite")
    store.init_schema(path)
    connection = store.connect(path)
    yield connection
    connection.close()


def at(second):
    return f"2026-01-01T00:00:{second:02d}.000000+00:00"


def create(name="vm-1", message_id=None, namespace="ns", published=None):
    return Event("create", name, namespace, "hello", message_id, published)


def delete(name="vm-1", message_id=None, namespace="ns", published=None):
    return Event("delete", name, namespace, "", message_id, published)


def names(con):
    return [(r["namespace"], r["vm_name"]) for r in store.records(con)]


def test_vms_table_keeps_the_original_columns(con):
    columns = [row[1] for row in con.execute("PRAGMA table_info(vms)")]
    assert columns[:4] == ["id", "vm_name", "namespace", "message"]


def test_create_then_delete(con):
    assert store.apply(con, create(message_id="1")) is Outcome.CREATED
    row = store.records(con)[0]
    assert (row["vm_name"], row["namespace"], row["message"], row["last_message_id"]) == ("vm-1", "ns", "hello", "1")
    assert store.apply(con, delete(message_id="2")) is Outcome.DELETED
    assert names(con) == []


def test_redelivered_create_changes_nothing(con):
    assert store.apply(con, create(message_id="1")) is Outcome.CREATED
    assert store.apply(con, create(message_id="1")) is Outcome.DUPLICATE
    assert store.count(con) == 1


def test_redelivered_delete_does_not_remove_a_recreated_record(con):
    store.apply(con, create(message_id="1"))
    store.apply(con, delete(message_id="2"))
    store.apply(con, create(message_id="3"))
    assert store.apply(con, delete(message_id="2")) is Outcome.DUPLICATE
    assert names(con) == [("ns", "vm-1")]


def test_create_of_existing_record_from_another_message_is_a_conflict(con):
    store.apply(con, create(message_id="1"))
    assert store.apply(con, create(message_id="2")) is Outcome.CONFLICT
    assert store.records(con)[0]["last_message_id"] == "1"


def test_same_name_in_two_namespaces_are_two_records(con):
    store.apply(con, create(namespace="a"))
    assert store.apply(con, create(namespace="b")) is Outcome.CREATED
    assert store.count(con) == 2


def test_delete_of_missing_record_is_absent(con):
    assert store.apply(con, delete(message_id="9")) is Outcome.ABSENT


@pytest.mark.parametrize("action", ["get", "update"])
def test_unsupported_actions_change_nothing_and_are_logged_once_per_message(con, action):
    assert store.apply(con, Event(action, "vm-1", "ns", "", "5")) is Outcome.UNSUPPORTED
    assert store.apply(con, Event(action, "vm-1", "ns", "", "5")) is Outcome.UNSUPPORTED  # nacked, back again
    assert store.count(con) == 0
    [row] = store.history(con, "ns", "vm-1")
    assert (row["message_id"], row["action"], row["outcome"], row["deliveries"], row["detail"]) == (
        "5", action, "unsupported", 2, f"action not supported: {action}")
    assert [r["message_id"] for r in store.not_applied(con)] == ["5"]


def test_unsupported_actions_without_a_message_id_write_nothing(con):
    assert store.apply(con, Event("get", "vm-1", "ns")) is Outcome.UNSUPPORTED
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_a_rejected_delivery_is_logged_with_its_reason_and_counted(con):
    rejected = store.Rejected.of("7", {"action": "create", "vm_name": "x" * 300 + "\ud800", "namespace": 3},
                                 at(7), "vm_name must be at most 255 characters; namespace must be a string")
    assert store.apply_many(con, [rejected, create(message_id="8")]) == [Outcome.INVALID, Outcome.CREATED]
    assert store.apply_many(con, [rejected]) == [Outcome.INVALID]
    [row] = store.not_applied(con)
    assert (row["message_id"], row["vm_name"], row["namespace"], row["outcome"], row["deliveries"]) == (
        "7", "x" * 255, "", "invalid", 2)
    assert row["detail"].startswith("vm_name must be at most 255")


def test_redeliveries_of_an_applied_event_are_counted_on_its_row(con):
    store.apply(con, create(message_id="1", published=at(1)))
    assert store.apply(con, create(message_id="1", published=at(1))) is Outcome.DUPLICATE
    assert store.apply(con, create(message_id="1", published=at(1))) is Outcome.DUPLICATE
    store.apply(con, delete(message_id="2", published=at(2)))
    rows = store.history(con, "ns", "vm-1")
    assert [(r["message_id"], r["outcome"], r["deliveries"]) for r in rows] == [("1", "created", 3),
                                                                                ("2", "deleted", 1)]
    assert rows[0]["last_delivery_at"] > rows[0]["applied_at"]
    assert store.not_applied(con) == []


def test_a_message_id_reused_with_another_publish_time_is_a_new_event(con):
    """The emulator numbers messages from 1 again after a restart; the CMDB file outlives it."""
    assert store.apply(con, create("vm-1", message_id="1", published=at(1))) is Outcome.CREATED
    assert store.apply(con, create("vm-2", message_id="1", published=at(9))) is Outcome.CREATED
    assert store.apply(con, create("vm-2", message_id="1", published=at(9))) is Outcome.DUPLICATE
    assert sorted(names(con)) == [("ns", "vm-1"), ("ns", "vm-2")]


def test_a_cmdb_file_from_before_the_event_log_changes_is_upgraded(tmp_path):
    path = str(tmp_path / "old.sqlite")
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE events (message_id TEXT PRIMARY KEY, action TEXT NOT NULL, vm_name TEXT NOT NULL,"
                    " namespace TEXT NOT NULL, publish_time TEXT, applied_at TEXT NOT NULL, outcome TEXT NOT NULL)")
        old.execute("INSERT INTO events VALUES ('1', 'create', 'vm-1', 'ns', NULL, '2026-01-01', 'created')")
    store.init_schema(path)
    store.init_schema(path)  # a second start changes nothing
    con = store.connect(path)
    assert store.apply(con, create(message_id="1")) is Outcome.DUPLICATE
    assert [tuple(r)[:6] for r in store.history(con, "ns", "vm-1")] == [
        ("1", "create", "", "2026-01-01", "created", 2)]
    key = [row["name"] for row in con.execute("PRAGMA table_info(events)") if row["pk"]]
    assert key == ["message_id", "publish_time"]
    assert {row["name"] for row in con.execute("PRAGMA index_list(events)")} >= {"events_by_vm",
                                                                                "events_not_applied"}
    con.close()


def test_events_are_logged_with_outcome(con):
    store.apply(con, create(message_id="1", published=at(0)))
    store.apply(con, create(message_id="2"))
    rows = con.execute("SELECT message_id, action, outcome, publish_time FROM events ORDER BY message_id").fetchall()
    assert [tuple(r) for r in rows] == [("1", "create", "created", at(0)), ("2", "create", "conflict", "")]


def test_failed_write_leaves_nothing_half_written(con):
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(sqlite3.IntegrityError):
        store.apply(con, create(message_id="1"))
    assert store.count(con) == 0


def test_concurrent_deliveries_of_one_message_apply_once(tmp_path):
    path = str(tmp_path / "cmdb.sqlite")
    store.init_schema(path)
    outcomes = []

    def deliver():
        connection = store.connect(path)
        outcomes.append(store.apply(connection, create(message_id="same")))
        connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.value for o in outcomes) == ["created"] + ["duplicate"] * 7


def test_a_failed_batch_writes_none_of_its_events(con):
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON vms WHEN NEW.vm_name = 'bad' "
                "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(sqlite3.IntegrityError):
        store.apply_many(con, [create("good", "1"), create("bad", "2")])
    assert store.count(con) == 0
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_batch_keeps_order_and_outcomes(con):
    outcomes = store.apply_many(con, [create("a", "1"), delete("a", "2"), create("a", "3"), create("a", "1"),
                                      Event("update", "a", "ns", "", "4")])
    assert [o.value for o in outcomes] == ["created", "deleted", "created", "duplicate", "unsupported"]
    assert [r["outcome"] for r in store.history(con, "ns", "a")] == [
        "created", "deleted", "created", "unsupported"]
    assert store.records(con)[0]["last_message_id"] == "3"


def test_a_create_published_before_the_latest_delete_is_stale(con):
    assert store.apply(con, delete(message_id="2", published=at(2))) is Outcome.ABSENT  # arrived first
    assert store.apply(con, create(message_id="1", published=at(1))) is Outcome.STALE
    assert store.count(con) == 0
    assert store.apply(con, create(message_id="3", published=at(3))) is Outcome.CREATED


def test_a_delete_published_before_the_records_create_is_stale(con):
    assert store.apply(con, create(message_id="3", published=at(3))) is Outcome.CREATED  # arrived first
    assert store.apply(con, delete(message_id="2", published=at(2))) is Outcome.STALE
    assert store.apply(con, create(message_id="1", published=at(1))) is Outcome.CONFLICT
    assert names(con) == [("ns", "vm-1")]


def test_any_arrival_order_ends_in_the_last_published_state(con):
    import itertools
    history = [create(message_id="1", published=at(1)), delete(message_id="2", published=at(2)),
               create(message_id="3", published=at(3)), delete(message_id="4", published=at(4)),
               create(message_id="5", published=at(5))]
    for vm, order in enumerate(itertools.permutations(history)):
        name = f"vm-{vm}"
        for event in order:
            store.apply(con, Event(event.action, name, "ns", "", f"{name}-{event.message_id}", event.publish_time))
        assert ("ns", name) in names(con), order
    assert store.count(con) == 120


def test_a_limited_history_is_the_latest_events_oldest_first(con):
    for i in range(5):
        store.apply(con, (create if i % 2 == 0 else delete)(message_id=f"m{i}"))
    assert [r["message_id"] for r in store.history(con, "ns", "vm-1")] == ["m0", "m1", "m2", "m3", "m4"]
    assert [r["message_id"] for r in store.history(con, "ns", "vm-1", limit=2)] == ["m3", "m4"]
    assert store.record(con, "ns", "vm-1")["message"] == "hello" and store.record(con, "ns", "vm-2") is None
