"""The worker: `python subscriber.py` streams messages from the subscription and POSTs each to /cmdb."""
import logging
import signal
import sys
import time

from pubsub_cmdb.broker import BrokerError, make_broker
from pubsub_cmdb.config import settings_or_exit
from pubsub_cmdb.worker import EventForwarder

MAX_MESSAGES_HELD = 1000  # flow control: messages in hand at once (queued, or in a batch being posted)
# After the stream ends with an error, wait this long before provisioning and subscribing again,
# the next pause after each further failure (the last one repeats).
RESUBSCRIBE_PAUSES_SECONDS = (1, 2, 5, 10, 30)
HEALTHY_RUN_SECONDS = 60

log = logging.getLogger("subscriber")


def main():
    settings = settings_or_exit("subscriber.py")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s subscriber.py %(levelname)s %(message)s")
    # SIGTERM stops the same way as Ctrl-C: no new messages, in-flight callbacks finish.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with make_broker(settings) as broker:
        try:
            for warning in broker.provision():
                log.warning("%s", warning)
        except BrokerError as error:
            print(f"subscriber.py: {error}", file=sys.stderr)
            raise SystemExit(1)
        print(f"subscriber.py: pulling {settings.subscription_name} from {broker.description}, "
              f"posting events to {settings.server_address}/cmdb", flush=True)
        print(f"subscriber.py: broker: {settings.broker} ({settings.broker_reason})", flush=True)
        forwarder = EventForwarder(settings.server_address, settings.api_token)
        streaming_pull = None
        try:
            for streaming_pull in subscriptions(broker, forwarder):
                pass  # runs until Ctrl-C / SIGTERM; the latest streaming pull is kept, to stop it below
        except KeyboardInterrupt:
            # A second Ctrl-C or SIGTERM must not cut the shutdown short and leave a message half-done.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("subscriber.py: stopping: finishing the messages in hand", flush=True)
            forwarder.close()  # post, then ack or nack, every message in hand; new arrivals are nacked
            if streaming_pull is not None:
                _end(streaming_pull)  # then stop the stream
            print("subscriber.py: stopped", flush=True)


def subscriptions(broker, forwarder: EventForwarder):
    """Run the streaming pull, and run it again whenever it ends; yields each one as it starts.

    Only Ctrl-C / SIGTERM (KeyboardInterrupt) stops this. The library retries a broken connection by
    itself; when the stream ends for good (the emulator restarted and lost the subscription, someone
    deleted it), provision it again and resubscribe, after growing pauses. Each change is logged once.
    """
    failures, last_problem, announced = 0, None, False
    while True:
        started = time.monotonic()
        try:
            streaming_pull = broker.subscribe(forwarder, MAX_MESSAGES_HELD)
        except BrokerError as error:  # e.g. the embedded broker's file is locked or unreadable
            problem = str(error)
        else:
            yield streaming_pull
            if announced:  # once after each logged problem, not after every retry of the same one
                log.info("subscribed again to %s", broker.description)
                announced = False
            try:
                streaming_pull.result()
                problem = "the streaming pull ended"
            except Exception as error:  # noqa: BLE001 - whatever ended the stream, pull again
                problem = f"{type(error).__name__}: {error}"
            _end(streaming_pull)
        if time.monotonic() - started > HEALTHY_RUN_SECONDS:
            failures = 0  # a new problem after a good run starts with the shortest pause
        if problem != last_problem:
            log.warning("streaming pull stopped (%s): provisioning and subscribing again, retrying at least "
                        "every %s s", problem, RESUBSCRIBE_PAUSES_SECONDS[-1])
            last_problem, announced = problem, True
        time.sleep(RESUBSCRIBE_PAUSES_SECONDS[min(failures, len(RESUBSCRIBE_PAUSES_SECONDS) - 1)])
        failures += 1
        try:
            for warning in broker.provision():
                log.warning("%s", warning)
        except BrokerError as error:
            if str(error) != last_problem:
                log.warning("%s: trying again", error)
                last_problem, announced = str(error), True


def _end(streaming_pull) -> None:
    """Cancel a streaming pull and wait until it has stopped."""
    streaming_pull.cancel()
    try:
        streaming_pull.result(timeout=60)
    except Exception:  # noqa: BLE001 - CancelledError, or the error that ended it: both mean stopped
        pass


if __name__ == "__main__":
    main()
