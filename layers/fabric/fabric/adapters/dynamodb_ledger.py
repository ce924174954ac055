"""The redrive ledger on the idempotency table (``fabric.ports.RedriveLedger``).

One item per moved letter, ``{"id": "redrive#...", "status": "COMPLETED", "expiration": <epoch
s>}``, in the table's AWS Lambda Powertools idempotency schema (partition key ``id``, TTL
attribute ``expiration``). Every id starts with ``redrive#`` (``LEDGER_PREFIX``; added to a key
that lacks it), which never collides with Powertools' ``consumer#<name>#<hash>`` ids, and the
``COMPLETED`` status makes Powertools-style tooling read an entry as a finished record. A key
longer than 1 KiB (an SQS letter whose body gave an overlong message id) is stored as
``redrive#sha256:<its digest>``: a partition key holds at most 2048 bytes. Entries
expire after ``LEDGER_TTL_SECONDS`` (400 days). SQS keeps a dead letter at most 14 days, but a
RabbitMQ dead-letter queue keeps it until someone acts: a letter moved and recorded whose
acknowledgement was lost comes back in the DLQ, and a run months later must still find it
recorded (the consumers' own idempotency records are gone after 14 days).

Reads are strongly consistent, so a re-run sees what the previous run wrote. Calls go in
DynamoDB's batch sizes (100 keys per ``BatchGetItem``, 25 items per ``BatchWriteItem``);
what DynamoDB leaves unprocessed (throttling) is retried with backoff a few times, and then the
call fails as unavailable: the redrive moves nothing it cannot check or record.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from fabric.errors import TransportUnavailable

LEDGER_PREFIX = "redrive#"
# Longer than a RabbitMQ dead letter is left alone (its DLQ keeps it until acted on; the depth
# alarm fires at one): an entry is a few dozen bytes.
LEDGER_TTL_SECONDS = 400 * 24 * 3600
COMPLETED = "COMPLETED"
# The Powertools DynamoDBPersistenceLayer defaults (stacks/constructs/idempotency.py).
_KEY = "id"
_EXPIRATION = "expiration"
_STATUS = "status"
_GET_CHUNK = 100  # BatchGetItem's limit
_WRITE_CHUNK = 25  # BatchWriteItem's limit
_ATTEMPTS = 5
_MAX_ID_BYTES = 1024  # well inside DynamoDB's 2048-byte partition key
_BACKOFF_S = 0.05


class DynamoDbRedriveLedger:
    """Which dead letters were put back, kept in the idempotency table ``table_name``."""

    def __init__(
        self,
        table_name: str,
        client_factory: Callable[[], Any],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``client_factory`` makes the boto3 DynamoDB client on first use; ``sleep`` spaces the
        retries of unprocessed keys; ``clock`` (epoch seconds) sets the expiration."""
        self._table = table_name
        self._client_factory = client_factory
        self._client: Any = None
        self._sleep = sleep
        self._clock = clock

    def _dynamodb(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def moved(self, keys: Sequence[str]) -> set[str]:
        """The ``keys`` recorded as moved (``BatchGetItem``, 100 at a time, consistent reads).

        Raises:
            TransportUnavailable: DynamoDB cannot be reached, refuses the call, or keeps keys
                unprocessed after retries.
        """
        ids: dict[
            str, list[str]
        ] = {}  # item id -> the keys naming it (DynamoDB refuses duplicates)
        for key in keys:
            ids.setdefault(_item_id(key), []).append(key)
        unique = list(ids)
        found: set[str] = set()
        for start in range(0, len(unique), _GET_CHUNK):
            request: dict[str, Any] = {
                self._table: {
                    "Keys": [
                        {_KEY: {"S": item_id}} for item_id in unique[start : start + _GET_CHUNK]
                    ],
                    "ProjectionExpression": "#id",
                    "ExpressionAttributeNames": {"#id": _KEY},
                    "ConsistentRead": True,
                }
            }
            for attempt in range(_ATTEMPTS):
                response = self._call("batch_get_item", RequestItems=request)
                for item in response.get("Responses", {}).get(self._table, []):
                    found.update(ids.get(item.get(_KEY, {}).get("S", ""), []))
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                if attempt < _ATTEMPTS - 1:
                    self._sleep(_BACKOFF_S * 2**attempt)
            if request:
                raise TransportUnavailable("the redrive ledger left keys unprocessed (throttled)")
        return found

    def record(self, keys: Sequence[str]) -> None:
        """Record ``keys`` as moved (``BatchWriteItem``, 25 at a time), each expiring
        ``LEDGER_TTL_SECONDS`` from now; recording a key again only renews it.

        Raises:
            TransportUnavailable: DynamoDB cannot be reached, refuses the call, or keeps items
                unprocessed after retries (the items written so far stay written).
        """
        expiration = str(int(self._clock()) + LEDGER_TTL_SECONDS)
        unique = list(dict.fromkeys(_item_id(key) for key in keys))
        for start in range(0, len(unique), _WRITE_CHUNK):
            request: dict[str, Any] = {
                self._table: [
                    {
                        "PutRequest": {
                            "Item": {
                                _KEY: {"S": item_id},
                                _STATUS: {"S": COMPLETED},
                                _EXPIRATION: {"N": expiration},
                            }
                        }
                    }
                    for item_id in unique[start : start + _WRITE_CHUNK]
                ]
            }
            for attempt in range(_ATTEMPTS):
                response = self._call("batch_write_item", RequestItems=request)
                request = response.get("UnprocessedItems") or {}
                if not request:
                    break
                if attempt < _ATTEMPTS - 1:
                    self._sleep(_BACKOFF_S * 2**attempt)
            if request:
                raise TransportUnavailable("the redrive ledger left items unprocessed (throttled)")

    def _call(self, operation: str, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._dynamodb(), operation)(**arguments)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            raise TransportUnavailable(f"the redrive ledger: {operation} {code}") from exc
        except BotoCoreError as exc:
            raise TransportUnavailable(f"the redrive ledger: {type(exc).__name__}") from exc


def _item_id(key: str) -> str:
    item_id = key if key.startswith(LEDGER_PREFIX) else LEDGER_PREFIX + key
    if len(item_id.encode("utf-8")) <= _MAX_ID_BYTES:
        return item_id
    # A partition key holds at most 2048 bytes: past that, every call is a ValidationException,
    # and the run stops at that letter each time. A longer key is known by its digest.
    return f"{LEDGER_PREFIX}sha256:{hashlib.sha256(item_id.encode('utf-8')).hexdigest()}"
