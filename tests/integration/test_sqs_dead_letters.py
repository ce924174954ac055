"""The SQS dead-letter queue adapter on moto: letters that took the SNS fallback path and were
dead-lettered by SQS's own redrive policy are peeked once, put back byte for byte with their
attributes and a redrive count, removed, and given back at once."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from fabric.adapters.sns import (
    AUDIENCE_ATTRIBUTE,
    HEADERS_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    TOPIC_ATTRIBUTE,
    SnsFallbackTransport,
)
from fabric.adapters.sqs_dlq import (
    DEAD_LETTER_REASON_ATTRIBUTE,
    DEAD_LETTERED_AT_ATTRIBUTE,
    REDRIVES_ATTRIBUTE,
    SQS_DEAD_LETTER_REASON,
    SqsDeadLetterQueue,
)
from fabric.errors import TransportUnavailable
from fabric.ports import OutboundMessage
from fabric.settings import SqsDeadLetterQueue as QueueSettings
from fabric.stakeholders import Stakeholder
from fabric.topology import sns_filter_policy

pytestmark = pytest.mark.integration
REGION = os.environ.get("AWS_REGION") or "ap-southeast-3"
SOURCE = "fabric-test-fallback-media"
TOPIC = "media.story.published"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto with one fallback topic, the media queue subscribed to it (raw delivery, the group's
    filter) and its DLQ behind a redrive policy of one receive, as the stateful stack has it."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        sqs = boto3.client("sqs", region_name=REGION)
        sns = boto3.client("sns", region_name=REGION)
        dlq_url = sqs.create_queue(QueueName=f"{SOURCE}-dlq")["QueueUrl"]
        dlq_arn = queue_arn(sqs, dlq_url)
        source_url = sqs.create_queue(
            QueueName=SOURCE,
            Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1})
            },
        )["QueueUrl"]
        topic_arn = sns.create_topic(Name="fabric-test-fallback")["TopicArn"]
        sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn(sqs, source_url),
            Attributes={
                "RawMessageDelivery": "true",
                "FilterPolicy": json.dumps(sns_filter_policy(Stakeholder.MEDIA)),
            },
        )
        settings = QueueSettings(
            name=SOURCE,
            dlq_url=dlq_url,
            dlq_arn=dlq_arn,
            source_url=source_url,
            source_arn=queue_arn(sqs, source_url),
        )
        yield {"sqs": sqs, "settings": settings, "topic_arn": topic_arn}


def queue_arn(sqs: Any, url: str) -> str:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return str(attributes["Attributes"]["QueueArn"])


def dead_letter_via_fallback(aws: dict[str, Any], count: int) -> list[OutboundMessage]:
    """``count`` messages through the SNS fallback transport to the media queue, where a
    consumer fails each once: SQS's redrive policy moves them to the DLQ."""
    messages = [
        OutboundMessage(
            message_id=str(uuid.uuid4()),
            topic=TOPIC,
            body=json.dumps({"message_id": f"m-{i}", "topic": TOPIC, "n": i}).encode(),
            audience=frozenset({Stakeholder.MEDIA}),
            headers={"lang": "id", "seq": str(i)},
        )
        for i in range(count)
    ]
    transport = SnsFallbackTransport(
        fallback_topic_arn=aws["topic_arn"],
        emergency_topic_arn=aws["topic_arn"],
        client_factory=lambda: boto3.client("sns", region_name=REGION),
    )
    assert all(outcome.stored for outcome in transport.publish(messages))
    fail_until_dead_lettered(aws["sqs"], aws["settings"].source_url)
    assert depth(aws["sqs"], aws["settings"].dlq_url) == count
    return messages


def fail_until_dead_lettered(sqs: Any, url: str) -> None:
    """Receive (and never delete) until SQS has moved everything to the DLQ."""
    for _ in range(100):
        if not sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0).get(
            "Messages"
        ):
            return
    pytest.fail("messages never reached the dead-letter queue")


def depth(sqs: Any, url: str) -> int:
    """Messages in a queue, visible or not."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every visible message (each hidden for 30 s afterwards), with all attributes."""
    out: list[dict[str, Any]] = []
    while batch := sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], VisibilityTimeout=30
    ).get("Messages", []):
        out.extend(batch)
    return out


def snapshot(sqs: Any, url: str) -> dict[str, dict[str, Any]]:
    """Every visible message by fabric message id, left visible again."""
    messages = receive_all(sqs, url)
    for message in messages:
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    return {m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]: m for m in messages}


