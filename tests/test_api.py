"""POST /cmdb and GET /cmdb through the Flask test client over a real sqlite file."""
import sqlite3
import threading

import pytest

from pubsub_cmdb import store
from pubsub_cmdb.config import load_settings
from pubsub_cmdb.web import create_app


def post(client, **body):
    return client.post("/cmdb", json=body)


def event(action="create", vm_name="vm-1", namespace="Customer 1", message="12:00:00 - hi", **extra):
    return dict(action=action, vm_name=vm_name, namespace=namespace, message=message, **extra)


def test_create_is_201_and_shows_on_the_page(client):
    response = post(client, **event(message_id="m1"))
    assert response.status_code == 201
    assert response.json == {"outcome": "created", "vm_name": "vm-1", "namespace": "Customer 1"}
    page = client.get("/cmdb").get_data(as_text=True)
    assert "vm-1" in page and "12:00:00 - hi" in page and "1 record," in page


def test_redelivered_create_is_200_and_changes_nothing(client):
    assert post(client, **event(message_id="m1")).status_code == 201
    again = post(client, **event(message_id="m1"))
    assert (again.status_code, again.json["outcome"]) == (200, "duplicate")
    assert client.get("/cmdb").get_data(as_text=True).count(">vm-1</a></td>") == 1


def test_create_of_a_record_another_message_created_is_409(client):
    post(client, **event(message_id="m1"))
    response = post(client, **event(message_id="m2", message="other"))
    assert (response.status_code, response.json["outcome"]) == (409, "conflict")
    assert "other" not in client.get("/cmdb").get_data(as_text=True)


def test_delete_is_200_and_removes_the_record(client):
    post(client, **event(message_id="m1"))
    response = post(client, **event("delete", message_id="m2"))
    assert (response.status_code, response.json["outcome"]) == (200, "deleted")
    assert "vm-1" not in client.get("/cmdb").get_data(as_text=True)


@pytest.mark.parametrize("action", ["get", "update"])
def test_get_and_update_are_400_not_supported(client, action):
    response = post(client, **event(action))
    assert response.status_code == 400
    assert response.json["error"] == f"action not supported: {action}"
    assert "No records yet" in client.get("/cmdb").get_data(as_text=True)


