"""Audit batches to the SQS audit queue: their path while RabbitMQ cannot take them.

A ``Transport`` for audit batches only (``MessageKind.AUDIT``); the audit writer reads this
queue as well as the RabbitMQ audit queue, and deduplicates by the batch's message id, which
travels as the ``fabric-message-id`` attribute either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE
from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome

TRANSPORT_NAME = "sqs-audit"


class SqsAuditTransport:
    """Sends each audit batch as one SQS message; anything else is refused (``UNAVAILABLE``)."""

    name = TRANSPORT_NAME
    max_message_bytes = 262_144  # SQS's limit: the audit sink splits batches to fit

    def __init__(self, queue_url: str, client_factory: Callable[[], Any]) -> None:
        self._queue_url = queue_url
        self._client_factory = client_factory
        self._client: Any = None

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """One ``SendMessage`` per audit batch; never raises for SQS trouble."""
        del meanwhile  # each request returns once stored: no wait to overlap with
        from botocore.exceptions import BotoCoreError, ClientError

        outcomes = []
        for message in messages:
            if message.kind is not MessageKind.AUDIT:
                outcomes.append(Outcome(message.message_id, failure=Failure.UNAVAILABLE))
                continue
            try:
                if self._client is None:
                    self._client = self._client_factory()
                self._client.send_message(
                    QueueUrl=self._queue_url,
                    MessageBody=message.body.decode("utf-8"),
                    MessageAttributes={
                        MESSAGE_ID_ATTRIBUTE: {
                            "DataType": "String",
                            "StringValue": message.message_id,
                        }
                    },
                )
            except (BotoCoreError, ClientError):
                outcomes.append(Outcome(message.message_id, failure=Failure.UNAVAILABLE))
                continue
            outcomes.append(Outcome(message.message_id, transport=TRANSPORT_NAME))
        return outcomes

    def close(self) -> None:
        """Nothing to release."""
