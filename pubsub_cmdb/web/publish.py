"""`/` and `/message`: the form that publishes an event to the topic."""
from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask_wtf import FlaskForm
from wtforms import SelectField, StringField, TextAreaField
from wtforms.validators import ValidationError

from .. import events
from ..broker import BrokerError
from .context import get_broker

bp = Blueprint("publish", __name__)


def _event_rule(check):
    """A WTForms validator from a rule in `events`, so the form and POST /cmdb judge alike."""
    def validate(form, field):
        problem = check(field.data)
        if problem:
            raise ValidationError(problem)
    return validate


class PublishForm(FlaskForm):
    action = SelectField("Action", choices=list(events.ACTIONS))
    vm_name = StringField("VM name", validators=[_event_rule(lambda v: events.check_name("vm_name", v))])
    namespace = SelectField("Namespace")
    message = TextAreaField("Message", validators=[_event_rule(events.check_message)])


@bp.get("/")
def index():
    return redirect(url_for("publish.message"))


@bp.route("/message", methods=["GET", "POST"])
def message():
    form = PublishForm()
    form.namespace.choices = list(current_app.config["SETTINGS"].customers)
    if not form.is_submitted():
        return render_template("message.html", form=form)
    if not form.validate():
        return render_template("message.html", form=form), 400
    event = events.Event(action=form.action.data, vm_name=form.vm_name.data.strip(),
                         namespace=form.namespace.data,
                         message=events.compose_text(form.message.data or ""))
    data, attributes = events.to_pubsub(event)
    try:
        message_id = get_broker().publish(data, attributes, events.ordering_key(event))
    except BrokerError as error:
        flash(f"Not published: {error}", "error")
        return render_template("message.html", form=form), 503
    flash(f"Published {event.action} {event.vm_name} ({event.namespace}) as message {message_id}", "success")
    return redirect(url_for("publish.message"))
