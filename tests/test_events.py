from datetime import datetime, timezone

import pytest

from pubsub_cmdb import events


def valid(**overrides):
    fields = {"action": "create", "vm_name": "vm-1", "namespace": "Customer 1", "message": "12:00:00 - hi"}
    fields.update(overrides)
    return fields


def test_parse_valid_event():
    event, errors = events.parse(valid(message_id="42", publish_time="2026-01-01T01:00:00+01:00"))
    assert errors == {}
    assert event == events.Event("create", "vm-1", "Customer 1", "12:00:00 - hi", "42",
                                 "2026-01-01T00:00:00.000000+00:00")  # UTC with microseconds: sorts as text


def test_parse_strips_names_and_defaults_message():
    event, errors = events.parse({"action": "delete", "vm_name": "  vm-1 ", "namespace": "ns"})
    assert errors == {}
    assert (event.vm_name, event.message, event.message_id) == ("vm-1", "", None)


@pytest.mark.parametrize("field", ["action", "vm_name", "namespace"])
def test_missing_field_is_named(field):
    fields = valid()
    del fields[field]
    event, errors = events.parse(fields)
    assert event is None
    assert errors == {field: f"{field} is required"}


@pytest.mark.parametrize("overrides, field, words", [
    ({"action": "destroy"}, "action", "must be one of create, delete, get, update"),
    ({"vm_name": ""}, "vm_name", "must not be empty"),
    ({"vm_name": "   "}, "vm_name", "must not be empty"),
    ({"vm_name": 7}, "vm_name", "must be a string"),
    ({"vm_name": "x" * 256}, "vm_name", "at most 255"),
    ({"namespace": "a\nb"}, "namespace", "control characters"),
    ({"namespace": "\ud800"}, "namespace", "valid Unicode"),
    ({"message": "x" * (10 * 1024 + 1)}, "message", "at most 10 KB"),
    ({"message": ["x"]}, "message", "must be a string"),
    ({"message": "a\x00b"}, "message", "NUL"),
    ({"message_id": ""}, "message_id", "non-empty string"),
    ({"publish_time": 5}, "publish_time", "ISO 8601 time with a time zone"),
    ({"publish_time": "yesterday"}, "publish_time", "ISO 8601 time with a time zone"),
    ({"publish_time": "2026-01-01T00:00:00"}, "publish_time", "ISO 8601 time with a time zone"),
])
def test_invalid_field_is_named(overrides, field, words):
    event, errors = events.parse(valid(**overrides))
    assert event is None
    assert list(errors) == [field]
    assert words in errors[field]


def test_limits_are_inclusive():
    _, errors = events.parse(valid(vm_name="x" * 255, message="é" * (5 * 1024)))
    assert errors == {}


def test_body_must_be_an_object():
    assert events.parse(["create"]) == (None, {"body": "the body must be a JSON object"})


def test_compose_text_keeps_the_original_format():
    assert events.compose_text("hello", datetime(2026, 1, 2, 3, 4, 5)) == "03:04:05 - hello"


def test_round_trip_through_pubsub_fields():
    event = events.Event("create", "vm-1", "Customer 2", "03:04:05 - hello")
    data, attributes = events.to_pubsub(event)
    published = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    fields = events.from_pubsub(data, attributes, "m-1", published)
    parsed, errors = events.parse(fields)
    assert errors == {}
    assert parsed == events.Event("create", "vm-1", "Customer 2", "03:04:05 - hello", "m-1",
                                  "2026-01-02T03:04:05.000000+00:00")


def test_foreign_message_without_attributes_decodes_and_fails_validation():
    fields = events.from_pubsub(b"\xff\xfe not utf-8", {}, "m-2", None)
    assert fields["action"] is None and fields["vm_name"] is None
    assert "\ufffd" in fields["message"]
    _, errors = events.parse(fields)
    assert set(errors) == {"action", "vm_name", "namespace"}


def test_ordering_key_per_vm_only_for_applied_actions():
    assert events.ordering_key(events.Event("create", "vm-1", "Customer 1")) == "Customer 1/vm-1"
    assert events.ordering_key(events.Event("delete", "vm-1", "Customer 1")) == "Customer 1/vm-1"
    assert events.ordering_key(events.Event("get", "vm-1", "Customer 1")) == ""
    assert events.ordering_key(events.Event("update", "vm-1", "Customer 1")) == ""
    long_key = events.ordering_key(events.Event("create", "€" * 255, "ü" * 255))
    assert long_key.startswith("sha256:") and len(long_key) < 100
    assert long_key != events.ordering_key(events.Event("create", "€" * 254, "ü" * 255))
