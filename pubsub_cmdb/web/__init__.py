"""The Flask app: an app factory and one blueprint per page group (publish, messages, cmdb)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from flask import Flask, current_app, jsonify, request
from flask_wtf.csrf import CSRFProtect

from .. import store
from ..broker import Broker
from ..config import Settings
from . import cmdb, context, messages, publish

ROOT = Path(__file__).resolve().parents[2]  # templates/ and static/ sit beside main.py
MAX_REQUEST_BYTES = 64 * 1024  # a form is at most ~11 KB; anything far larger is refused with 413 (POST /cmdb: 2 MB)

csrf = CSRFProtect()


def create_app(settings: Settings, broker: Broker | None = None) -> Flask:
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config.update(
        SECRET_KEY=settings.secret,
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        WTF_CSRF_TIME_LIMIT=None,  # a form left open for hours still submits
        SETTINGS=settings,
        CMDB_BUSY_TIMEOUT_SECONDS=store.BUSY_TIMEOUT_SECONDS,  # how long a request waits for a locked CMDB
    )
    if broker is not None:
        app.extensions["broker"] = broker  # else made on first use: POST /cmdb and /cmdb never need one
    store.init_schema(settings.cmdb_database)
    context.init_app(app)
    csrf.init_app(app)
    app.register_blueprint(publish.bp)
    app.register_blueprint(messages.bp)
    app.register_blueprint(cmdb.bp)
    csrf.exempt(cmdb.apply_event)  # a JSON API for subscriber.py, not a browser form
    app.after_request(_security_headers)
    app.register_error_handler(413, _too_large)
    app.register_error_handler(sqlite3.OperationalError, _cmdb_busy)
    return app


def _too_large(error):
    message = f"the request is larger than {request.max_content_length // 1024} KB"
    if request.path == "/cmdb":
        return jsonify(error=message), 413
    return message, 413


def _cmdb_busy(error):
    """Another process held the CMDB's write lock past the busy timeout: nothing was written (the
    transaction rolled back); 503 tells subscriber.py to hold the events and try again."""
    if not store.is_busy(error):
        raise error
    current_app.logger.warning("CMDB busy: %s", error)
    message = "the CMDB is busy (database is locked); nothing was written, try again"
    body = jsonify(error=message) if request.path == "/cmdb" else message
    return body, 503, {"Retry-After": "1"}


def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; frame-ancestors 'none'; form-action 'self'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response
