"""What a request works with: its CMDB connection (opened on first use, closed at the end, as in
Flask's tutorial) and the app's broker."""
import threading

from flask import current_app, g

from .. import store
from ..broker import make_broker

_broker_lock = threading.Lock()


def get_db():
    if "db" not in g:
        g.db = store.connect(current_app.config["SETTINGS"].cmdb_database,
                             current_app.config["CMDB_BUSY_TIMEOUT_SECONDS"])
    return g.db


def close_db(exception=None):
    con = g.pop("db", None)
    if con is not None:
        con.close()


def init_app(app):
    app.teardown_appcontext(close_db)


def get_broker():
    with _broker_lock:
        if "broker" not in current_app.extensions:
            current_app.extensions["broker"] = make_broker(current_app.config["SETTINGS"])
        return current_app.extensions["broker"]
