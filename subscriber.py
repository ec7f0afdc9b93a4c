"""The worker: `python subscriber.py` streams messages from the subscription and POSTs each to /cmdb."""
import logging
import signal
import sys

from pubsub_cmdb.broker import BrokerError, make_broker
from pubsub_cmdb.config import settings_or_exit
from pubsub_cmdb.worker import EventForwarder

MAX_MESSAGES_HELD = 1000  # flow control: messages in hand at once (queued, or in a batch being posted)


def main():
    settings = settings_or_exit("subscriber.py")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s subscriber.py %(levelname)s %(message)s")
    # SIGTERM stops the same way as Ctrl-C: no new messages, in-flight callbacks finish.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with make_broker(settings) as broker:
        try:
            for warning in broker.provision():
                logging.warning("%s", warning)
        except BrokerError as error:
            print(f"subscriber.py: {error}", file=sys.stderr)
            raise SystemExit(1)
        print(f"subscriber.py: pulling {settings.subscription_name} from {broker.description}, "
              f"posting events to {settings.server_address}/cmdb", flush=True)
        print(f"subscriber.py: broker: {settings.broker} ({settings.broker_reason})", flush=True)
        forwarder = EventForwarder(settings.server_address, settings.api_token)
        streaming_pull = broker.subscribe(forwarder, MAX_MESSAGES_HELD)
        try:
            streaming_pull.result()
        except KeyboardInterrupt:
            # A second Ctrl-C or SIGTERM must not cut the shutdown short and leave a message half-done.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("subscriber.py: stopping: finishing the messages in hand", flush=True)
            forwarder.close()  # post, then ack or nack, every message in hand; new arrivals are nacked
            streaming_pull.cancel()  # then stop the stream
            try:
                streaming_pull.result(timeout=60)
            except Exception:  # the future ends with CancelledError: that is the normal end
                pass
            print("subscriber.py: stopped", flush=True)
        except Exception as error:  # the stream ended for good (e.g. subscription deleted)
            print(f"subscriber.py: streaming pull stopped: {error}", file=sys.stderr)
            raise SystemExit(1)


if __name__ == "__main__":
    main()
