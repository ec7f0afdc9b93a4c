"""The web app: `python main.py` serves the UI and `POST /cmdb` on PORT (default 5000)."""
import logging
import os
import signal
import sys

from pubsub_cmdb.broker import BrokerError, make_broker
from pubsub_cmdb.config import settings_or_exit
from pubsub_cmdb.web import create_app

SERVER_THREADS = 8


def main():
    settings = settings_or_exit("main.py")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s main.py %(levelname)s %(message)s")
    if settings.secret_generated:
        logging.warning("SECRET is not set: using a generated key kept in %s",
                        os.path.join(os.path.dirname(os.path.abspath(settings.cmdb_database)), ".secret_key"))
    broker = make_broker(settings)
    try:
        for warning in broker.provision():
            logging.warning("%s", warning)
    except BrokerError as error:
        print(f"main.py: {error}", file=sys.stderr)
        raise SystemExit(1)
    app = create_app(settings, broker)
    print(f"main.py: serving http://{settings.host}:{settings.port} with {broker.description}, "
          f"topic {settings.topic_name}, subscription {settings.subscription_name}, "
          f"CMDB {settings.cmdb_database}", flush=True)
    print(f"main.py: broker: {settings.broker} ({settings.broker_reason})", flush=True)
    from waitress import serve
    # SIGTERM stops like Ctrl-C: waitress closes the listener and lets the requests in progress finish.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve(app, host=settings.host, port=settings.port, threads=SERVER_THREADS, ident="pubsub-cmdb")
    print("main.py: stopped", flush=True)


if __name__ == "__main__":
    main()