def park(sqs: Any, url: str, body: str, attributes: dict[str, Any]) -> None:
    """A message put straight into the DLQ (as a producer parking it would)."""
    sqs.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=attributes)


def string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


class Faulty:
    """A real (moto) client with some calls replaced."""

    def __init__(self, client: Any, **overrides: Any) -> None:
        self._client, self._overrides = client, overrides
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        real = self._overrides.get(name) or getattr(self._client, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return real(**kwargs)

        return call


def client_error(code: str, operation: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


# -- peek ---------------------------------------------------------------------------------------


def test_peek_returns_every_dead_lettered_fallback_message_once(aws: dict[str, Any]) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    sent = {m.message_id: m for m in dead_letter_via_fallback(aws, 25)}
    queue = SqsDeadLetterQueue(aws["settings"], lambda: aws["sqs"])

    first, rest, after = queue.peek(10), queue.peek(100), queue.peek(100)

    assert (len(first), len(rest), after) == (10, 15, [])
    letters = first + rest
    assert {letter.message_id for letter in letters} == set(sent)
    assert len({letter.handle for letter in letters}) == 25
    for letter in letters:
        message = sent[letter.message_id]
        assert letter.topic == TOPIC
        assert letter.body == message.body
        assert letter.headers == message.headers
        assert letter.origin == aws["settings"].source_url
        assert letter.reason == SQS_DEAD_LETTER_REASON == "max-receive-count"
        assert letter.redrives == 0
        # SentTimestamp: when the message was first sent, which SQS keeps in the DLQ.
        assert letter.dead_lettered_at is not None
        assert before <= letter.dead_lettered_at <= datetime.now(UTC)
    assert queue.name == f"{SOURCE}-dlq"


def test_peeked_letters_are_hidden_from_other_readers(aws: dict[str, Any]) -> None:
    dead_letter_via_fallback(aws, 3)
    SqsDeadLetterQueue(aws["settings"], lambda: aws["sqs"]).peek(10)
    assert receive_all(aws["sqs"], aws["settings"].dlq_url) == []
    assert depth(aws["sqs"], aws["settings"].dlq_url) == 3


def test_letters_without_fabric_attributes_are_read_from_the_envelope(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    park(sqs, settings.dlq_url, json.dumps({"message_id": "env-1", "topic": "t.env"}), {})
    park(sqs, settings.dlq_url, "not json", {HEADERS_ATTRIBUTE: string("{broken")})

    letters = sorted(
        SqsDeadLetterQueue(settings, lambda: sqs).peek(10), key=lambda letter: letter.topic
    )

    assert [(letter.message_id, letter.topic) for letter in letters[1:]] == [("env-1", "t.env")]
    assert letters[0].topic == ""
    assert letters[0].message_id  # SQS's own message id, when nothing better is known
    assert letters[0].headers == {}


def test_a_parked_message_says_why_and_when_it_was_dead_lettered(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    park(
        sqs,
        settings.dlq_url,
        "{}",
        {
            MESSAGE_ID_ATTRIBUTE: string("p-1"),
            TOPIC_ATTRIBUTE: string(TOPIC),
            DEAD_LETTER_REASON_ATTRIBUTE: string("poison"),
            DEAD_LETTERED_AT_ATTRIBUTE: {"DataType": "Number", "StringValue": "1700000000"},
            REDRIVES_ATTRIBUTE: {"DataType": "Number", "StringValue": "2"},
        },
    )
    queue = SqsDeadLetterQueue(settings, lambda: sqs)

    (letter,) = queue.peek(10)
    assert (letter.reason, letter.redrives) == ("poison", 2)
    assert letter.dead_lettered_at == datetime.fromtimestamp(1_700_000_000, UTC)

    assert queue.move([letter]) == [letter]
    (back,) = receive_all(sqs, settings.source_url)
    # Per dead-lettering: a redriven message starts afresh (as on RabbitMQ); the count goes up.
    assert set(back["MessageAttributes"]) == {
        MESSAGE_ID_ATTRIBUTE,
        TOPIC_ATTRIBUTE,
        REDRIVES_ATTRIBUTE,
    }
    assert back["MessageAttributes"][REDRIVES_ATTRIBUTE]["StringValue"] == "3"


def test_a_letter_seen_again_in_the_same_run_is_not_returned_twice(aws: dict[str, Any]) -> None:
    dead_letter_via_fallback(aws, 1)
    client = Faulty(aws["sqs"])
    queue = SqsDeadLetterQueue(aws["settings"], lambda: client, hold_seconds=1)
    (letter,) = queue.peek(10)
    time.sleep(1.2)  # the hold runs out: SQS hands the same message out again

    assert queue.peek(10) == []

    assert queue.remove([letter]) == {letter.handle}
    assert depth(aws["sqs"], aws["settings"].dlq_url) == 0
    (delete,) = [kwargs for name, kwargs in client.calls if name == "delete_message_batch"]
    # SQS honours only a message's newest receipt handle.
    assert delete["Entries"][0]["ReceiptHandle"] != letter.handle


def test_peek_on_a_deleted_queue_is_unavailable(aws: dict[str, Any]) -> None:
    aws["sqs"].delete_queue(QueueUrl=aws["settings"].dlq_url)
    with pytest.raises(TransportUnavailable, match=f"{SOURCE}-dlq"):
        SqsDeadLetterQueue(aws["settings"], lambda: aws["sqs"]).peek(10)


def test_the_hold_must_be_one_sqs_accepts(aws: dict[str, Any]) -> None:
    for hold in (0, 43_201):
        with pytest.raises(ValueError, match="hold_seconds"):
            SqsDeadLetterQueue(aws["settings"], lambda: aws["sqs"], hold_seconds=hold)


# -- move, remove, release ----------------------------------------------------------------------


def test_move_puts_back_identical_bodies_and_attributes_with_the_redrive_count(
    aws: dict[str, Any],
) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 25)
    original = snapshot(sqs, settings.dlq_url)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)
    letters = queue.peek(100)

    moved = queue.move(letters)

    assert moved == letters
    back = {
        m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]: m
        for m in receive_all(sqs, settings.source_url)
    }
    assert set(back) == set(original)
    for message_id, message in back.items():
        assert message["Body"] == original[message_id]["Body"]
        assert message["MD5OfBody"] == original[message_id]["MD5OfBody"]
        assert message["MessageAttributes"] == {
            **original[message_id]["MessageAttributes"],
            REDRIVES_ATTRIBUTE: {"DataType": "Number", "StringValue": "1"},
        }
    assert {AUDIENCE_ATTRIBUTE, HEADERS_ATTRIBUTE, TOPIC_ATTRIBUTE} <= set(
        next(iter(back.values()))["MessageAttributes"]
    )
    assert depth(sqs, settings.dlq_url) == 25, "moved, not yet removed"

    assert queue.remove(moved) == {letter.handle for letter in letters}
    queue.release()
    assert depth(sqs, settings.dlq_url) == 0
    assert receive_all(sqs, settings.dlq_url) == []


def test_a_redriven_message_dead_lettered_again_counts_its_redrives(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    (sent,) = dead_letter_via_fallback(aws, 1)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)
    first = queue.peek(10)
    queue.remove(queue.move(first))
    queue.release()

    fail_until_dead_lettered(sqs, settings.source_url)  # the consumer still fails it
    (again,) = queue.peek(10)

    assert (again.message_id, again.redrives, again.body) == (sent.message_id, 1, sent.body)
    assert again.handle != first[0].handle
    queue.move([again])
    (back,) = receive_all(sqs, settings.source_url)
    assert back["MessageAttributes"][REDRIVES_ATTRIBUTE]["StringValue"] == "2"


def test_a_letter_with_ten_attributes_goes_back_with_exactly_those(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    ten = {
        MESSAGE_ID_ATTRIBUTE: string("ten"),
        TOPIC_ATTRIBUTE: string(TOPIC),
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xffraw"},
        "count": {"DataType": "Number.int", "StringValue": "7"},
        **{f"extra-{i}": string(str(i)) for i in range(6)},
    }
    nine = {
        **{k: v for k, v in ten.items() if k != "extra-5"},
        MESSAGE_ID_ATTRIBUTE: string("nine"),
    }
    park(sqs, settings.dlq_url, "{}", ten)
    park(sqs, settings.dlq_url, "{}", nine)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)

    assert len(queue.move(queue.peek(10))) == 2

    back = {
        m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]: m["MessageAttributes"]
        for m in receive_all(sqs, settings.source_url)
    }
    assert back["ten"] == ten, "SQS allows 10 attributes: the originals win over the counter"
    assert back["nine"] == {**nine, REDRIVES_ATTRIBUTE: {"DataType": "Number", "StringValue": "1"}}


