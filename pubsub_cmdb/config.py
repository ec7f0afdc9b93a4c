"""Settings: read once from the environment (and a `.env` file), checked, then immutable.

A missing or wrong setting is a ConfigError with a one-line message; the entry points turn it
into that line on stderr and exit status 2 (`settings_or_exit`).
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_TOPIC = "cmdb-events"
DEFAULT_SUBSCRIPTION = "cmdb-events-sub"
DEFAULT_EMULATOR_PROJECT = "local-project"
DEFAULT_CUSTOMERS = "Customer 1,Customer 2,Customer 3"
BROKERS = ("embedded", "emulator", "gcp")
# Where `gcloud auth application-default login` keeps credentials.
ADC_FILE = Path.home() / ".config" / "gcloud" / "application_default_credentials.json"

# Pub/Sub resource names: 3-255 characters, start with a letter, no "goog" prefix.
_RESOURCE_NAME = re.compile(r"^(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")
_PROJECT_ID = re.compile(r"^[a-z][a-z0-9\-]{1,61}[a-z0-9]$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class ConfigError(ValueError):
    """A setting is missing or wrong; str() is the one line shown to the user."""


@dataclass(frozen=True)
class Settings:
    broker: str  # embedded, emulator or gcp
    broker_reason: str  # why this broker: said at start, with how to switch
    gcp_project: str
    topic_name: str
    subscription_name: str
    server_address: str
    host: str
    port: int
    cmdb_database: str
    customers: tuple[str, ...]
    secret: str
    secret_generated: bool
    emulator_host: str | None
    credentials_file: str | None
    api_token: str | None  # CMDB_API_TOKEN: POST /cmdb needs it as a bearer token when set
    pubsub_database: str  # the embedded broker's sqlite file
    dead_letter_topic: str | None
    max_delivery_attempts: int
    retry_backoff: tuple[int, int]  # (min, max) seconds before a nacked message comes back

    @property
    def on_emulator(self) -> bool:
        return self.broker == "emulator"


def _name(env, key, default):
    value = env.get(key, "").strip() or default
    if not _RESOURCE_NAME.match(value):
        raise ConfigError(f"{key}={value!r} is not a valid Pub/Sub name "
                          "(3-255 letters, digits or - _ . ~ + %, starting with a letter)")
    return value


def _port(env):
    raw = env.get("PORT", "").strip() or "5000"
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"PORT={raw!r} is not a port number (1-65535)")
    return int(raw)


def _server_address(env, port):
    raw = env.get("SERVER_ADDRESS", "").strip() or f"http://localhost:{port}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"SERVER_ADDRESS={raw!r} is not an http(s) address like http://localhost:5000")
    return raw.rstrip("/")


def _customers(env):
    raw = env.get("CUSTOMERS", "").strip() or DEFAULT_CUSTOMERS
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names:
        raise ConfigError("CUSTOMERS must name at least one namespace, comma-separated")
    return names


def _secret(env, database):
    """SECRET, or one generated for this instance and kept beside the CMDB so sessions survive restarts."""
    value = env.get("SECRET", "").strip()
    if value:
        return value, False
    keep = Path(database).resolve().parent / ".secret_key"
    try:
        if keep.exists():
            return keep.read_text().strip(), True
        value = secrets.token_hex(32)
        keep.write_text(value)
        keep.chmod(0o600)
        return value, True
    except OSError:
        return secrets.token_hex(32), True


def load_settings(env: dict | None = None) -> Settings:
    """Build Settings from `env` (default: os.environ). Raises ConfigError."""
    env = os.environ if env is None else env
    emulator_host = env.get("PUBSUB_EMULATOR_HOST", "").strip() or None
    if emulator_host and not _HOST_PORT.match(emulator_host):
        raise ConfigError(f"PUBSUB_EMULATOR_HOST={emulator_host!r} is not host:port, e.g. 127.0.0.1:8085")

    credentials = env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip() or None
    if credentials and not Path(credentials).is_file():
        raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS={credentials!r}: no such file")

    project = env.get("GCP_PROJECT", "").strip()
    broker, reason = _broker(env, emulator_host, project, credentials)
    project = project or DEFAULT_EMULATOR_PROJECT
    if not _PROJECT_ID.match(project):
        raise ConfigError(f"GCP_PROJECT={project!r} is not a project id (lower-case letters, digits and -)")

    port = _port(env)
    database = env.get("CMDB_DATABASE", "").strip() or "cmdb.sqlite"
    if not Path(database).resolve().parent.is_dir():
        raise ConfigError(f"CMDB_DATABASE={database!r}: its folder does not exist")
    secret, generated = _secret(env, database)
    pubsub_database = env.get("PUBSUB_DATABASE", "").strip() or str(Path(database).resolve().parent / "pubsub.sqlite")
    if not Path(pubsub_database).resolve().parent.is_dir():
        raise ConfigError(f"PUBSUB_DATABASE={pubsub_database!r}: its folder does not exist")
    host = env.get("HOST", "").strip() or "127.0.0.1"
    api_token = env.get("CMDB_API_TOKEN", "").strip() or None
    if not api_token and not _is_loopback(host):
        raise ConfigError(f"HOST={host!r} listens beyond loopback: set CMDB_API_TOKEN so that only "
                          "subscriber.py (which sends it) can write to the CMDB")
    dead_letter_topic = env.get("DEAD_LETTER_TOPIC", "").strip() or None
    if dead_letter_topic:
        dead_letter_topic = _name(env, "DEAD_LETTER_TOPIC", None)
    return Settings(
        broker=broker,
        broker_reason=reason,
        gcp_project=project,
        topic_name=_name(env, "TOPIC_NAME", DEFAULT_TOPIC),
        subscription_name=_name(env, "SUBSCRIPTION_NAME", DEFAULT_SUBSCRIPTION),
        server_address=_server_address(env, port),
        host=host,
        port=port,
        cmdb_database=database,
        customers=_customers(env),
        secret=secret,
        secret_generated=generated,
        emulator_host=emulator_host,
        credentials_file=credentials,
        api_token=api_token,
        pubsub_database=pubsub_database,
        dead_letter_topic=dead_letter_topic,
        max_delivery_attempts=_max_delivery_attempts(env),
        retry_backoff=_retry_backoff(env),
    )


def _broker(env, emulator_host, project, credentials) -> tuple[str, str]:
    """Which broker, and one line saying why and how to switch."""
    chosen = env.get("BROKER", "").strip().lower()
    if chosen and chosen not in BROKERS:
        raise ConfigError(f"BROKER={chosen!r} is not one of {', '.join(BROKERS)}")
    if chosen == "emulator" and not emulator_host:
        raise ConfigError("BROKER=emulator needs PUBSUB_EMULATOR_HOST (e.g. 127.0.0.1:8085)")
    if chosen == "gcp" and not project:
        raise ConfigError("BROKER=gcp needs GCP_PROJECT")
    if chosen:
        return chosen, "chosen by BROKER"
    if emulator_host:
        return "emulator", "PUBSUB_EMULATOR_HOST is set; BROKER=embedded runs without it"
    if project and (credentials or ADC_FILE.is_file()):
        return "gcp", "GCP_PROJECT and credentials are set; BROKER=embedded runs without them"
    if project:
        return "embedded", ("GCP_PROJECT is set but no credentials were found (GOOGLE_APPLICATION_CREDENTIALS): "
                            "BROKER=gcp forces Google Cloud")
    return "embedded", "no PUBSUB_EMULATOR_HOST nor GCP_PROJECT is set; set one of them to use Pub/Sub"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _max_delivery_attempts(env) -> int:
    raw = env.get("MAX_DELIVERY_ATTEMPTS", "").strip() or "5"
    if not raw.isdigit() or not 5 <= int(raw) <= 100:
        raise ConfigError(f"MAX_DELIVERY_ATTEMPTS={raw!r} must be a whole number from 5 to 100 (as on Pub/Sub)")
    return int(raw)


def _retry_backoff(env) -> tuple[int, int]:
    """The subscription's retry policy: a nacked message comes back after min, 2 × min, ... up to max s."""
    bounds = []
    for key, default in (("RETRY_MIN_BACKOFF", "10"), ("RETRY_MAX_BACKOFF", "600")):
        raw = env.get(key, "").strip() or default
        if not raw.isdigit() or int(raw) > 600:
            raise ConfigError(f"{key}={raw!r} must be a whole number of seconds from 0 to 600 (as on Pub/Sub)")
        bounds.append(int(raw))
    if bounds[0] > bounds[1]:
        raise ConfigError(f"RETRY_MIN_BACKOFF={bounds[0]} is more than RETRY_MAX_BACKOFF={bounds[1]}")
    return bounds[0], bounds[1]


def settings_or_exit(program: str) -> Settings:
    """For the entry points: read `.env` if present, then the environment; a bad setting exits with status 2."""
    try:
        from dotenv import find_dotenv, load_dotenv
        load_dotenv(find_dotenv(usecwd=True), override=False)  # the environment wins over .env
        return load_settings()
    except ConfigError as error:
        print(f"{program}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2)
