"""The SNS fallback adapter's answers to entries SNS refuses, on a stubbed botocore client."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ReadTimeoutError
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


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test: ends every stalled call, even one the transport abandoned."""
    event = threading.Event()
    yield event
    event.set()


def stall(
    client: Any, release: threading.Event, seconds: dict[int, float], *, unanswered: int = 0
) -> list[int]:
    """PublishBatch call ``n`` (from 1) waits ``seconds[n]`` (less once ``release`` is set)
    before the stub answers, as a slow SNS would; call ``unanswered`` then ends as botocore ends
    a call SNS never answered, after its timeouts and retries. Returns the calls made so far."""
    made: list[int] = []
    numbers = itertools.count(1)

    def wait(**_: Any) -> None:
        made.append(number := next(numbers))
        release.wait(seconds.get(number, 0.0))
        if number == unanswered:
            raise ReadTimeoutError(endpoint_url="https://sns.ap-southeast-3.amazonaws.com/")

    # The event before the Stubber's first one: the stub answers after the wait.
    client.meta.events.register("provide-client-params.sns.PublishBatch", wait)
    return made


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


def test_a_retry_that_does_not_answer_within_the_window_leaves_its_entry_unavailable(
    sns: tuple[Any, Stubber], release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The router's client would spend about 4 s on an SNS that does not answer (two attempts
    # of a 2 s read timeout); the producer gets its answer when the window closes instead.
    monkeypatch.setattr("fabric.adapters.sns.RETRY_WINDOW_S", 0.5)
    client, stubber = sns
    made = stall(client, release, {2: 3.0}, unanswered=2)
    expect(stubber, ["0", "1"], failed={"1": ("Throttling", False)})

    started = time.monotonic()
    outcomes = transport(client).publish(messages(2))
    elapsed = time.monotonic() - started

    assert [o.failure for o in outcomes] == [None, Failure.UNAVAILABLE]
    assert made == [1, 2]  # the retry was sent, and given up on
    assert elapsed < 0.5 + 0.3


def test_a_slow_retry_that_answers_within_the_window_is_stored(
    sns: tuple[Any, Stubber], release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fabric.adapters.sns.RETRY_WINDOW_S", 1.0)
    client, stubber = sns
    stall(client, release, {2: 0.3})
    expect(stubber, ["0", "1"], failed={"1": ("Throttling", False)})
    expect(stubber, ["1"], failed={})

    outcomes = transport(client).publish(messages(2))

    assert [o.transport for o in outcomes] == ["fallback", "fallback"]


def test_a_first_call_slower_than_the_window_is_still_waited_for(
    sns: tuple[Any, Stubber], release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window bounds only the retry: the first call keeps the client's own timeouts, and
    # what SNS stored in it is reported stored however long it took.
    monkeypatch.setattr("fabric.adapters.sns.RETRY_WINDOW_S", 0.2)
    client, stubber = sns
    made = stall(client, release, {1: 0.5})
    expect(stubber, ["0", "1"], failed={"1": ("Throttling", False)})

    outcomes = transport(client).publish(messages(2))

    assert [o.failure for o in outcomes] == [None, Failure.UNAVAILABLE]
    assert made == [1]  # past the window: the throttled entry is not sent again


def test_past_the_calls_budget_nothing_more_is_sent_and_the_request_in_flight_is_given_up(
    sns: tuple[Any, Stubber], release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SNS answers the first request (the emergency) and then stalls: the second is given up on
    # when the budget runs out, and the third is never sent.
    monkeypatch.setattr("fabric.adapters.sns.PUBLISH_BUDGET_S", 0.5)
    client, stubber = sns
    made = stall(client, release, {2: 3.0}, unanswered=2)
    stubber.add_response(
        "publish_batch",
        {"Successful": [{"Id": "20", "MessageId": "sns-20"}], "Failed": []},
        {"TopicArn": EMERGENCY, "PublishBatchRequestEntries": ANY},
    )
    alarm = OutboundMessage(
        "alarm", "t.x", b"{}", frozenset({Stakeholder.GOVERNMENT}), emergency=True
    )

    started = time.monotonic()
    outcomes = transport(client).publish([*messages(20), alarm])
    elapsed = time.monotonic() - started

    assert outcomes[-1].stored
    assert [o.failure for o in outcomes[:-1]] == [Failure.UNAVAILABLE] * 20
    assert made == [1, 2]
    assert elapsed < 0.5 + 0.3