def test_a_batch_sqs_refuses_is_not_moved_and_the_rest_is(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 12)
    calls = {"n": 0}

    def send_message_batch(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise client_error("RequestThrottled", "SendMessageBatch", 403)
        return sqs.send_message_batch(**kwargs)

    queue = SqsDeadLetterQueue(settings, lambda: Faulty(sqs, send_message_batch=send_message_batch))
    letters = queue.peek(100)

    moved = queue.move(letters)

    assert moved == letters[10:]
    assert len(receive_all(sqs, settings.source_url)) == 2
    assert depth(sqs, settings.dlq_url) == 12


def test_an_entry_sqs_failed_on_its_side_is_sent_again_and_a_refused_one_is_not(
    aws: dict[str, Any],
) -> None:
    # SendMessageBatch answers per entry: an entry SQS failed on its side (SenderFault false:
    # throttled, an internal error) was not stored and may simply be sent again; one it refused
    # (SenderFault true) would be refused again. Not resending the first stopped the whole
    # redrive run ("origin unavailable") for a transient hiccup of one entry.
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 4)
    calls: list[list[str]] = []

    def send_message_batch(**kwargs: Any) -> Any:
        entries = kwargs["Entries"]
        calls.append([entry["Id"] for entry in entries])
        if len(calls) > 1:
            return sqs.send_message_batch(**kwargs)
        failed = [
            {"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "retry"},
            {"Id": "2", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "no"},
        ]
        kept = [entry for entry in entries if entry["Id"] not in ("1", "2")]
        response = sqs.send_message_batch(QueueUrl=kwargs["QueueUrl"], Entries=kept)
        return {"Successful": response["Successful"], "Failed": failed}

    queue = SqsDeadLetterQueue(settings, lambda: Faulty(sqs, send_message_batch=send_message_batch))
    letters = queue.peek(10)

    moved = queue.move(letters)

    assert moved == [letters[0], letters[3], letters[1]]
    assert len(calls) == 2
    assert len(calls[1]) == 1  # only the entry SQS failed on its side, once
    assert len(receive_all(sqs, settings.source_url)) == 3


def test_move_to_a_missing_source_moves_nothing_and_does_not_raise(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 3)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)
    letters = queue.peek(10)
    sqs.delete_queue(QueueUrl=settings.source_url)

    assert queue.move(letters) == []
    queue.release()
    assert len(receive_all(sqs, settings.dlq_url)) == 3


