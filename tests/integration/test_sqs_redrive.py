"""The redrive of SQS dead letters end to end on moto (the Redriver with the manual mover and the
DynamoDB ledger), and the runbook command driving the redrive function's code. The adapters on
their own: test_sqs_dead_letters.py and test_dynamodb_ledger.py."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.dynamodb_ledger import DynamoDbRedriveLedger
from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.adapters.sqs_dlq import REDRIVE_ID_ATTRIBUTE, REDRIVES_ATTRIBUTE, SqsDeadLetterQueue
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver
from fabric.settings import SqsDeadLetterQueue as QueueSettings
from tests.integration.aws_audit import create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.message_ids import msg_id

SOURCE = "fabric-test-fallback-media"
TABLE = "fabric-test-idempotency"


@pytest.fixture
def sqs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("sqs", region_name=REGION)
        urls = {n: client.create_queue(QueueName=n)["QueueUrl"] for n in (SOURCE, f"{SOURCE}-dlq")}
        arns = {
            n: client.get_queue_attributes(QueueUrl=u, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            for n, u in urls.items()
        }
        create_idempotency_table(boto3.client("dynamodb", region_name=REGION), TABLE)
        settings = QueueSettings(
            name=SOURCE,
            dlq_url=urls[f"{SOURCE}-dlq"],
            dlq_arn=arns[f"{SOURCE}-dlq"],
            source_url=urls[SOURCE],
            source_arn=arns[SOURCE],
        )
        yield {"client": client, "settings": settings}


def park(
    client: Any, settings: QueueSettings, count: int, topic: str = "media.story.published"
) -> list[str]:
    """Dead letters with the attributes the SNS fallback path gives a message; their ids."""
    ids = [msg_id(f"m-{i:03d}") for i in range(count)]
    for message_id in ids:
        client.send_message(
            QueueUrl=settings.dlq_url,
            MessageBody=json.dumps({"message_id": message_id, "topic": topic}),
            MessageAttributes={
                MESSAGE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": message_id},
                TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": topic},
                HEADERS_ATTRIBUTE: {"DataType": "String", "StringValue": '{"lang": "id"}'},
                "audience": {"DataType": "String.Array", "StringValue": '["media"]'},
            },
        )
    return ids


def received(client: Any, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while batch := client.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages", []):
        out.extend(batch)
    return out


def test_a_redrive_run_puts_sqs_letters_back_with_their_attributes_and_audits_them(
    sqs: dict[str, Any],
) -> None:
    client, settings = sqs["client"], sqs["settings"]
    ids = park(client, settings, 25)
    ledger = DynamoDbRedriveLedger(TABLE, lambda: boto3.client("dynamodb", region_name=REGION))
    audit = MemoryAuditSink()

    report = Redriver(ledger=ledger, audit=audit).run(SqsDeadLetterQueue(settings, lambda: client))

    assert report.moved == 25
    back = received(client, settings.source_url)
    assert sorted(
        m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"] for m in back
    ) == sorted(ids)
    sample = back[0]["MessageAttributes"]
    assert sample["audience"] == {"DataType": "String.Array", "StringValue": '["media"]'}
    assert sample[HEADERS_ATTRIBUTE]["StringValue"] == '{"lang": "id"}'
    assert sample[REDRIVES_ATTRIBUTE]["StringValue"] == "1"
    assert received(client, settings.dlq_url) == []
    assert sorted(r.message_id for r in audit.records) == sorted(ids)


def test_a_filtered_run_gives_the_rest_back_at_once(sqs: dict[str, Any]) -> None:
    client, settings = sqs["client"], sqs["settings"]
    park(client, settings, 3, topic="media.story.published")
    park(client, settings, 2, topic="media.embargo.lifted")
    queue = SqsDeadLetterQueue(settings, lambda: client)

    report = Redriver(
        ledger=DynamoDbRedriveLedger(TABLE, lambda: boto3.client("dynamodb")),
        audit=MemoryAuditSink(),
    ).run(queue, RedrivePlan(selection=RedriveFilter(topics=("media.embargo.*",))))

    assert (report.scanned, report.moved) == (5, 2)
    assert len(received(client, settings.dlq_url)) == 3, "visible again without waiting"


# -- the runbook command, with the redrive function's own code behind the invoke -----------------


class RedriveFunction:
    """Stands in for Lambda's invoke (moto cannot run functions without Docker) by running the
    redrive function's code in-process against moto."""

    def __init__(self, runtime: Any, after: Callable[[], None] | None = None) -> None:
        from fabric.redrive import parse_request

        self.runtime, self.parse, self.events = runtime, parse_request, []
        self.after = after  # what happens between two invocations

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        event = json.loads(Payload)
        self.events.append((FunctionName, event))
        try:
            request = self.parse(event)
            body = self.runtime.redriver.run(
                self.runtime.queue(request.source, request.queue), request.plan
            ).to_dict()
        except ValueError as exc:
            body = {"error": str(exc)}
        if self.after is not None:
            self.after()
        return {"Payload": io.BytesIO(json.dumps(body).encode())}


def runbook_redrive(
    sqs: dict[str, Any], after: Callable[[], None] | None = None, **request: Any
) -> tuple[int, str, RedriveFunction]:
    from fabric.bootstrap import RedriveRuntime
    from fabric.redrive import Redriver
    from scripts import runbook

    settings = sqs["settings"]

    def open_queue(_source: str, name: str) -> SqsDeadLetterQueue:
        if name.removesuffix("-dlq") != SOURCE:
            raise ValueError(f"{name!r} is not a redrivable SQS queue")
        return SqsDeadLetterQueue(settings, lambda: sqs["client"])

    runtime = RedriveRuntime(
        redriver=Redriver(
            ledger=DynamoDbRedriveLedger(TABLE, lambda: boto3.client("dynamodb")),
            audit=MemoryAuditSink(),
        ),
        settings=None,  # type: ignore[arg-type]
        open_queue=open_queue,
    )
    function, out = RedriveFunction(runtime, after), io.StringIO()
    status = runbook.redrive(
        "test",
        client={"lambda": function}.__getitem__,
        request={"source": "sqs", **request},
        chunk=10,
        out=out,
    )
    return status, out.getvalue(), function


