"""The SNS fallback adapter's answers to entries SNS refuses, on a stubbed botocore client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from fabric.adapters.sns import SnsFallbackTransport
from fabric.ports import Failure, OutboundMessage
from fabric.stakeholders import Stakeholder

TOPIC = "arn:aws:sns:ap-southeast-3:111111111111:fallback"
EMERGENCY = "arn:aws:sns:ap-southeast-3:111111111111:emergency"


@pytest.fixture
def sns() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client(
        "sns",
        region_name="ap-southeast-3",
        aws_access_key_id="test",
        aws_secret_access_key="test",  # noqa: S106 (never sent: the stub answers)
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def messages(count: int) -> list[OutboundMessage]:
    return [
        OutboundMessage(
            f"m-{i}",
            "t.x",
            json.dumps({"message_id": f"m-{i}", "payload": {}}).encode(),
            frozenset({Stakeholder.MEDIA}),
        )
        for i in range(count)
    ]


def expect(stubber: Stubber, ids: list[str], *, failed: dict[str, tuple[str, bool]]) -> None:
    """One PublishBatch of exactly the entries ``ids``; SNS fails those in ``failed`` (id ->
    code, sender fault) and stores the others."""
    stubber.add_response(
        "publish_batch",
        {
            "Successful": [{"Id": i, "MessageId": f"sns-{i}"} for i in ids if i not in failed],
            "Failed": [
                {"Id": i, "Code": code, "SenderFault": sender}
                for i, (code, sender) in failed.items()
            ],
        },
        {
            "TopicArn": TOPIC,
            "PublishBatchRequestEntries": [
                {"Id": i, "Message": ANY, "MessageAttributes": ANY} for i in ids
            ],
        },
    )


def transport(client: Any) -> SnsFallbackTransport:
    return SnsFallbackTransport(
        fallback_topic_arn=TOPIC, emergency_topic_arn=EMERGENCY, client_factory=lambda: client
    )


def test_entries_sns_throttled_are_sent_again_alone_and_stored(
    sns: tuple[Any, Stubber],
) -> None:
    client, stubber = sns
    expect(
        stubber,
        ["0", "1", "2", "3"],
        failed={"1": ("Throttling", False), "3": ("InternalError", False)},
    )
    # Only the two refused entries go again: the stored ones would be delivered twice.
    expect(stubber, ["1", "3"], failed={})

    outcomes = transport(client).publish(messages(4))

    assert [o.transport for o in outcomes] == ["fallback"] * 4


def test_an_entry_refused_twice_is_unavailable_after_one_retry(sns: tuple[Any, Stubber]) -> None:
    client, stubber = sns
    expect(stubber, ["0", "1"], failed={"0": ("KMSThrottling", False)})
    expect(stubber, ["0"], failed={"0": ("KMSThrottling", False)})

    outcomes = transport(client).publish(messages(2))

    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE, None]


def test_an_entry_refused_for_the_senders_fault_is_not_sent_again(
    sns: tuple[Any, Stubber],
) -> None:
    client, stubber = sns
    expect(
        stubber,
        ["0", "1", "2"],
        failed={"0": ("InvalidParameter", True), "2": ("KMSAccessDenied", True)},
    )

    outcomes = transport(client).publish(messages(3))

    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE, None, Failure.UNAVAILABLE]


def test_past_the_retry_window_a_throttled_entry_is_not_sent_again(
    sns: tuple[Any, Stubber], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call that has already used its window (a slow SNS, many batches) answers now rather
    # than keep the producer waiting: the entry is unavailable, never falsely stored.
    monkeypatch.setattr("fabric.adapters.sns.RETRY_WINDOW_S", 0.0)
    client, stubber = sns
    expect(stubber, ["0", "1"], failed={"1": ("Throttling", False)})

    outcomes = transport(client).publish(messages(2))

    assert [o.failure for o in outcomes] == [None, Failure.UNAVAILABLE]