def test_large_letters_are_sent_in_batches_sqs_accepts(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    for i in range(3):
        park(
            sqs, settings.dlq_url, json.dumps({"message_id": f"big-{i}", "pad": "x" * 100_000}), {}
        )

    def send_message_batch(**kwargs: Any) -> Any:
        # moto does not enforce it; SQS refuses a batch over 256 KiB as a whole.
        if sum(len(entry["MessageBody"]) for entry in kwargs["Entries"]) > 262_144:
            raise client_error("BatchRequestTooLong", "SendMessageBatch")
        return sqs.send_message_batch(**kwargs)

    queue = SqsDeadLetterQueue(settings, lambda: Faulty(sqs, send_message_batch=send_message_batch))

    assert len(queue.move(queue.peek(10))) == 3
    assert len(receive_all(sqs, settings.source_url)) == 3


def test_letters_this_run_does_not_hold_are_not_moved(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 2)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)
    letters = queue.peek(10)
    queue.release()  # the run ended: the attributes are gone with the hold

    assert queue.move(letters) == []
    assert receive_all(sqs, settings.source_url) == []


def test_release_makes_every_held_letter_not_removed_visible_at_once(aws: dict[str, Any]) -> None:
    sqs, settings = aws["sqs"], aws["settings"]
    dead_letter_via_fallback(aws, 5)
    queue = SqsDeadLetterQueue(settings, lambda: sqs)  # held for 300 s unless released
    letters = queue.peek(10)
    assert queue.remove(letters[:2]) == {letter.handle for letter in letters[:2]}

    queue.release()

    visible = {
        m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]
        for m in receive_all(sqs, settings.dlq_url)
    }
    assert visible == {letter.message_id for letter in letters[2:]}
    assert depth(sqs, settings.dlq_url) == 3


def test_after_release_the_next_run_sees_the_letters_again(aws: dict[str, Any]) -> None:
    dead_letter_via_fallback(aws, 4)
    queue = SqsDeadLetterQueue(aws["settings"], lambda: aws["sqs"])
    first = queue.peek(10)
    queue.release()

    again = queue.peek(10)

    assert {letter.message_id for letter in again} == {letter.message_id for letter in first}
