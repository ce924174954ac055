"""The redrive ledger on moto's DynamoDB, in the idempotency table's Powertools schema: what is
recorded is found (past the 25/100 batch sizes), expires after 14 days, never collides with
Powertools' records, and a ledger it cannot read or write says so instead of guessing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.dynamodb_ledger import (
    COMPLETED,
    LEDGER_PREFIX,
    LEDGER_TTL_SECONDS,
    DynamoDbRedriveLedger,
)
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter
from fabric.redrive import ledger_key
from tests.integration.aws_audit import create_idempotency_table

pytestmark = pytest.mark.integration
REGION = os.environ.get("AWS_REGION") or "ap-southeast-3"
TABLE = "fabric-test-idempotency"


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto with the idempotency table as the stateful stack defines it (key ``id``, TTL on
    ``expiration``)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(client, TABLE)
        client.update_time_to_live(
            TableName=TABLE,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"},
        )
        yield client


def keys(count: int, queue: str = "fabric.media.dlq") -> list[str]:
    return [f"redrive#{queue}#m-{i:04d}#0" for i in range(count)]


class Unprocessed:
    """The moto client, but each batch call leaves part of its request unprocessed, as
    DynamoDB does when throttled: ``times`` calls keep half (or all, ``keep_all``) back."""

    def __init__(self, client: Any, *, times: int, keep_all: bool = False) -> None:
        self._client, self._times, self._keep_all = client, times, keep_all
        self.calls = 0

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        ((table, request),) = RequestItems.items()
        wanted = request["Keys"]
        if self.calls > self._times:
            return dict(self._client.batch_get_item(RequestItems=RequestItems))
        cut = 0 if self._keep_all else len(wanted) // 2
        served = (
            self._client.batch_get_item(RequestItems={table: {**request, "Keys": wanted[:cut]}})
            if cut
            else {"Responses": {table: []}}
        )
        return {
            "Responses": served["Responses"],
            "UnprocessedKeys": {table: {**request, "Keys": wanted[cut:]}},
        }

    def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        ((table, requests),) = RequestItems.items()
        if self.calls > self._times:
            return dict(self._client.batch_write_item(RequestItems=RequestItems))
        cut = 0 if self._keep_all else len(requests) // 2
        if cut:
            self._client.batch_write_item(RequestItems={table: requests[:cut]})
        return {"UnprocessedItems": {table: requests[cut:]}}


def test_recorded_keys_are_found_and_no_others_past_the_batch_sizes(dynamodb: Any) -> None:
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)
    recorded, others = keys(150), keys(130, queue="fabric.media.emergency.dlq")

    assert ledger.moved(recorded) == set()
    ledger.record(recorded)

    assert ledger.moved([*others[:60], *recorded, *others[60:]]) == set(recorded)
    assert ledger.moved(others) == set()
    assert dynamodb.scan(TableName=TABLE, Select="COUNT")["Count"] == 150


def test_an_entry_is_a_completed_record_expiring_after_four_hundred_days(dynamodb: Any) -> None:
    DynamoDbRedriveLedger(TABLE, lambda: dynamodb).record(keys(1))

    item = dynamodb.get_item(TableName=TABLE, Key={"id": {"S": keys(1)[0]}}, ConsistentRead=True)[
        "Item"
    ]
    assert item["status"] == {"S": COMPLETED}
    assert LEDGER_TTL_SECONDS == 400 * 24 * 3600  # RabbitMQ DLQs keep letters indefinitely
    assert abs(int(item["expiration"]["N"]) - (time.time() + LEDGER_TTL_SECONDS)) < 60


def test_the_expiration_follows_the_clock(dynamodb: Any) -> None:
    DynamoDbRedriveLedger(TABLE, lambda: dynamodb, clock=lambda: 1_700_000_000.7).record(keys(1))
    item = dynamodb.get_item(TableName=TABLE, Key={"id": {"S": keys(1)[0]}})["Item"]
    assert item["expiration"] == {"N": str(1_700_000_000 + LEDGER_TTL_SECONDS)}


def test_redrive_keys_never_meet_powertools_records(dynamodb: Any) -> None:
    # A consumer's Powertools record, in the same table.
    dynamodb.put_item(
        TableName=TABLE,
        Item={
            "id": {"S": "consumer#media-indexer#3f2a9c"},
            "status": {"S": "COMPLETED"},
            "expiration": {"N": "4102444800"},
        },
    )
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)

    ledger.record(["consumer#media-indexer#3f2a9c"])  # a key without the prefix gets it

    assert ledger.moved(["consumer#media-indexer#3f2a9c"]) == {"consumer#media-indexer#3f2a9c"}
    stored = {item["id"]["S"] for item in dynamodb.scan(TableName=TABLE)["Items"]}
    assert stored == {
        "consumer#media-indexer#3f2a9c",
        f"{LEDGER_PREFIX}consumer#media-indexer#3f2a9c",
    }
    assert keys(1)[0].startswith(LEDGER_PREFIX)


def test_the_keys_the_redrive_builds_are_stored_as_they_are(dynamodb: Any) -> None:
    letter = DeadLetter(
        handle="h",
        message_id="m-1",
        topic="t",
        body=b"{}",
        origin="fabric.media",
        reason="poison",
        dead_lettered_at=datetime.now(UTC),
        redrives=2,
    )
    key = ledger_key("fabric.media.dlq", letter)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)

    ledger.record([key])

    assert ledger.moved([key]) == {key}
    assert dynamodb.get_item(TableName=TABLE, Key={"id": {"S": key}}).get("Item") is not None


def test_repeated_keys_are_recorded_and_found_once(dynamodb: Any) -> None:
    # DynamoDB refuses a batch that names one key twice.
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)
    repeated = keys(30) * 2
    ledger.record(repeated)
    ledger.record(keys(1))  # again: only renewed
    assert ledger.moved(repeated) == set(keys(30))


def test_nothing_to_look_up_or_record_makes_no_call(dynamodb: Any) -> None:
    ledger = DynamoDbRedriveLedger(TABLE, lambda: pytest.fail("no client needed"))
    ledger.record([])
    assert ledger.moved([]) == set()


def test_unprocessed_keys_and_items_are_retried_until_done(dynamodb: Any) -> None:
    pauses: list[float] = []
    client = Unprocessed(dynamodb, times=2)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: client, sleep=pauses.append)

    ledger.record(keys(40))
    assert dynamodb.scan(TableName=TABLE, Select="COUNT")["Count"] == 40

    client.calls = 0
    assert ledger.moved(keys(40)) == set(keys(40))
    assert len(pauses) == 4, "two retries for each call"
    assert pauses[0] < pauses[1], "backing off"


def test_keys_left_unprocessed_after_the_retries_make_the_ledger_unavailable(
    dynamodb: Any,
) -> None:
    DynamoDbRedriveLedger(TABLE, lambda: dynamodb).record(keys(5))
    client = Unprocessed(dynamodb, times=1_000, keep_all=True)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: client, sleep=lambda _: None)

    with pytest.raises(TransportUnavailable, match="unprocessed"):
        ledger.moved(keys(5))
    assert client.calls == 5, "a few attempts, then it gives up"


def test_items_left_unprocessed_after_the_retries_make_the_ledger_unavailable(
    dynamodb: Any,
) -> None:
    client = Unprocessed(dynamodb, times=1_000, keep_all=True)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: client, sleep=lambda _: None)

    with pytest.raises(TransportUnavailable, match="unprocessed"):
        ledger.record(keys(5))
    assert DynamoDbRedriveLedger(TABLE, lambda: dynamodb).moved(keys(5)) == set()


def test_a_missing_table_makes_the_ledger_unavailable(dynamodb: Any) -> None:
    dynamodb.delete_table(TableName=TABLE)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)
    with pytest.raises(TransportUnavailable, match="ResourceNotFoundException"):
        ledger.moved(keys(1))
    with pytest.raises(TransportUnavailable, match="ResourceNotFoundException"):
        ledger.record(keys(1))


def test_a_letter_with_an_overlong_message_id_is_recorded_and_found(dynamodb: Any) -> None:
    # An SQS dead letter's message id is whatever its body said (a producer's raw message on an
    # ingest queue). Past DynamoDB's 2048-byte key limit, every call was a ValidationException:
    # "ledger unavailable", and each run stopped at that letter, leaving the DLQ stuck behind it.
    letter = DeadLetter(
        handle="h",
        message_id="x" * 3000,
        topic="t",
        body=b"{}",
        origin="https://sqs.ap-southeast-3.amazonaws.com/123456789012/fabric-dev-ingest",
        reason="max-receive-count",
        dead_lettered_at=datetime.now(UTC),
        copy_id="6f1c2d3e-0000-4000-8000-000000000001",
    )
    key = ledger_key("fabric-dev-ingest-dlq", letter)
    other = ledger_key("fabric-dev-ingest-dlq", replace(letter, message_id="x" * 2999 + "y"))
    ledger = DynamoDbRedriveLedger(TABLE, lambda: dynamodb)

    ledger.record([key, *keys(2)])

    assert ledger.moved([key, other, *keys(2)]) == {key, *keys(2)}
