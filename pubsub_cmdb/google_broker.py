"""Google Pub/Sub backend (real GCP or Google's emulator) on the google-cloud-pubsub library."""
from __future__ import annotations

import collections
from typing import Callable, Mapping

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from .broker import (Broker, BrokerError, Message, PulledMessage, StreamingPull, UnknownAckId,
                     dead_letter_subscription, retry_delay)

ACK_DEADLINE_SECONDS = 10
PUBLISH_TIMEOUT_SECONDS = 15
# Retry a publish on transient errors for PUBLISH_TIMEOUT_SECONDS in all (the library's default is 10 min).
PUBLISH_RETRY = retry.Retry(
    initial=0.1, maximum=2, multiplier=1.5, timeout=PUBLISH_TIMEOUT_SECONDS,
    predicate=retry.if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted,
                                      gexc.InternalServerError, gexc.ResourceExhausted, gexc.Unknown))
PULL_TIMEOUT_SECONDS = 3
# How long one streaming pull to the emulator lasts before the library opens the next (see _StreamDeadline).
EMULATOR_STREAM_SECONDS = 15
PUBLISHER_OPTIONS = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)


class GoogleBroker(Broker):
    def __init__(self, settings):
        self._on_emulator = settings.on_emulator
        if self._on_emulator:
            # Plain-text gRPC to the emulator named in the settings (not whatever the process environment
            # says), so one process can talk to several emulators, as the tests do.
            host = settings.emulator_host
            self.description = f"Pub/Sub emulator at {host}"
            # No message ordering on the emulator (see provision and publish).
            self._publisher = pubsub_v1.PublisherClient(
                transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host), host=host))
            channel = grpc.intercept_channel(grpc.insecure_channel(host), _StreamDeadline())
            self._subscriber = pubsub_v1.SubscriberClient(
                transport=SubscriberGrpcTransport(channel=channel, host=host))
        else:
            self.description = f"Google Cloud Pub/Sub, project {settings.gcp_project}"
            self._publisher = pubsub_v1.PublisherClient(publisher_options=PUBLISHER_OPTIONS)
            self._subscriber = pubsub_v1.SubscriberClient()
        self.topic_path = self._publisher.topic_path(settings.gcp_project, settings.topic_name)
        self.subscription_path = self._subscriber.subscription_path(settings.gcp_project,
                                                                    settings.subscription_name)
        self.dead_letter_topic_path = None
        if settings.dead_letter_topic:
            self.dead_letter_topic_path = self._publisher.topic_path(settings.gcp_project,
                                                                     settings.dead_letter_topic)
            self.dead_letter_subscription_path = self._subscriber.subscription_path(
                settings.gcp_project, dead_letter_subscription(settings.dead_letter_topic))
        self._max_delivery_attempts = settings.max_delivery_attempts
        self._retry_backoff = settings.retry_backoff

    def provision(self) -> list[str]:
        warnings: list[str] = []
        subscription = {
            "name": self.subscription_path,
            "topic": self.topic_path,
            "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
            # One VM's create and delete delivered in publish order. Not on the emulator: its ordered
            # subscriptions stop delivering anything once a message has used up the dead-letter policy's
            # attempts (README), and main.py publishes there without ordering keys (see publish). The CMDB
            # converges whatever the arrival order anyway (store.py), so ordering is an optimisation.
            "enable_message_ordering": not self._on_emulator,
        }
        if not self._on_emulator:
            # Nacked messages come back after 10 s, then 20 s, ... up to 10 min (RETRY_MIN/MAX_BACKOFF).
            # Not on the emulator (0.8.20): there, the first message whose ack deadline runs out after a
            # redelivery silently stops the thread that brings nacked messages back, and from then on
            # every redelivered message that is nacked or held by a subscriber that dies is stranded
            # until the emulator restarts. There, subscribe() applies the same backoff (_NackLater).
            subscription["retry_policy"] = {
                "minimum_backoff": duration_pb2.Duration(seconds=self._retry_backoff[0]),
                "maximum_backoff": duration_pb2.Duration(seconds=self._retry_backoff[1]),
            }
        if self.dead_letter_topic_path:
            self._create(self._publisher.create_topic, {"name": self.dead_letter_topic_path}, warnings)
            # A subscription on the dead-letter topic keeps what lands there, to be looked at.
            self._create(self._subscriber.create_subscription, {
                "name": self.dead_letter_subscription_path, "topic": self.dead_letter_topic_path}, warnings)
            subscription["dead_letter_policy"] = {"dead_letter_topic": self.dead_letter_topic_path,
                                                  "max_delivery_attempts": self._max_delivery_attempts}
        self._create(self._publisher.create_topic, {"name": self.topic_path}, warnings)
        self._create(self._subscriber.create_subscription, subscription, warnings)
        return warnings

    @staticmethod
    def _create(create, request: dict, warnings: list[str]) -> None:
        """Create a topic or subscription; existing already is fine, no permission is a warning."""
        try:
            create(request=request)
        except gexc.AlreadyExists:
            pass
        except gexc.PermissionDenied:
            warnings.append(f"no permission to create {request['name']}; using it as it is")
        except gexc.GoogleAPICallError as error:
            raise BrokerError(f"cannot create {request['name']}: {error.message}") from error

    def publish(self, data: bytes, attributes: Mapping[str, str], ordering_key: str = "") -> str:
        if self._on_emulator:
            # A client with message ordering retries every publish forever while the broker is down,
            # instead of failing it after PUBLISH_RETRY's deadline: on GCP that is the price of ordering,
            # on the emulator (for demos and tests) we publish without (its subscription is not ordered).
            ordering_key = ""
        for first_try in (True, False):
            future = self._publisher.publish(self.topic_path, data, ordering_key=ordering_key,
                                             retry=PUBLISH_RETRY, timeout=PUBLISH_TIMEOUT_SECONDS, **attributes)
            try:
                # Without ordering the library gives up after PUBLISH_RETRY's deadline and fails the future:
                # wait for that verdict, so that "not published" is never said of a message it still sends.
                return future.result(timeout=PUBLISH_TIMEOUT_SECONDS + 10)
            except TimeoutError as error:
                # With ordering (GCP) the library keeps retrying in the background.
                raise BrokerError(f"publish not confirmed: no answer from {self.description} in "
                                  f"{PUBLISH_TIMEOUT_SECONDS + 10} s; it is still being retried and may be "
                                  "published later (check /cmdb before sending it again)") from error
            except gexc.RetryError as error:
                last = getattr(error.cause, "message", error.cause)
                raise BrokerError(f"publish failed: {self.description} did not answer in "
                                  f"{PUBLISH_TIMEOUT_SECONDS} s ({last})") from error
            except gexc.GoogleAPICallError as error:
                if ordering_key:
                    self._resume(ordering_key)
                if first_try and self._provisioned_again(error):
                    continue
                raise BrokerError(f"publish failed: {error.message}") from error

    def _resume(self, ordering_key: str) -> None:
        """A failed publish pauses its ordering key in the library: let the next one through."""
        try:
            self._publisher.resume_publish(self.topic_path, ordering_key)
        except RuntimeError:  # "Ordering key is not paused": the library has not failed it (yet)
            pass

    def pull(self, max_messages: int = 10) -> list[PulledMessage]:
        request = {"subscription": self.subscription_path, "max_messages": max_messages}
        if self._on_emulator:
            # The emulator answers at once with what it has; GCP deprecates this flag, so there we wait briefly.
            request["return_immediately"] = True
        for first_try in (True, False):
            try:
                response = self._subscriber.pull(request=request, timeout=PULL_TIMEOUT_SECONDS, retry=None)
                break
            except gexc.DeadlineExceeded:
                return []
            except gexc.GoogleAPICallError as error:
                if first_try and self._provisioned_again(error):
                    continue
                raise BrokerError(f"pull failed: {error.message}") from error
        return [PulledMessage(
            ack_id=received.ack_id,
            message_id=received.message.message_id,
            data=received.message.data,
            attributes=dict(received.message.attributes),
            publish_time=received.message.publish_time,
            # Pub/Sub counts attempts only where a dead-letter policy is set; 0 means "not counted".
            delivery_attempt=received.delivery_attempt or None,
        ) for received in response.received_messages]

    def _provisioned_again(self, error: Exception) -> bool:
        """After NotFound, create the topic and subscription again (as at start) and say so.

        The emulator keeps nothing across a restart; on GCP someone may have deleted them.
        """
        if not isinstance(error, gexc.NotFound):
            return False
        try:
            self.provision()
        except BrokerError:
            return False
        return True

    def acknowledge(self, ack_id: str) -> None:
        try:
            self._subscriber.acknowledge(request={"subscription": self.subscription_path, "ack_ids": [ack_id]},
                                         timeout=PULL_TIMEOUT_SECONDS)
        except gexc.InvalidArgument as error:
            raise UnknownAckId(f"unknown or expired ack id: {error.message}") from error
        except gexc.GoogleAPICallError as error:
            raise BrokerError(f"acknowledge failed: {error.message}") from error

    def subscribe(self, callback: Callable[[Message], None], max_messages: int) -> StreamingPull:
        flow_control = pubsub_v1.types.FlowControl(
            max_messages=max_messages,
            # Short lease extensions: messages held by a subscriber that dies come back within ~10 s,
            # where the library default keeps them invisible for minutes.
            max_duration_per_lease_extension=ACK_DEADLINE_SECONDS,
        )
        if self._on_emulator:
            max_attempts = self._max_delivery_attempts if self.dead_letter_topic_path else None

            def on_message(message):
                callback(_NackLater(message, self._retry_backoff, max_attempts))
        else:
            on_message = callback
        return self._subscriber.subscribe(self.subscription_path, on_message, flow_control=flow_control,
                                          await_callbacks_on_shutdown=True)

    def close(self) -> None:
        self._subscriber.close()
        self._publisher.stop()


