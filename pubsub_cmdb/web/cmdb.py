"""`/cmdb`: the records page, and `POST /cmdb` which applies one event (JSON) to the CMDB."""
from flask import Blueprint, jsonify, render_template, request

from .. import events, store
from ..store import Outcome
from .context import get_db

bp = Blueprint("cmdb", __name__)

STATUS = {
    Outcome.CREATED: 201,
    Outcome.DELETED: 200,
    Outcome.ABSENT: 200,
    Outcome.DUPLICATE: 200,   # a redelivery: already applied, acknowledge it
    Outcome.CONFLICT: 409,    # another message created this record: nothing to do
    Outcome.UNSUPPORTED: 400,
}


@bp.get("/cmdb")
def show_records():
    con = get_db()
    return render_template("cmdb.html", records=store.records(con), total=store.count(con))


@bp.post("/cmdb")
def apply_event():
    body = request.get_json(silent=True)
    if body is None:
        return jsonify(error="the body must be JSON (Content-Type: application/json)"), 400
    event, errors = events.parse(body)
    if errors:
        return jsonify(error="; ".join(errors.values()), fields=errors, outcome="invalid"), 400
    outcome = store.apply(get_db(), event)
    if outcome is Outcome.UNSUPPORTED:
        return jsonify(error=f"action not supported: {event.action}", outcome=outcome.value), 400
    return jsonify(outcome=outcome.value, vm_name=event.vm_name, namespace=event.namespace), STATUS[outcome]