def test_malformed_json_is_400_with_a_json_error(client):
    response = client.post("/cmdb", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json["error"]


@pytest.mark.parametrize("missing", ["action", "vm_name", "namespace"])
def test_missing_field_is_400_naming_it(client, missing):
    body = event()
    del body[missing]
    response = post(client, **body)
    assert response.status_code == 400
    assert response.json["fields"] == {missing: f"{missing} is required"}
    assert missing in response.json["error"]


def test_non_object_body_is_400(client):
    response = client.post("/cmdb", json="create")
    assert response.status_code == 400 and response.json["fields"] == {"body": "the body must be a JSON object"}


def test_batch_answers_each_event_as_if_alone(client):
    post(client, **event(vm_name="taken", message_id="m0"))
    batch = [event(vm_name="a", message_id="m1"), event(vm_name="a", message_id="m1"),
             event(vm_name="taken", message_id="m2"), event("get", vm_name="b"), {"action": "create"},
             "not an object", event("delete", vm_name="taken", message_id="m3")]
    response = client.post("/cmdb", json=batch)
    assert response.status_code == 200
    results = response.json["results"]
    assert [(r["status"], r["outcome"]) for r in results] == [
        (201, "created"), (200, "duplicate"), (409, "conflict"), (400, "unsupported"), (400, "invalid"),
        (400, "invalid"), (200, "deleted")]
    assert results[4]["fields"] == {"vm_name": "vm_name is required", "namespace": "namespace is required"}
    page = client.get("/cmdb").get_data(as_text=True)
    assert ">a<" in page and "taken" not in page


@pytest.mark.parametrize("batch", [[], [event(vm_name=f"vm-{i}") for i in range(1001)]])
def test_batch_size_is_limited(client, batch):
    response = client.post("/cmdb", json=batch)
    assert response.status_code == 400 and "1 to 1000 events" in response.json["error"]
    assert "No records yet" in client.get("/cmdb").get_data(as_text=True)


def test_oversized_request_is_413(client):
    response = client.post("/cmdb", data="x" * (3 * 1024 * 1024), content_type="application/json")
    assert response.status_code == 413
    assert response.json == {"error": "the request is larger than 2048 KB"}
    form = client.post("/message", data={"message": "x" * (100 * 1024)})
    assert form.status_code == 413 and "larger than 64 KB" in form.get_data(as_text=True)


def test_records_are_newest_first_and_escaped(client):
    post(client, **event(vm_name="old"))
    post(client, **event(vm_name="<b>new</b>"))
    page = client.get("/cmdb").get_data(as_text=True)
    assert "<b>new</b>" not in page and "&lt;b&gt;new&lt;/b&gt;" in page
    assert page.index("&lt;b&gt;new") < page.index(">old<")


def test_root_redirects_to_message(client):
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"].endswith("/message")


def test_pages_send_security_headers(client):
    headers = client.get("/cmdb").headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"


def test_message_form_without_csrf_token_is_refused(client):
    response = client.post("/message", data={"action": "create", "vm_name": "vm", "namespace": "Customer 1"})
    assert response.status_code == 400


def test_with_an_api_token_post_cmdb_needs_it(env):
    settings = load_settings(dict(env, BROKER="emulator", PUBSUB_EMULATOR_HOST="127.0.0.1:9", CMDB_API_TOKEN="s3cret"))
    client = create_app(settings).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.post("/cmdb", json=event(), headers=headers)
        assert response.status_code == 401 and "bearer token" in response.json["error"]
    assert "No records yet" in client.get("/cmdb").get_data(as_text=True)
    assert client.post("/cmdb", json=event(), headers={"Authorization": "Bearer s3cret"}).status_code == 201


def test_a_cmdb_locked_past_the_busy_timeout_is_503_and_nothing_written(app, client, env):
    app.config["CMDB_BUSY_TIMEOUT_SECONDS"] = 0.1
    locker = sqlite3.connect(env["CMDB_DATABASE"], isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        response = client.post("/cmdb", json=[event(message_id="m1"), event(vm_name="vm-2", message_id="m2")])
    finally:
        locker.execute("ROLLBACK")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "database is locked" in response.json["error"]
    assert client.get("/cmdb").status_code == 200  # readers are never blocked (WAL)
    assert post(client, **event(message_id="m1")).status_code == 201  # lock released: applied, once
    locker.close()


def test_a_cmdb_locked_briefly_is_waited_for(client, env):
    locker = sqlite3.connect(env["CMDB_DATABASE"], isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.5, lambda: locker.execute("ROLLBACK"))
    releaser.start()
    response = post(client, **event(message_id="m1"))  # waits within the 30 s busy timeout
    releaser.join()
    locker.close()
    assert response.status_code == 201


def test_invalid_deliveries_with_a_message_id_are_logged_with_the_reason(app, client):
    bad = {"action": "create", "vm_name": "bad\x07name", "namespace": "Customer 1", "message_id": "m9"}
    for _ in range(2):  # nacked, then delivered again
        response = client.post("/cmdb", json=[bad, event(action="update", message_id="m10")])
        assert [r["outcome"] for r in response.json["results"]] == ["invalid", "unsupported"]
    assert post(client, action="create").status_code == 400  # no message id: nothing to log it under
    con = store.connect(app.config["SETTINGS"].cmdb_database)
    rows = {r["message_id"]: r for r in store.not_applied(con)}
    con.close()
    assert set(rows) == {"m9", "m10"}
    assert (rows["m9"]["vm_name"], rows["m9"]["deliveries"], rows["m9"]["detail"]) == (
        "bad\x07name", 2, "vm_name must not contain control characters")
    assert rows["m10"]["detail"] == "action not supported: update"
    page = client.get("/cmdb").get_data(as_text=True)
    assert "Not applied" in page and "vm_name must not contain control characters" in page
    assert "<td>m9</td>" in page and "<td>m10</td>" in page and "action not supported: update" in page


def test_a_vms_history_lists_every_message_that_named_it_oldest_first(client):
    post(client, **event(message_id="m1", publish_time="2026-12-04T10:00:00Z"))
    post(client, **event(message_id="m1", publish_time="2026-12-04T10:00:00Z"))  # redelivered
    post(client, **event(action="update", message_id="m2", message="<i>later</i>"))
    post(client, **event(action="delete", message_id="m3", publish_time="2026-12-04T10:05:00Z"))
    post(client, **event(vm_name="vm-2", message_id="m4"))
    records = client.get("/cmdb").get_data(as_text=True)
    assert 'href="/cmdb/history?namespace=Customer+1&amp;vm_name=vm-2"' in records  # the record links to it
    assert 'href="/cmdb/history?namespace=Customer+1&amp;vm_name=vm-1"' in records  # so does "Not applied"

    page = client.get("/cmdb/history", query_string={"namespace": "Customer 1", "vm_name": "vm-1"})
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and "Not in the CMDB now" in text
    rows = text.split("<tr>")[2:]  # after the header row
    assert [("m1" in r, "m2" in r, "m3" in r) for r in rows] == [(True, False, False), (False, True, False),
                                                                (False, False, True)]
    assert "created" in rows[0] and "<td>2</td>" in rows[0]  # delivered twice, applied once
    assert "unsupported" in rows[1] and "action not supported: update" in rows[1]
    assert "deleted" in rows[2] and "vm-2" not in text and "m4" not in text
    page = client.get("/cmdb/history?namespace=Customer+1&vm_name=vm-2").get_data(as_text=True)
    assert "In the CMDB now: record" in page and "12:00:00 - hi" in page


def test_a_history_is_escaped_and_needs_both_names(client):
    post(client, **event(vm_name="<b>vm</b>", message_id="m1"))
    page = client.get("/cmdb/history", query_string={"namespace": "Customer 1", "vm_name": "<b>vm</b>"})
    text = page.get_data(as_text=True)
    assert "<b>vm</b>" not in text and "&lt;b&gt;vm&lt;/b&gt;" in text and "created" in text
    missing = client.get("/cmdb/history?vm_name=vm-1")
    assert missing.status_code == 400 and "namespace must be given" in missing.get_data(as_text=True)
    missing = client.get("/cmdb/history")
    assert missing.status_code == 400 and "namespace and vm_name must be given" in missing.get_data(as_text=True)
    unknown = client.get("/cmdb/history?namespace=Customer+2&vm_name=nobody").get_data(as_text=True)
    assert "Not in the CMDB now" in unknown and "No message has named this VM yet" in unknown

