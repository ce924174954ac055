"""The fallback queues on SQS, as the drain sees them (``fabric.ports.FallbackSource``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fabric.adapters.sns import (
    AUDIENCE_ATTRIBUTE,
    HEADERS_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    TOPIC_ATTRIBUTE,
)
from fabric.errors import TransportUnavailable
from fabric.ports import Received

_LOG = logging.getLogger(__name__)
# Receives in a row that may bring only foreign messages before a queue counts as drained.
_RECEIVES_PAST_FOREIGN = 5


class SqsFallbackSource:
    """Receives from and deletes in the fallback queues (by queue URL).

    ``long_poll_s``: how long a receive waits for a message (``receive``); the deployed drain
    keeps the default. Tests against moto set 0: moto's short poll answers every message, and a
    long poll there only costs its wait on each empty queue.
    """

    def __init__(self, client_factory: Callable[[], Any], *, long_poll_s: int = 1) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._long_poll_s = long_poll_s

    def _sqs(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        """Up to ``limit`` (at most 10) messages, waiting at most a second for one to arrive.

        A short poll (no wait) samples only some of SQS's servers and may answer nothing while
        messages remain, which the drain would take for an empty queue and leave emergencies
        for its next run; a one-second long poll asks them all, at the cost of a second per
        queue found empty. ``wait=False`` is that short poll, for the drain's re-check of the
        emergency queues, which asks again a second later: a miss costs a second.

        A message that is not a fabric envelope (sent to the queue by anything but the fabric's
        SNS transport: its body is no JSON object, names another message than its attributes,
        or cannot be read at all, such as JSON nested too deeply for the parser) is left where
        it is, logged, instead of stopping every drain run or being moved and archived as a
        message: a fallback queue's dead-letter queue takes it after its receives, a
        subscription DLQ keeps it; both are alarmed.

        Raises:
            TransportUnavailable: SQS cannot be reached or refuses the call.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        # A receive of nothing but such messages is not an empty queue: the next receive gets
        # the messages behind them (those stay hidden meanwhile), a few times at most.
        for _ in range(_RECEIVES_PAST_FOREIGN):
            try:
                response = self._sqs().receive_message(
                    QueueUrl=queue,
                    MaxNumberOfMessages=max(1, min(limit, 10)),
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                    WaitTimeSeconds=self._long_poll_s if wait else 0,
                )
            except (BotoCoreError, ClientError) as exc:
                raise TransportUnavailable(f"cannot receive from {queue}") from exc
            items = response.get("Messages", [])
            received = [message for message in map(_usable(queue), items) if message]
            if received or not items:
                return received
        return []

    def delete(self, queue: str, handles: Sequence[str]) -> set[str]:
        """Delete in batches of 10; returns the handles SQS confirmed deleted."""
        from botocore.exceptions import BotoCoreError, ClientError

        deleted: set[str] = set()
        for start in range(0, len(handles), 10):
            chunk = list(handles[start : start + 10])
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
            try:
                response = self._sqs().delete_message_batch(QueueUrl=queue, Entries=entries)
            except (BotoCoreError, ClientError):
                continue  # not deleted: it reappears after its visibility timeout
            deleted.update(chunk[int(item["Id"])] for item in response.get("Successful", []))
        return deleted


def _usable(queue: str) -> Callable[[dict[str, Any]], Received | None]:
    def usable(item: dict[str, Any]) -> Received | None:
        try:
            return _received(item)
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            _LOG.warning(
                "%s in %s is not a fabric message (%s): left in the queue",
                item.get("MessageId"),
                queue,
                type(exc).__name__,
            )
            return None

    return usable


def _published(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The body and message attributes as SNS published them: delivered raw (the fallback
    queues' subscriptions), or inside SNS's JSON notification (``Message``, and attributes as
    ``{"Type", "Value"}``), the form a subscription's dead-letter queue may hold them in."""
    body, attributes = str(item["Body"]), item.get("MessageAttributes", {})
    if MESSAGE_ID_ATTRIBUTE in attributes or not body.startswith("{"):
        return body, attributes
    try:
        notification = json.loads(body)
    except ValueError:
        return body, attributes
    if not (
        isinstance(notification, dict)
        and notification.get("Type") == "Notification"
        and isinstance(notification.get("Message"), str)
        and isinstance(notification.get("MessageAttributes", {}), dict)
    ):
        return body, attributes
    # An attribute that is no ``{"Type", "Value"}`` object is kept, without a value: read, it
    # is as absent as before, but an ``audience`` so garbled is unreadable, not missing.
    published = {
        name: {"StringValue": value.get("Value")} if isinstance(value, dict) else {}
        for name, value in notification.get("MessageAttributes", {}).items()
    }
    return notification["Message"], published


def _received(item: dict[str, Any]) -> Received:
    body, attributes = _published(item)

    def attribute(name: str) -> str | None:
        value = attributes.get(name, {}).get("StringValue")
        return str(value) if value is not None else None

    # The body is the envelope the router stored: a JSON object that names the message id of
    # the attributes. One that is not did not come from the fabric's SNS transport, and moved
    # it would reach a consumer as the message the attributes name (and be archived as such).
    # A full validation (``fabric.envelope.from_wire``) is left to the consumers: the drain
    # moves what the router accepted, under whatever contract it was accepted.
    envelope = json.loads(body)
    if not isinstance(envelope, dict):
        raise TypeError("the body is not a JSON object")
    attribute_id = attribute(MESSAGE_ID_ATTRIBUTE)
    if attribute_id and envelope.get("message_id") != attribute_id:
        raise ValueError("the body names another message than its attributes")
    # Without the attributes (it did not come through our SNS transport), read the envelope.
    message_id = attribute_id or str(envelope.get("message_id", item["MessageId"]))
    topic = attribute(TOPIC_ATTRIBUTE) or str(envelope.get("topic", ""))
    headers_text = attribute(HEADERS_ATTRIBUTE)
    headers = json.loads(headers_text) if headers_text else {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise TypeError("the headers attribute is not an object of text values")
    receives = str(item.get("Attributes", {}).get("ApproximateReceiveCount", ""))
    audience, unreadable = _audience(attributes)
    return Received(
        handle=str(item["ReceiptHandle"]),
        body=body.encode("utf-8"),
        message_id=message_id,
        topic=topic,
        headers=headers,
        receives=int(receives) if receives.isdigit() else 0,
        audience=audience,
        audience_unreadable=unreadable,
    )


def _audience(attributes: dict[str, Any]) -> tuple[frozenset[str] | None, bool]:
    """The group names of the ``audience`` attribute, and whether it is there but unreadable.

    The router's SNS transport always sets it, a JSON list of group names (``String.Array``),
    and SNS delivers it with the message in either form (``_published``), as the redrive does
    when it puts a dead letter back. Read strictly: a value that is not text, not JSON, or not
    a list of strings is unreadable (None, True), never read as some group; a message without
    the attribute has none (None, False). The drain decides what either means
    (``fabric.drain``).
    """
    if AUDIENCE_ATTRIBUTE not in attributes:
        return None, False
    attribute = attributes[AUDIENCE_ATTRIBUTE]
    text = attribute.get("StringValue") if isinstance(attribute, dict) else None
    if not isinstance(text, str):
        return None, True
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):
        return None, True
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None, True
    return frozenset(names), False