class _NackLater:
    """A library Message whose nack() keeps the retry policy on the client, for the emulator (whose own
    retry policy strands messages, see provision): the message's ack deadline is set to the backoff and
    the library stops extending it, so the emulator hands it out again when that runs out. It no longer
    counts against flow control meanwhile, and a subscriber that dies changes nothing."""

    def __init__(self, message, backoff: tuple[float, float], max_delivery_attempts: int | None):
        self._message = message
        self._backoff = backoff
        self._max_delivery_attempts = max_delivery_attempts

    def __getattr__(self, name):
        return getattr(self._message, name)

    def nack(self) -> None:
        delay = retry_delay(self._message.delivery_attempt, self._backoff, self._max_delivery_attempts)
        if delay < 1:
            self._message.nack()
            return
        self._message.modify_ack_deadline(min(600, round(delay)))  # Pub/Sub's longest ack deadline
        self._message.drop()


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """A gRPC call's details with one field changed (grpc's own are read-only)."""


class _StreamDeadline(grpc.StreamStreamClientInterceptor):
    """Gives each streaming pull to the emulator a deadline of EMULATOR_STREAM_SECONDS; the library opens
    the next stream at once (DeadlineExceeded is one of its recoverable stream errors) and keeps the
    messages in hand. Why: the emulator does not notice a subscriber that died (SIGKILL, lost connection).
    It goes on handing that dead stream messages, each then away for its ack deadline, until the stream's
    deadline, which is 30 min by the library's default: measured here, 300 of 500 messages held by a
    killed subscriber were still missing 60 s later."""

    def intercept_stream_stream(self, continuation, call_details, request_iterator):
        if call_details.method.endswith("/StreamingPull"):
            timeout = min(call_details.timeout or EMULATOR_STREAM_SECONDS, EMULATOR_STREAM_SECONDS)
            call_details = _CallDetails(call_details.method, timeout, call_details.metadata,
                                        call_details.credentials, call_details.wait_for_ready,
                                        call_details.compression)
        return continuation(call_details, request_iterator)

