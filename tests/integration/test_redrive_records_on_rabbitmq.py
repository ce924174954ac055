"""A group's user parks a message with free text in its id, type and reason header in its own
DLQ (through its retry exchange, which the topology lets it publish to); the redrive function,
wired as deployed, puts it back as it is, and its ``redriven`` record on the broker's audit
exchange holds none of that text (the real local RabbitMQ, moto for the secret and ledger)."""

from __future__ import annotations

import pika
import pytest

from fabric import topology
from fabric.audit import decode_audit_batch
from fabric.redrive import RedrivePlan
from fabric.stakeholders import Stakeholder
from tests.integration.conftest import GUEST
from tests.integration.queue_waits import settled_depth, settled_empty
from tests.integration.test_audit_review import media_user  # noqa: F401 (a fixture)
from tests.integration.test_overflow_redrive import (
    connect,
    deployed_redrive,
    moto_aws,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.integration

GROUP = Stakeholder.MEDIA
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
CHILD = "Jane Doe"  # stands for child data: it must reach no audit record
MESSAGE_ID = f"{CHILD} lives at 12 Jalan Melati, Bogor"
TYPE = f"{CHILD}'s case note"
REASON = f"{CHILD} was hit by her father"
BODY = b'{"note": "the trail keeps a body only as its SHA-256"}'


def test_a_letter_a_group_parked_with_free_text_goes_back_and_its_record_holds_none_of_it(
    vhost: str,
    media_user: tuple[str, str],  # noqa: F811
    moto_aws: None,  # noqa: F811
) -> None:
    group = connect(vhost, media_user)
    group.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        BODY,
        pika.BasicProperties(
            message_id=MESSAGE_ID,
            type=TYPE,
            delivery_mode=2,
            headers={"fabric-audience": "all", topology.DEAD_LETTER_REASON_HEADER: REASON},
        ),
        mandatory=True,
    )
    group.connection.close()
    runtime = deployed_redrive(vhost)
    platform = connect(vhost, GUEST)

    # The operator's dry run shows the letter as it is, to find and judge it by.
    dry = runtime.redriver.run(runtime.queue("rabbitmq", DLQ), RedrivePlan(dry_run=True))
    assert [(i.message_id, i.topic, i.reason) for i in dry.listed] == [(MESSAGE_ID, TYPE, REASON)]
    assert settled_depth(platform, DLQ, 1) == 1

    report = runtime.redriver.run(runtime.queue("rabbitmq", DLQ))

    assert (report.moved, report.stopped) == (1, "empty")
    settled_empty(platform, DLQ)  # moved, not copied
    method, properties, body = platform.basic_get(WORK, auto_ack=True)
    assert method is not None, "the letter is back in its work queue"
    assert (properties.message_id, properties.type, body) == (MESSAGE_ID, TYPE, BODY)
    method, properties, batch = platform.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
    assert method is not None
    assert properties.user_id == "guest"  # the platform's record, which the writer trusts
    (record,) = decode_audit_batch(batch).records
    assert (record["event"], record["message_id"], record.get("topic"), record["reason"]) == (
        "redriven",
        None,
        None,
        "unknown",
    )
    assert (record["transport"], record["queues"]) == (DLQ, [WORK])
    assert CHILD.encode() not in batch
    platform.connection.close()
