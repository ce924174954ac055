"""The redrive ledger on the idempotency table (``fabric.ports.RedriveLedger``).

Items ``{"id": "redrive#...", "status": "COMPLETED", "expiration": <epoch s>}``: the table's
Powertools schema (partition key ``id``, TTL ``expiration``); the ``redrive#`` prefix never
collides with Powertools' ``consumer#<name>#<hash>`` keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fabric.errors import TransportUnavailable

# The longest a dead letter lives (SQS keeps a message 14 days); after that a key is moot.
LEDGER_TTL_SECONDS = 14 * 24 * 3600
_GET_CHUNK = 100
_WRITE_CHUNK = 25
_ATTEMPTS = 5


class DynamoDbRedriveLedger:
    """Which dead letters were put back, kept in the idempotency table."""

    def __init__(
        self,
        table_name: str,
        client_factory: Callable[[], Any],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._table = table_name
        self._client_factory = client_factory
        self._client: Any = None
        self._sleep = sleep

    def _dynamodb(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def moved(self, keys: Sequence[str]) -> set[str]:
        """The ``keys`` recorded as moved (``BatchGetItem``, 100 at a time).

        Raises:
            TransportUnavailable: DynamoDB cannot be reached or keeps keys unprocessed.
        """
        found: set[str] = set()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _GET_CHUNK):
            request: dict[str, Any] = {
                self._table: {
                    "Keys": [{"id": {"S": key}} for key in unique[start : start + _GET_CHUNK]],
                    "ProjectionExpression": "id",
                    "ConsistentRead": True,
                }
            }
            for attempt in range(_ATTEMPTS):
                response = self._call("batch_get_item", RequestItems=request)
                found.update(item["id"]["S"] for item in response["Responses"].get(self._table, []))
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                self._sleep(0.05 * 2**attempt)
            if request:
                raise TransportUnavailable("the redrive ledger kept keys unprocessed")
        return found

    def record(self, keys: Sequence[str]) -> None:
        """Record ``keys`` as moved (``BatchWriteItem``, 25 at a time).

        Raises:
            TransportUnavailable: DynamoDB cannot be reached or keeps items unprocessed.
        """
        expiration = str(int(time.time()) + LEDGER_TTL_SECONDS)
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _WRITE_CHUNK):
            request: dict[str, Any] = {
                self._table: [
                    {
                        "PutRequest": {
                            "Item": {
                                "id": {"S": key},
                                "status": {"S": "COMPLETED"},
                                "expiration": {"N": expiration},
                            }
                        }
                    }
                    for key in unique[start : start + _WRITE_CHUNK]
                ]
            }
            for attempt in range(_ATTEMPTS):
                response = self._call("batch_write_item", RequestItems=request)
                request = response.get("UnprocessedItems") or {}
                if not request:
                    break
                self._sleep(0.05 * 2**attempt)
            if request:
                raise TransportUnavailable("the redrive ledger kept items unprocessed")

    def _call(self, operation: str, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._dynamodb(), operation)(**arguments)
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"the redrive ledger: {type(exc).__name__}") from exc