def test_the_runbook_redrives_in_chunks_with_progress(sqs: dict[str, Any]) -> None:
    park(sqs["client"], sqs["settings"], 25)
    status, output, function = runbook_redrive(sqs, queue=SOURCE, max_messages=1000)
    assert status == 0
    assert function.events[0][0] == "fabric-test-redrive"
    assert [e["max_messages"] for _, e in function.events] == [10, 10, 10]
    assert output.count("progress: moved") == 3
    assert "summary: moved 25, stopped: empty" in output
    assert len(received(sqs["client"], sqs["settings"].source_url)) == 25


def test_the_runbook_dry_run_lists_and_moves_nothing(sqs: dict[str, Any]) -> None:
    first, *_ = park(sqs["client"], sqs["settings"], 3)
    status, output, _ = runbook_redrive(sqs, queue=f"{SOURCE}-dlq", dry_run=True)
    assert status == 0
    assert "dry run on fabric-test-fallback-media-dlq: 3 of 3 match" in output
    assert f"{first}  media.story.published  max-receive-count" in output
    assert received(sqs["client"], sqs["settings"].source_url) == []


def test_the_runbook_reports_a_refused_request(sqs: dict[str, Any]) -> None:
    status, output, _ = runbook_redrive(sqs, queue="fabric-test-unknown")
    assert status == 2
    assert "not a redrivable SQS queue" in output


def test_a_letter_without_room_for_the_counter_can_be_redriven_again(sqs: dict[str, Any]) -> None:
    client, settings = sqs["client"], sqs["settings"]
    full = {f"a{i}": {"DataType": "String", "StringValue": str(i)} for i in range(9)}
    full[MESSAGE_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": "m-full"}
    client.send_message(QueueUrl=settings.dlq_url, MessageBody="{}", MessageAttributes=full)
    redriver = Redriver(
        ledger=DynamoDbRedriveLedger(TABLE, lambda: boto3.client("dynamodb")),
        audit=MemoryAuditSink(),
    )
    assert redriver.run(SqsDeadLetterQueue(settings, lambda: client)).moved == 1
    (back,) = received(client, settings.source_url)
    assert REDRIVES_ATTRIBUTE not in back["MessageAttributes"], "no room for the counter"
    # Dead-lettered again: the same attributes, so the same redrive count, as a new SQS message.
    client.send_message(
        QueueUrl=settings.dlq_url, MessageBody="{}", MessageAttributes=back["MessageAttributes"]
    )

    again = redriver.run(SqsDeadLetterQueue(settings, lambda: client))

    assert (again.moved, again.already_moved) == (1, 0), "moved again, not dropped as done"
    assert len(received(client, settings.source_url)) == 1


def test_the_runbook_chunks_move_each_message_once_when_the_source_keeps_failing_it(
    sqs: dict[str, Any],
) -> None:
    # The source's consumer still fails: SQS's redrive policy moves each message the redrive
    # put back to the DLQ again, with its message attributes. Before, the next chunk moved those
    # copies again (each chunk a redrive of its own), up to --max-messages moves, exit 0.
    client, settings = sqs["client"], sqs["settings"]
    park(client, settings, 25)
    arrived: Counter[str] = Counter()

    def still_failing() -> None:
        for message in received(client, settings.source_url):
            arrived[message["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]] += 1
            client.send_message(
                QueueUrl=settings.dlq_url,
                MessageBody=message["Body"],
                MessageAttributes=message["MessageAttributes"],
            )
            client.delete_message(
                QueueUrl=settings.source_url, ReceiptHandle=message["ReceiptHandle"]
            )

    status, output, function = runbook_redrive(
        sqs, after=still_failing, queue=SOURCE, max_messages=60
    )

    assert status == 1
    assert sorted(arrived.values()) == [1] * 25, "each message moved once"
    assert [e["max_messages"] for _, e in function.events] == [10, 10, 10]
    assert "20 letter(s) were parked again while this redrive ran" in output
    assert "summary: moved 25, stopped: parked again" in output
    (redrive_id,) = {e["redrive_id"] for _, e in function.events}
    parked = received(client, settings.dlq_url)
    assert len(parked) == 25
    assert {m["MessageAttributes"][REDRIVE_ID_ATTRIBUTE]["StringValue"] for m in parked} == {
        redrive_id
    }


def test_the_redrives_mark_goes_before_the_counter_where_one_attribute_is_left(
    sqs: dict[str, Any],
) -> None:
    client, settings = sqs["client"], sqs["settings"]
    own = {f"a{i}": {"DataType": "String", "StringValue": str(i)} for i in range(8)}
    own[MESSAGE_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": "m-nine"}
    client.send_message(QueueUrl=settings.dlq_url, MessageBody="{}", MessageAttributes=own)
    redriver = Redriver(
        ledger=DynamoDbRedriveLedger(TABLE, lambda: boto3.client("dynamodb")),
        audit=MemoryAuditSink(),
    )

    report = redriver.run(
        SqsDeadLetterQueue(settings, lambda: client), RedrivePlan(redrive_id="r9")
    )

    assert report.moved == 1
    (back,) = received(client, settings.source_url)
    assert back["MessageAttributes"] == {
        **own,
        REDRIVE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": "r9"},
    }
