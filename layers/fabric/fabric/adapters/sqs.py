"""The fallback queues on SQS, as the drain sees them (``fabric.ports.FallbackSource``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.errors import TransportUnavailable
from fabric.ports import Received


class SqsFallbackSource:
    """Receives from and deletes in the fallback queues (by queue URL)."""

    def __init__(self, client_factory: Callable[[], Any]) -> None:
        self._client_factory = client_factory
        self._client: Any = None

    def _sqs(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def receive(self, queue: str, limit: int) -> list[Received]:
        """Up to ``limit`` (at most 10) messages, without waiting for more to arrive.

        Raises:
            TransportUnavailable: SQS cannot be reached or refuses the call.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._sqs().receive_message(
                QueueUrl=queue,
                MaxNumberOfMessages=max(1, min(limit, 10)),
                MessageAttributeNames=["All"],
                WaitTimeSeconds=0,
            )
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"cannot receive from {queue}") from exc
        return [_received(item) for item in response.get("Messages", [])]

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


def _received(item: dict[str, Any]) -> Received:
    attributes = item.get("MessageAttributes", {})

    def attribute(name: str) -> str | None:
        value = attributes.get(name, {}).get("StringValue")
        return str(value) if value is not None else None

    body = str(item["Body"])
    message_id = attribute(MESSAGE_ID_ATTRIBUTE)
    topic = attribute(TOPIC_ATTRIBUTE)
    if message_id is None or topic is None:
        # A message that did not come through our SNS transport: read what the envelope says.
        envelope = json.loads(body)
        message_id = message_id or str(envelope.get("message_id", item["MessageId"]))
        topic = topic or str(envelope.get("topic", ""))
    headers_text = attribute(HEADERS_ATTRIBUTE)
    return Received(
        handle=str(item["ReceiptHandle"]),
        body=body.encode("utf-8"),
        message_id=message_id,
        topic=topic,
        headers=json.loads(headers_text) if headers_text else {},
    )
