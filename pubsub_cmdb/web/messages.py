"""`/messages`: the unacknowledged messages, each with an ACK button (`POST /ack/<ack_id>`)."""
from flask import Blueprint, flash, redirect, render_template, url_for

from .. import events
from ..broker import BrokerError, UnknownAckId
from .context import get_broker

bp = Blueprint("messages", __name__)
PULL_LIMIT = 10


@bp.get("/messages")
def list_messages():
    try:
        pulled = get_broker().pull(PULL_LIMIT)
    except BrokerError as error:
        return render_template("messages.html", messages=[], error=str(error)), 503
    shown = [dict(events.from_pubsub(m.data, m.attributes, m.message_id, m.publish_time),
                  ack_id=m.ack_id, delivery_attempt=m.delivery_attempt) for m in pulled]
    return render_template("messages.html", messages=shown, error=None)


@bp.post("/ack/<path:ack_id>")
def ack(ack_id):
    try:
        get_broker().acknowledge(ack_id)
    except UnknownAckId:
        flash("Not acknowledged: the ack id is unknown or has expired (the ack deadline is 10 s). "
              "Reload the page and try again.", "error")
    except BrokerError as error:
        flash(f"Not acknowledged: {error}", "error")
    else:
        flash("Acknowledged: the message is gone from the subscription.", "success")
    return redirect(url_for("messages.list_messages"))
