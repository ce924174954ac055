"""SQS dead-letter queues as the redrive sees them (``fabric.ports.DeadLetterQueue``), and SQS's
native message-move tasks behind a small wrapper.

The manual mover receives a letter (hidden for ``hold_seconds``), re-sends its body and every
message attribute to the source queue, and deletes it from the DLQ only once SQS accepted the
send. It filters, dry-runs and audits per message, and it runs under moto. The native move task
(``SqsMessageMoveTasks``) moves a whole queue inside SQS, without filters or per-message audit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter
from fabric.settings import SqsDeadLetterQueue as QueueSettings

# How often a message was redriven; SQS moves a message to a DLQ only for too many receives.
REDRIVES_ATTRIBUTE = "fabric-redrives"
SQS_DEAD_LETTER_REASON = "max-receive-count"
_MAX_ATTRIBUTES = 10  # SQS refuses more message attributes than this


class SqsDeadLetterQueue:
    """One SQS DLQ and the source queue its letters go back to."""

    def __init__(
        self, queue: QueueSettings, client_factory: Callable[[], Any], *, hold_seconds: int = 300
    ) -> None:
        self.name = queue.name + "-dlq"
        self._queue = queue
        self._client_factory = client_factory
        self._client: Any = None
        self._hold_seconds = hold_seconds
        self._held: dict[str, dict[str, Any]] = {}  # handle -> message attributes
        self._seen: set[str] = set()  # SQS message ids taken in this run

    def _sqs(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters, each hidden for ``hold_seconds``; ages are from the time the
        message was first sent (SQS keeps ``SentTimestamp`` when it dead-letters).

        Raises:
            TransportUnavailable: SQS cannot be reached or refuses the call.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        letters: list[DeadLetter] = []
        while len(letters) < limit:
            try:
                response = self._sqs().receive_message(
                    QueueUrl=self._queue.dlq_url,
                    MaxNumberOfMessages=max(1, min(10, limit - len(letters))),
                    WaitTimeSeconds=0,
                    VisibilityTimeout=self._hold_seconds,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["SentTimestamp"],
                )
            except (BotoCoreError, ClientError) as exc:
                raise TransportUnavailable(f"cannot receive from {self.name}") from exc
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in self._seen]
            if not fresh:
                break
            for message in fresh:
                self._seen.add(message["MessageId"])
                self._held[message["ReceiptHandle"]] = message.get("MessageAttributes", {})
                letters.append(self._letter(message))
        return letters

    def move(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Send to the source queue, 10 at a time; the letters SQS accepted."""
        from botocore.exceptions import BotoCoreError, ClientError

        moved: list[DeadLetter] = []
        for start in range(0, len(letters), 10):
            chunk = list(letters[start : start + 10])
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": letter.body.decode("utf-8"),
                    "MessageAttributes": self._attributes(letter),
                }
                for i, letter in enumerate(chunk)
            ]
            try:
                response = self._sqs().send_message_batch(
                    QueueUrl=self._queue.source_url, Entries=entries
                )
            except (BotoCoreError, ClientError):
                continue  # not moved: it stays in the DLQ
            moved.extend(chunk[int(item["Id"])] for item in response.get("Successful", []))
        return moved

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Delete from the DLQ, 10 at a time; the handles SQS confirmed deleted."""
        from botocore.exceptions import BotoCoreError, ClientError

        removed: set[str] = set()
        handles = [letter.handle for letter in letters]
        for start in range(0, len(handles), 10):
            chunk = handles[start : start + 10]
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
            try:
                response = self._sqs().delete_message_batch(
                    QueueUrl=self._queue.dlq_url, Entries=entries
                )
            except (BotoCoreError, ClientError):
                continue
            removed.update(chunk[int(item["Id"])] for item in response.get("Successful", []))
        for handle in removed:
            self._held.pop(handle, None)
        return removed

    def release(self) -> None:
        """Make every held letter visible again at once (else: after ``hold_seconds``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        handles = list(self._held)
        self._held.clear()
        self._seen.clear()
        for start in range(0, len(handles), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                for i, h in enumerate(handles[start : start + 10])
            ]
            try:
                self._sqs().change_message_visibility_batch(
                    QueueUrl=self._queue.dlq_url, Entries=entries
                )
            except (BotoCoreError, ClientError):
                continue  # visible again after hold_seconds anyway

    def _letter(self, message: dict[str, Any]) -> DeadLetter:
        attributes = message.get("MessageAttributes", {})

        def attribute(name: str) -> str | None:
            value = attributes.get(name, {}).get("StringValue")
            return None if value is None else str(value)

        body = str(message["Body"])
        message_id, topic = attribute(MESSAGE_ID_ATTRIBUTE), attribute(TOPIC_ATTRIBUTE)
        if message_id is None or topic is None:
            try:
                envelope = json.loads(body)
            except ValueError:
                envelope = {}
            envelope = envelope if isinstance(envelope, dict) else {}
            message_id = message_id or str(envelope.get("message_id") or message["MessageId"])
            topic = topic or str(envelope.get("topic") or "")
        sent = message.get("Attributes", {}).get("SentTimestamp")
        redrives = attribute(REDRIVES_ATTRIBUTE) or "0"
        headers_text = attribute(HEADERS_ATTRIBUTE)
        return DeadLetter(
            handle=str(message["ReceiptHandle"]),
            message_id=message_id,
            topic=topic,
            body=body.encode("utf-8"),
            origin=self._queue.source_url,
            reason=SQS_DEAD_LETTER_REASON,
            dead_lettered_at=(
                datetime.fromtimestamp(int(sent) / 1000, UTC) if sent and sent.isdigit() else None
            ),
            redrives=int(redrives) if redrives.isdigit() else 0,
            headers=json.loads(headers_text) if headers_text else {},
        )

    def _attributes(self, letter: DeadLetter) -> dict[str, Any]:
        kept = {
            name: {
                k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")
            }
            for name, value in self._held.get(letter.handle, {}).items()
            if name != REDRIVES_ATTRIBUTE
        }
        if len(kept) < _MAX_ATTRIBUTES:  # else the originals win; the counter is informational
            kept[REDRIVES_ATTRIBUTE] = {
                "DataType": "Number",
                "StringValue": str(letter.redrives + 1),
            }
        return kept


@dataclass(frozen=True)
class MoveTask:
    """One SQS message-move task, as ``ListMessageMoveTasks`` reports it."""

    handle: str | None
    status: str
    moved: int
    to_move: int | None
    failure: str | None


class SqsMessageMoveTasks:
    """SQS's native redrive (``StartMessageMoveTask``): a whole DLQ back to its source, inside
    SQS, at up to ``rate_per_s`` messages a second. moto 5.2.5 does not implement it."""

    def __init__(self, client_factory: Callable[[], Any]) -> None:
        self._client_factory = client_factory

    def start(self, queue: QueueSettings, *, rate_per_s: int | None = None) -> str:
        """Start moving ``queue``'s DLQ to its source; the task handle."""
        arguments: dict[str, Any] = {
            "SourceArn": queue.dlq_arn,
            "DestinationArn": queue.source_arn,
        }
        if rate_per_s is not None:
            arguments["MaxNumberOfMessagesPerSecond"] = rate_per_s
        return str(self._client_factory().start_message_move_task(**arguments)["TaskHandle"])

    def tasks(self, queue: QueueSettings) -> list[MoveTask]:
        """The recent move tasks of ``queue``'s DLQ, newest first."""
        response = self._client_factory().list_message_move_tasks(
            SourceArn=queue.dlq_arn, MaxResults=10
        )
        return [
            MoveTask(
                handle=item.get("TaskHandle"),
                status=str(item["Status"]),
                moved=int(item.get("ApproximateNumberOfMessagesMoved", 0)),
                to_move=item.get("ApproximateNumberOfMessagesToMove"),
                failure=item.get("FailureReason"),
            )
            for item in response.get("Results", [])
        ]

    def cancel(self, handle: str) -> int:
        """Cancel a running task; how many messages it had moved."""
        response = self._client_factory().cancel_message_move_task(TaskHandle=handle)
        return int(response.get("ApproximateNumberOfMessagesMoved", 0))
