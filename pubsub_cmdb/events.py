"""The event format: the only module that knows how a CMDB event looks on the wire.

On Pub/Sub an event is a message with attributes `action`, `vm_name`, `namespace` and the data
"HH:MM:SS - free text". Towards `POST /cmdb` it is a JSON object with the same names plus `message`
(the data as text), `message_id` and `publish_time`.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

ACTIONS = ("create", "delete", "get", "update")
SUPPORTED_ACTIONS = ("create", "delete")  # get and update stay on the queue, as in the original app
MAX_NAME = 255
MAX_MESSAGE_BYTES = 10 * 1024
MAX_MESSAGE_ID = 255


@dataclass(frozen=True)
class Event:
    action: str
    vm_name: str
    namespace: str
    message: str = ""
    message_id: str | None = None  # set when the event came through Pub/Sub: the key for exactly-once
    publish_time: str | None = None  # ISO 8601, as Pub/Sub stamped it


def _has_control_characters(value: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in value)


def _is_unicode(value: str) -> bool:
    """False for lone surrogates (JSON allows "\\ud800"), which no database can store as text."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_name(field: str, value) -> str | None:
    """The problem with a vm_name or namespace value, or None."""
    if value is None:
        return f"{field} is required"
    if not isinstance(value, str):
        return f"{field} must be a string"
    if not value.strip():
        return f"{field} must not be empty"
    if not _is_unicode(value):
        return f"{field} must be valid Unicode text"
    if len(value) > MAX_NAME:
        return f"{field} must be at most {MAX_NAME} characters"
    if _has_control_characters(value):
        return f"{field} must not contain control characters"
    return None


def check_message(value) -> str | None:
    """The problem with a message text, or None; a missing message is an empty one."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "message must be a string"
    if not _is_unicode(value):
        return "message must be valid Unicode text"
    if len(value.encode("utf-8")) > MAX_MESSAGE_BYTES:
        return f"message must be at most {MAX_MESSAGE_BYTES // 1024} KB"
    if "\x00" in value:
        return "message must not contain NUL characters"
    return None


def field_errors(fields: Mapping) -> dict[str, str]:
    """Every problem with an event's fields, by field name; empty when the event is valid."""
    errors = {}
    action = fields.get("action")
    if action is None:
        errors["action"] = "action is required"
    elif action not in ACTIONS:
        errors["action"] = f"action must be one of {', '.join(ACTIONS)}"
    for field in ("vm_name", "namespace"):
        problem = check_name(field, fields.get(field))
        if problem:
            errors[field] = problem
    problem = check_message(fields.get("message"))
    if problem:
        errors["message"] = problem
    value = fields.get("message_id")
    if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_MESSAGE_ID
                              or _has_control_characters(value) or not _is_unicode(value)):
        errors["message_id"] = f"message_id must be a non-empty string of at most {MAX_MESSAGE_ID} characters"
    if fields.get("publish_time") is not None and utc_time(fields["publish_time"]) is None:
        errors["publish_time"] = "publish_time must be an ISO 8601 time with a time zone"
    return errors


def utc_time(value) -> str | None:
    """An ISO 8601 time with a zone as UTC with microseconds (so that times sort as text), or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    try:
        return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
    except (OverflowError, ValueError):
        return None


def parse(fields: Mapping) -> tuple[Event | None, dict[str, str]]:
    """Validate a mapping (a JSON body, form data) into an Event, or return the errors by field."""
    if not isinstance(fields, Mapping):
        return None, {"body": "the body must be a JSON object"}
    errors = field_errors(fields)
    if errors:
        return None, errors
    return Event(
        action=fields["action"],
        vm_name=fields["vm_name"].strip(),
        namespace=fields["namespace"].strip(),
        message=fields.get("message") or "",
        message_id=fields.get("message_id"),
        publish_time=utc_time(fields["publish_time"]) if fields.get("publish_time") is not None else None,
    ), {}


def compose_text(text: str, now: datetime | None = None) -> str:
    """The message data as the original app wrote it: "HH:MM:SS - text"."""
    return f"{(now or datetime.now()).strftime('%H:%M:%S')} - {text}"


def to_pubsub(event: Event) -> tuple[bytes, dict[str, str]]:
    """Data and attributes to publish for an event."""
    return event.message.encode("utf-8"), {
        "action": event.action, "vm_name": event.vm_name, "namespace": event.namespace}


def ordering_key(event: Event) -> str:
    """`namespace/vm_name` for the events that change a record, so one VM's changes apply in publish order.

    get and update get none: they are never applied, and a nacked message would block its key.
    Pub/Sub takes keys up to 1 KB; a longer one (long multi-byte names) is replaced by its digest.
    """
    if event.action not in SUPPORTED_ACTIONS:
        return ""
    key = f"{event.namespace}/{event.vm_name}"
    return key if len(key.encode("utf-8")) <= 1024 else "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def from_pubsub(data: bytes, attributes: Mapping[str, str], message_id: str | None = None,
                publish_time: datetime | None = None) -> dict:
    """The fields of a received message, as sent to `POST /cmdb` and shown on /messages.

    Messages from other publishers may lack attributes or carry bytes that are not UTF-8: the fields
    are then None or carry replacement characters, and validation (`parse`) says what is wrong.
    """
    return {
        "action": attributes.get("action"),
        "vm_name": attributes.get("vm_name"),
        "namespace": attributes.get("namespace"),
        "message": data.decode("utf-8", errors="replace"),
        "message_id": message_id or None,
        "publish_time": publish_time.isoformat() if publish_time else None,
    }
