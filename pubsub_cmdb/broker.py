"""The broker interface: what the web app and the subscriber need from Pub/Sub, and nothing more.

Each backend implements `Broker`. Nothing outside the backends imports google.cloud.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Mapping, Protocol


class BrokerError(Exception):
    """The broker refused or could not be reached; str() says why in one line."""


class UnknownAckId(BrokerError):
    """The ack id is not one the broker handed out, or it has expired."""


class Message(Protocol):
    """What a `subscribe` callback receives (google.cloud.pubsub_v1's Message has this shape)."""
    data: bytes
    attributes: Mapping[str, str]
    message_id: str
    publish_time: datetime
    delivery_attempt: int | None

    def ack(self) -> None: ...
    def nack(self) -> None: ...
    def modify_ack_deadline(self, seconds: int) -> None: ...


class StreamingPull(Protocol):
    """What `subscribe` returns: a future of the running pull."""
    def cancel(self) -> None: ...
    def result(self, timeout: float | None = None): ...


@dataclass(frozen=True)
class PulledMessage:
    """A message pulled for the /messages view; it stays unacknowledged until `acknowledge(ack_id)`."""
    ack_id: str
    message_id: str
    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    publish_time: datetime | None = None
    delivery_attempt: int | None = None  # None where the backend does not count them


class Broker(abc.ABC):
    """One Pub/Sub topic and its pull subscription."""

    #: One line for start-up logs: which backend, where.
    description: str = ""

    @abc.abstractmethod
    def provision(self) -> list[str]:
        """Make sure the topic and subscription exist; return warnings (e.g. no permission to create)."""

    @abc.abstractmethod
    def publish(self, data: bytes, attributes: Mapping[str, str], ordering_key: str = "") -> str:
        """Publish and wait until the broker has it; return the message id.

        Messages with the same non-empty ordering key are delivered in publish order, one at a time:
        the next only after the previous one is acked (a nacked one blocks its key until redelivered).
        """

    @abc.abstractmethod
    def pull(self, max_messages: int = 10) -> list[PulledMessage]:
        """Up to `max_messages` messages, without acknowledging them."""

    @abc.abstractmethod
    def acknowledge(self, ack_id: str) -> None:
        """Acknowledge one pulled message; UnknownAckId where the broker rejects the id."""

    @abc.abstractmethod
    def subscribe(self, callback: Callable[[Message], None], max_messages: int) -> StreamingPull:
        """Streaming pull: call `callback` for each message, at most `max_messages` held at once."""

    def close(self) -> None:
        """Release connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def retry_delay(attempt: int | None, backoff: tuple[float, float], max_delivery_attempts: int | None) -> float:
    """How long a message nacked after delivery `attempt` stays away: the retry policy of both backends.

    min * 2^(attempt-1), at most max (`backoff` is (min, max)); the minimum where attempts are not counted.
    0 after the last attempt a dead-letter policy allows: it goes to the dead-letter topic, no point waiting.
    """
    if attempt is None:
        return backoff[0]
    if max_delivery_attempts and attempt >= max_delivery_attempts:
        return 0
    return min(backoff[1], backoff[0] * 2 ** (attempt - 1))


def dead_letter_subscription(dead_letter_topic: str) -> str:
    """The subscription both backends create on the dead-letter topic, so that what lands there stays."""
    return f"{dead_letter_topic}-sub"


def make_broker(settings) -> Broker:
    """The backend the settings chose (see config: BROKER, PUBSUB_EMULATOR_HOST, GCP_PROJECT)."""
    if settings.broker == "embedded":
        from .embedded_broker import EmbeddedBroker
        return EmbeddedBroker(settings)
    from .google_broker import GoogleBroker
    return GoogleBroker(settings)
