"""`/cmdb`: the records page, and `POST /cmdb` which applies events (JSON) to the CMDB.

The body is one event (an object) or a batch (an array of up to MAX_BATCH objects, as subscriber.py
sends them). A batch is applied in one transaction and answered with one result per event, each with
the status that event would have had alone.
"""
import hmac

from flask import Blueprint, abort, current_app, jsonify, render_template, request

from .. import events, store
from ..store import Outcome
from .context import get_db

bp = Blueprint("cmdb", __name__)
MAX_BATCH = 1000
MAX_BATCH_BYTES = 2 * 1024 * 1024  # subscriber.py keeps its batches under 1 MB
NOT_APPLIED_SHOWN = 50
HISTORY_SHOWN = 200


@bp.before_request
def _allow_batches():
    if request.endpoint == "cmdb.apply_event":
        request.max_content_length = MAX_BATCH_BYTES


def _authorized() -> bool:
    """With CMDB_API_TOKEN set, POST /cmdb needs `Authorization: Bearer <token>` (subscriber.py sends it)."""
    token = current_app.config["SETTINGS"].api_token
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

STATUS = {
    Outcome.CREATED: 201,
    Outcome.DELETED: 200,
    Outcome.ABSENT: 200,
    Outcome.DUPLICATE: 200,   # a redelivery: already applied, acknowledge it
    Outcome.CONFLICT: 409,    # another message created this record: nothing to do
    Outcome.STALE: 200,       # older than the VM's latest change (arrived out of order): nothing to do
    Outcome.UNSUPPORTED: 400,
    Outcome.INVALID: 400,
}


@bp.get("/cmdb")
def show_records():
    con = get_db()
    return render_template("cmdb.html", records=store.records(con), total=store.count(con),
                           not_applied=store.not_applied(con, NOT_APPLIED_SHOWN))


@bp.get("/cmdb/history")
def show_history():
    """One VM's event log (`?namespace=...&vm_name=...`), whether or not it is in the CMDB now."""
    namespace, vm_name = request.args.get("namespace", ""), request.args.get("vm_name", "")
    missing = [name for name, value in (("namespace", namespace), ("vm_name", vm_name)) if not value]
    if missing:
        abort(400, description=f"{' and '.join(missing)} must be given, e.g. "
                               "/cmdb/history?namespace=Customer%201&vm_name=vm-1")
    con = get_db()
    return render_template("history.html", namespace=namespace, vm_name=vm_name,
                           record=store.record(con, namespace, vm_name),
                           history=store.history(con, namespace, vm_name, HISTORY_SHOWN), shown=HISTORY_SHOWN)


@bp.post("/cmdb")
def apply_event():
    if not _authorized():
        return jsonify(error="a bearer token is required (CMDB_API_TOKEN)"), 401
    body = request.get_json(silent=True)
    if body is None:
        return jsonify(error="the body must be JSON (Content-Type: application/json)"), 400
    if not isinstance(body, list):
        result, status = _apply([body])[0]
        return jsonify(result), status
    if not body or len(body) > MAX_BATCH:
        return jsonify(error=f"a batch must hold 1 to {MAX_BATCH} events"), 400
    return jsonify(results=[dict(result, status=status) for result, status in _apply(body)]), 200


def _apply(bodies: list) -> list[tuple[dict, int]]:
    """Validate every event, apply the valid ones in one transaction; a (result, status) per event.

    An invalid event that carries a message id (a delivery from Pub/Sub) is logged with the reason.
    """
    parsed = [events.parse(body) for body in bodies]
    items = [event if event else _rejected(body, errors) for body, (event, errors) in zip(bodies, parsed)]
    outcomes = iter(store.apply_many(get_db(), [item for item in items if item is not None]))
    answers = []
    for item, (event, errors) in zip(items, parsed):
        outcome = next(outcomes) if item is not None else Outcome.INVALID
        if outcome is Outcome.INVALID:
            answers.append(({"error": "; ".join(errors.values()), "fields": errors, "outcome": "invalid"}, 400))
        elif outcome is Outcome.UNSUPPORTED:
            answers.append(({"error": f"action not supported: {event.action}", "outcome": outcome.value}, 400))
        else:
            answers.append(({"outcome": outcome.value, "vm_name": event.vm_name, "namespace": event.namespace},
                            STATUS[outcome]))
    return answers


def _rejected(body, errors: dict) -> store.Rejected | None:
    """The log entry for an invalid event, or None when it has no usable message id to key it by."""
    if not isinstance(body, dict) or "message_id" in errors or not body.get("message_id"):
        return None
    return store.Rejected.of(body["message_id"], body, events.utc_time(body.get("publish_time")),
                             "; ".join(errors.values()))
