"""A RabbitMQ redrive whose connections are lost as the broker confirms the letter it put back
(the real local RabbitMQ behind a fault-injecting proxy, the redrive function wired as deployed:
moto for its secret and ledger, its audit records on the broker).

The broker stored the letter; its confirm never reached the run. The letter is in doubt: the run
counts it not moved and stops ``origin unavailable``, and it stays in the DLQ without a record
(docs/dead-letters.md, "Exactly once at the destination"). The next run puts it back again, with
its record: a duplicate with one message id, never a loss.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric import topology
from fabric.redrive import RedrivePlan
from fabric.stakeholders import Stakeholder
from tests.integration.conftest import AMQP
from tests.integration.faults import BASIC_ACK, FaultProxy, is_method
from tests.integration.queue_waits import settled_depth, settled_empty
from tests.integration.test_overflow_redrive import (
    deployed_redrive,
    moto_aws,  # noqa: F401 (a fixture)
)
from tests.integration.test_redrive_parked_again_on_rabbitmq import (
    amqp,  # noqa: F401 (a fixture)
    park,
    redriven_ids,
)
from tests.message_ids import msg_id

pytestmark = pytest.mark.integration

GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    proxy = FaultProxy(AMQP)
    yield proxy
    proxy.close()


def copies(channel: Any, queue: str) -> list[str]:
    """The message ids of what ``queue`` holds (taken off it)."""
    ids = []
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        ids.append(got[1].message_id)
    return ids


def test_a_letter_whose_confirm_is_lost_with_the_connection_is_not_moved_and_the_run_stops(
    broker_vhost: str,
    amqp: Any,  # noqa: F811
    proxy: FaultProxy,
    moto_aws: None,  # noqa: F811
) -> None:
    message_id = msg_id("in-doubt")
    park(amqp, message_id, at=int(time.time()) - 3600)
    runtime = deployed_redrive(broker_vhost, proxy.port)
    # The broker's confirm of the republish: every connection of the run is cut before it.
    proxy.cut_before(is_method(BASIC_ACK), to_client=True)

    first = runtime.redriver.run(runtime.queue("rabbitmq", DLQ), RedrivePlan(redrive_id="cmd-1"))

    # Before: the letter was published once more on a new connection and confirmed there:
    # moved 1, "empty", its one "redriven" record, and two copies in the work queue.
    assert (first.moved, first.stopped) == (0, "origin unavailable")
    assert settled_depth(amqp, WORK, 1) == 1  # stored, in doubt
    assert copies(amqp, WORK) == [message_id]
    assert settled_depth(amqp, DLQ, 1) == 1  # still in the DLQ, for the next run
    assert redriven_ids(amqp) == {}

    # The next run puts it back again, with its record: a duplicate, never a loss.
    second = runtime.redriver.run(runtime.queue("rabbitmq", DLQ), RedrivePlan(redrive_id="cmd-2"))

    assert (second.moved, second.stopped) == (1, "empty")
    assert settled_depth(amqp, WORK, 1) == 1
    assert copies(amqp, WORK) == [message_id]
    settled_empty(amqp, DLQ)
    assert redriven_ids(amqp) == {message_id: 1}
