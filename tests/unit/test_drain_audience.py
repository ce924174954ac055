"""The drain does not trust the SNS subscriptions: a copy whose ``audience`` does not name the
queue's group (a subscription that lost or changed its filter hands a group every group's
fallback messages) is not moved into that group's work queue, nor deleted from SQS."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import pytest

from fabric import metrics as metric_names
from fabric.adapters.memory import (
    MemoryAuditSink,
    MemoryFallbackSource,
    MemoryMetrics,
    MemoryTransport,
)
from fabric.adapters.sns import (
    AUDIENCE_ATTRIBUTE,
    HEADERS_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    TOPIC_ATTRIBUTE,
)
from fabric.adapters.sqs import _received
from fabric.audit import AuditEvent, sha256_hex
from fabric.drain import (
    FALLBACK_MAX_RECEIVES,
    Drainer,
    FallbackQueue,
)
from fabric.ports import Received
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name
from tests.conftest import load_handler
from tests.unit.test_drain_handler import ENVIRONMENT
from tests.unit.test_drain_looks import Clock, TimedBroker

MEDIA = FallbackQueue(
    url="https://sqs.ap-southeast-3.amazonaws.com/111111111111/fabric-test-fallback-media",
    group=Stakeholder.MEDIA,
    emergency=False,
    max_receives=FALLBACK_MAX_RECEIVES,
)
MEDIA_SUB_DLQ = FallbackQueue(url=f"{MEDIA.url}-sub-dlq", group=Stakeholder.MEDIA, emergency=False)
MEDIA_WORK = queue_name(Stakeholder.MEDIA)
CHILD = "Siti Rahayu, 7, Jalan Melati 12"  # stands for child data


def body_of(message_id: str) -> bytes:
    return json.dumps(
        {"message_id": message_id, "topic": "donation.received", "payload": {"name": CHILD}}
    ).encode()


def copy(
    audience: Sequence[str] | None, *, receives: int = 1, unreadable: bool = False
) -> Received:
    """A copy as the SQS adapter reads it, published for ``audience`` (None: no attribute)."""
    message_id = str(uuid.uuid4())
    return Received(
        f"handle-{uuid.uuid4()}",
        body_of(message_id),
        message_id,
        "donation.received",
        receives=receives,
        audience=None if audience is None else frozenset(audience),
        audience_unreadable=unreadable,
    )


def sqs_message(attributes: dict[str, Any], *, notification: bool = False) -> dict[str, Any]:
    """An SQS message as SNS delivered it raw, or inside its JSON notification (a subscription
    DLQ's form)."""
    message_id = str(uuid.uuid4())
    attributes = {MESSAGE_ID_ATTRIBUTE: message_id, TOPIC_ATTRIBUTE: "donation.received"} | (
        attributes
    )
    if notification:
        body = json.dumps(
            {
                "Type": "Notification",
                "Message": body_of(message_id).decode(),
                "MessageAttributes": {
                    name: value
                    if isinstance(value, dict | list | int)
                    else {"Type": "String", "Value": value}
                    for name, value in attributes.items()
                },
            }
        )
        sqs_attributes: dict[str, Any] = {}
    else:
        body = body_of(message_id).decode()
        sqs_attributes = {
            name: value
            if isinstance(value, dict)
            else {"DataType": "String.Array", "StringValue": value}
            for name, value in attributes.items()
        }
    return {
        "MessageId": str(uuid.uuid4()),
        "ReceiptHandle": "h",
        "Body": body,
        "MessageAttributes": sqs_attributes,
        "Attributes": {"ApproximateReceiveCount": "1"},
    }


# -- the SQS adapter reads the audience strictly ----------------------------------------------


@pytest.mark.parametrize("notification", [False, True])
def test_the_audience_the_router_sets_is_read_in_either_form(notification: bool) -> None:
    item = _received(
        sqs_message({AUDIENCE_ATTRIBUTE: '["academic","media"]'}, notification=notification)
    )
    assert (item.audience, item.audience_unreadable) == (frozenset({"academic", "media"}), False)


@pytest.mark.parametrize("notification", [False, True])
def test_a_copy_without_an_audience_attribute_is_read_as_having_none(notification: bool) -> None:
    item = _received(sqs_message({}, notification=notification))
    assert (item.audience, item.audience_unreadable) == (None, False)


@pytest.mark.parametrize(
    "value",
    [
        "media",  # not JSON
        '"media"',  # JSON, not a list
        '{"media": true}',
        '["media", 1]',  # not only strings
        '[["media"]]',
        "[" * 100_000 + "]" * 100_000,  # nested too deeply to parse
        "",
    ],
)
@pytest.mark.parametrize("notification", [False, True])
def test_an_audience_that_is_no_list_of_names_is_unreadable_not_guessed(
    value: str, notification: bool
) -> None:
    item = _received(sqs_message({AUDIENCE_ATTRIBUTE: value}, notification=notification))
    assert (item.audience, item.audience_unreadable) == (None, True)


@pytest.mark.parametrize(
    ("attribute", "notification"),
    [
        ({"DataType": "Binary", "BinaryValue": b'["media"]'}, False),  # no text value at all
        ({"Type": "String.Array", "Value": ["media"]}, True),  # a value that is no text
        (["media"], True),  # an attribute that is no {"Type", "Value"} object
        (7, True),
    ],
)
def test_an_audience_attribute_without_a_text_value_is_unreadable(
    attribute: Any, notification: bool
) -> None:
    item = _received(sqs_message({AUDIENCE_ATTRIBUTE: attribute}, notification=notification))
    assert (item.audience, item.audience_unreadable) == (None, True)


def test_the_other_attributes_are_read_as_before_beside_a_garbled_audience() -> None:
    message = sqs_message(
        {AUDIENCE_ATTRIBUTE: ["media"], HEADERS_ATTRIBUTE: '{"k": "v"}'}, notification=True
    )
    item = _received(message)
    assert (item.topic, dict(item.headers), item.audience_unreadable) == (
        "donation.received",
        {"k": "v"},
        True,
    )


# -- the drain moves only what was published for the queue's group ----------------------------


def drained(
    queue: FallbackQueue, *items: Received, metrics: MemoryMetrics | None = None
) -> tuple[Any, MemoryFallbackSource, MemoryTransport, MemoryAuditSink]:
    source, broker, audit = MemoryFallbackSource(), MemoryTransport(), MemoryAuditSink()
    source.send(queue.url, *items)
    report = Drainer(
        queues=[queue], source=source, broker=broker, audit=audit, metrics=metrics
    ).drain()
    return report, source, broker, audit


def test_a_copy_published_for_other_groups_is_neither_moved_nor_deleted() -> None:
    # A media subscription without its filter: academic's message reached media's queue too.
    own, shared, foreign = copy(["media"]), copy(["academic", "media"]), copy(["academic"])

    report, source, broker, audit = drained(MEDIA, own, foreign, shared)

    assert [(m.message_id, m.redeliver_to) for m in broker.published] == [
        (own.message_id, MEDIA_WORK),
        (shared.message_id, MEDIA_WORK),
    ]
    # Left in SQS (received, not deleted: it comes back, and reaches the queue's DLQ).
    assert list(source._hidden) == [foreign.handle]
    assert (report.moved, report.misdelivered, report.left, report.stopped) == (
        {MEDIA_WORK: 2},
        1,
        1,
        "empty",
    )
    assert report.refused == []  # the work queue took what it was given
    assert [(r.event, r.message_id) for r in audit.records] == [
        (AuditEvent.DRAINED, own.message_id),
        (AuditEvent.DRAINED, shared.message_id),
    ]
    assert sha256_hex(foreign.body) not in audit.bodies  # not archived as a move


def test_a_copy_with_an_unreadable_or_empty_audience_is_not_moved() -> None:
    garbled, empty = copy(None, unreadable=True), copy([])

    report, source, broker, _audit = drained(MEDIA, garbled, empty)

    assert broker.published == []
    assert set(source._hidden) == {garbled.handle, empty.handle}
    assert (report.total, report.misdelivered, report.left) == (0, 2, 2)


def test_a_copy_without_an_audience_attribute_is_moved_as_the_groups() -> None:
    # The router's transport sets one on every message and SNS and the redrive keep it: a copy
    # without one did not come from a subscription (a hand-made message, the existing fixtures).
    unlabelled = copy(None)

    report, _source, broker, _audit = drained(MEDIA, unlabelled)

    assert [m.message_id for m in broker.published] == [unlabelled.message_id]
    assert (report.total, report.misdelivered) == (1, 0)


def test_a_misdelivered_copy_is_logged_at_error_without_its_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    foreign = copy(["academic"])
    named_by_child = replace(copy(["academic"]), message_id=CHILD)

    with caplog.at_level(logging.INFO, logger="fabric.drain"):
        drained(MEDIA, foreign, named_by_child)

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert foreign.message_id in errors[0]
    assert "drain-misdelivered" in errors[0]
    assert MEDIA.url in errors[0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert CHILD not in logged
    assert sha256_hex(foreign.body) not in logged
    assert sha256_hex(named_by_child.body) not in logged


def test_at_its_last_receive_a_misdelivered_copy_is_audited_dead_lettered_without_a_hash() -> None:
    last = copy(["academic"], receives=FALLBACK_MAX_RECEIVES)
    garbled = copy(None, receives=FALLBACK_MAX_RECEIVES + 1, unreadable=True)
    earlier = copy(["academic"], receives=FALLBACK_MAX_RECEIVES - 1)  # comes back: no record

    report, _source, broker, audit = drained(MEDIA, last, garbled, earlier)

    assert broker.published == []
    assert report.misdelivered == 3
    first, second = (record.to_dict() for record in audit.records)
    assert first == {
        "event": "dead-lettered",
        "at": first["at"],
        "message_id": last.message_id,
        "source": "drain",
        "topic": "donation.received",
        "reason": "drain-misdelivered",
        "attempt": FALLBACK_MAX_RECEIVES,
        "groups": ["media"],
        "queues": ["fabric-test-fallback-media"],  # SQS parks it in its -dlq next
    }
    assert (second["message_id"], second["reason"]) == (
        garbled.message_id,
        "drain-audience-unreadable",
    )
    assert "body_sha256" not in second
    assert CHILD not in json.dumps([record.to_dict() for record in audit.records])
    assert audit.bodies == {}


def test_a_misdelivered_copy_in_a_subscription_dlq_is_audited_at_its_first_receive() -> None:
    # A subscription's DLQ has no redrive policy: SQS keeps the copy up to 14 days, and no last
    # receive ever comes. Before, the trail never said where it was.
    first = copy(["academic"], receives=1)
    garbled = copy(None, receives=1, unreadable=True)
    again = copy(["academic"], receives=2)  # audited at its first receive, in an earlier run
    unknown = copy(["academic"], receives=0)  # a source that does not count receives

    report, source, broker, audit = drained(MEDIA_SUB_DLQ, first, garbled, again, unknown)

    assert broker.published == []
    assert len(source._hidden) == 4  # all left in the DLQ
    assert report.misdelivered == 4
    one, two = (record.to_dict() for record in audit.records)
    assert one == {
        "event": "dead-lettered",
        "at": one["at"],
        "message_id": first.message_id,
        "source": "drain",
        "topic": "donation.received",
        "reason": "drain-misdelivered",
        "attempt": 1,
        "groups": ["media"],
        "queues": ["fabric-test-fallback-media-sub-dlq"],  # where it stays
    }
    assert (two["message_id"], two["reason"], two["attempt"]) == (
        garbled.message_id,
        "drain-audience-unreadable",
        1,
    )
    assert "body_sha256" not in two
    assert CHILD not in json.dumps([record.to_dict() for record in audit.records])
    assert audit.bodies == {}


def test_every_run_counts_its_misdelivered_copies_in_a_metric() -> None:
    metrics = MemoryMetrics()

    drained(MEDIA, copy(["media"]), copy(["academic"]), copy(["business"]), metrics=metrics)
    drained(MEDIA, copy(["media"]), metrics=metrics)

    assert metrics.calls == 2
    assert (
        metrics.totals[metric_names.DRAIN_MISDELIVERED] == 2
    )  # the second run wrote 0: no missing data
    assert metrics.totals["Drained"] == 2


def test_the_drain_function_answers_how_many_copies_were_misdelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    handler: ModuleType = load_handler("drain", monkeypatch)
    source = MemoryFallbackSource()
    source.send(MEDIA.url, copy(["media"]), copy(["academic"]))
    monkeypatch.setattr(
        handler,
        "DRAINER",
        Drainer(queues=[MEDIA], source=source, broker=MemoryTransport(), audit=MemoryAuditSink()),
    )

    answer = handler.handler({}, None)

    assert answer == {
        "moved": {MEDIA_WORK: 1},
        "total": 1,
        "left": 1,  # the runbook's "received and not moved", and its exit status 1
        "stopped": "empty",
        "refused": [],
        "misdelivered": 1,
    }
    # A run that met none answers as before.
    assert "misdelivered" not in handler.handler({}, None)


# -- a copy that comes back neither ends a queue's turn nor hides what waits behind it -----------


@dataclass
class Copy:
    """A copy in a ``SqsLikeSource`` queue: as last received, and when it is visible again."""

    item: Received
    visible_at: float = 0.0


@dataclass
class SqsLikeSource:
    """SQS queues on a fake clock. A copy received and not deleted is hidden for
    ``visibility`` seconds, then visible again (where it was in line, or with ``to_back`` at
    the back), with a new receipt handle and one receive more (``Received.receives``, SQS's
    ApproximateReceiveCount). With ``max_receives`` (SQS's redrive policy), a copy received
    that many times goes to ``<queue>-dlq`` at the next receive that meets it. A receive takes
    ``receive_seconds``; one that waits and finds nothing, a second more (the long poll)."""

    clock: Clock
    visibility: float
    max_receives: int | None = None
    to_back: bool = False
    receive_seconds: float = 0.75
    queues: dict[str, list[Copy]] = field(default_factory=dict)
    receives: int = 0

    def send(self, queue: str, *items: Received) -> None:
        self.queues.setdefault(queue, []).extend(Copy(item) for item in items)

    def ids(self, queue: str) -> list[str]:
        return [entry.item.message_id for entry in self.queues.get(queue, [])]

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        self.receives += 1
        self.clock.advance(self.receive_seconds)
        line = self.queues.setdefault(queue, [])
        taken: list[Copy] = []
        for entry in list(line):
            if len(taken) == min(limit, 10):
                break
            if entry.visible_at > self.clock.now:
                continue
            if self.max_receives is not None and entry.item.receives >= self.max_receives:
                line.remove(entry)
                self.queues.setdefault(f"{queue}-dlq", []).append(entry)
                continue
            entry.item = replace(
                entry.item, handle=f"handle-{uuid.uuid4()}", receives=entry.item.receives + 1
            )
            entry.visible_at = self.clock.now + self.visibility
            taken.append(entry)
        if self.to_back:
            line[:] = [entry for entry in line if entry not in taken] + taken
        if not taken and wait:
            self.clock.advance(1.0)
        return [entry.item for entry in taken]

    def delete(self, queue: str, handles: Sequence[str]) -> set[str]:
        line = self.queues.get(queue, [])
        deleted = {entry.item.handle for entry in line if entry.item.handle in handles}
        line[:] = [entry for entry in line if entry.item.handle not in deleted]
        return deleted


def moved_ids(broker: TimedBroker) -> list[str]:
    return [m.message_id for m in broker.inner.published]


@pytest.mark.parametrize(
    ("own_count", "stopped"),
    [
        (2000, "empty"),  # all of the group's own move within the run
        (3000, "time limit"),  # the reviewer's case: more than a run can move
    ],
)
def test_copies_back_after_their_visibility_timeout_do_not_end_the_queues_turn(
    own_count: int, stopped: str
) -> None:
    # As deployed: a visibility timeout of 120 s, runs of up to 240 s, a batch of ten in about a
    # second. Before, the 40 foreign copies were back in front at 120 s, filled three batches
    # in a row, and the run left media's queue "empty" with more than a thousand of its own
    # messages waiting behind them until the next run.
    clock = Clock()
    source = SqsLikeSource(clock, visibility=120, max_receives=FALLBACK_MAX_RECEIVES)
    broker, audit = TimedBroker(clock), MemoryAuditSink()
    foreign = [copy(["academic"], receives=0) for _ in range(40)]
    own = [copy(["media"], receives=0) for _ in range(own_count)]
    source.send(MEDIA.url, *foreign, *own)

    report = Drainer(
        queues=[MEDIA], source=source, broker=broker, audit=audit, clock=clock, max_seconds=240
    ).drain()

    assert report.stopped == stopped
    own_ids = {m.message_id for m in own}
    assert set(moved_ids(broker)) <= own_ids  # nothing of academic's
    assert report.total == len(moved_ids(broker))
    if stopped == "empty":
        assert sorted(moved_ids(broker)) == sorted(own_ids)
    else:
        assert clock.now >= 240  # it used its whole run on the backlog
        assert report.total > own_count / 2
    assert set(source.ids(MEDIA.url)) == {m.message_id for m in foreign} | (
        own_ids - set(moved_ids(broker))
    )
    # Met twice (at the start, and back after 120 s): counted once each.
    assert (report.misdelivered, report.left) == (40, 40)
    assert [r.event for r in audit.records if r.event is not AuditEvent.DRAINED] == []


@pytest.mark.parametrize("to_back", [False, True])
@pytest.mark.parametrize("foreign_count", [3, 14])
def test_copies_back_at_every_receive_hold_back_none_of_the_groups_own(
    foreign_count: int, to_back: bool
) -> None:
    # A subscription's DLQ (no redrive policy) whose copies came back at every receive: the
    # drain goes on past them to the group's own, and only its time limit ends the run, having
    # moved nothing of another group's.
    clock = Clock()
    source = SqsLikeSource(clock, visibility=0, to_back=to_back)
    broker, audit = TimedBroker(clock), MemoryAuditSink()
    foreign = [copy(["academic"], receives=0) for _ in range(foreign_count)]
    own = [copy(["media"], receives=0) for _ in range(25)]
    source.send(MEDIA_SUB_DLQ.url, *foreign[:3], *own, *foreign[3:])
    drainer = Drainer(
        queues=[MEDIA_SUB_DLQ], source=source, broker=broker, audit=audit, clock=clock
    )

    report = drainer.drain(max_seconds=30)

    assert report.stopped == "time limit"
    assert sorted(moved_ids(broker)) == sorted(m.message_id for m in own)
    assert sorted(source.ids(MEDIA_SUB_DLQ.url)) == sorted(m.message_id for m in foreign)
    assert source.receives > 25  # it went round past them until its time limit
    # Each counted once, however often it came back (in line where it was, ten of them fill
    # every batch once the group's own are gone, and the four behind them are not met).
    met = 10 if not to_back and foreign_count > 10 else foreign_count
    assert (report.misdelivered, report.left) == (met, met)
    # Audited once each, at its first receive, however often it came back.
    dead = [r for r in audit.records if r.event is AuditEvent.DEAD_LETTERED]
    assert len(dead) == len({r.message_id for r in dead}) == report.misdelivered
    assert {r.message_id for r in dead} <= {m.message_id for m in foreign}
    assert {(r.attempt, r.queues) for r in dead} == {(1, ("fabric-test-fallback-media-sub-dlq",))}


def test_copies_back_at_every_receive_go_to_the_dlq_and_the_groups_own_then_move() -> None:
    # Visibility 0 and fourteen foreign copies in front: ten fill every batch until SQS's
    # redrive policy takes them to media's DLQ after their receives; the rest then move.
    clock = Clock()
    source = SqsLikeSource(clock, visibility=0, max_receives=FALLBACK_MAX_RECEIVES)
    broker, audit = TimedBroker(clock), MemoryAuditSink()
    foreign = [copy(["academic"], receives=0) for _ in range(14)]
    own = [copy(["media"], receives=0) for _ in range(25)]
    source.send(MEDIA.url, *foreign, *own)

    report = Drainer(
        queues=[MEDIA], source=source, broker=broker, audit=audit, clock=clock, max_seconds=240
    ).drain()

    assert report.stopped == "empty"
    assert sorted(moved_ids(broker)) == sorted(m.message_id for m in own)
    assert source.ids(MEDIA.url) == []
    assert source.ids(f"{MEDIA.url}-dlq") == [m.message_id for m in foreign]
    assert (report.misdelivered, report.left) == (14, 14)
    dead = [r for r in audit.records if r.event is AuditEvent.DEAD_LETTERED]
    assert [(r.message_id, r.attempt, r.queues) for r in dead] == [
        (m.message_id, FALLBACK_MAX_RECEIVES, ("fabric-test-fallback-media",)) for m in foreign
    ]


def test_copies_not_for_a_group_that_keep_coming_back_hold_no_other_groups_bulk_back() -> None:
    # A pile of copies not for media in media's subscription DLQ (back at every receive:
    # nothing moves them on), ahead of government's one donation. Drained one bulk queue after
    # the other, the run spent its whole time limit on media's and government's waited for a
    # run that never came.
    clock = Clock()
    source = SqsLikeSource(clock, visibility=0)
    broker, audit = TimedBroker(clock), MemoryAuditSink()
    government = FallbackQueue(
        url="fallback-government", group=Stakeholder.GOVERNMENT, emergency=False
    )
    foreign = [copy(["academic"], receives=0) for _ in range(10)]  # a whole batch each time
    (own,) = [copy(["government"], receives=0)]
    source.send(MEDIA_SUB_DLQ.url, *foreign)
    source.send(government.url, own)

    report = Drainer(
        queues=[MEDIA_SUB_DLQ, government], source=source, broker=broker, audit=audit, clock=clock
    ).drain(max_seconds=30)

    assert report.stopped == "time limit"
    assert moved_ids(broker) == [own.message_id]
    assert report.moved == {queue_name(Stakeholder.GOVERNMENT): 1}
    assert report.misdelivered == 10


def test_an_emergency_is_looked_for_between_the_empty_receives_that_end_the_bulk() -> None:
    # Every group's bulk queue ran out in the same turn: their last receives, each waiting a
    # second on an empty queue, came back to back, and a review found no look for emergencies
    # between them: one arriving then waited about ten seconds, or for the next run.
    clock = Clock()
    source = SqsLikeSource(clock, visibility=120)
    broker, audit = TimedBroker(clock), MemoryAuditSink()
    emergency = FallbackQueue(
        url="emergency-government", group=Stakeholder.GOVERNMENT, emergency=True
    )
    bulk = [
        FallbackQueue(url=f"fallback-{group.value}{dlq}", group=group, emergency=False)
        for group in Stakeholder
        for dlq in ("", "-sub-dlq")
    ]
    for queue in bulk:
        source.send(queue.url, *(copy([queue.group.value], receives=0) for _ in range(10)))
    alert = copy(["government"], receives=0)
    # After the first turn (one batch from each queue, about 20 s here), as the empty
    # receives begin.
    arrival = 22.0
    clock.at(arrival, lambda: source.send(emergency.url, alert))

    Drainer(
        queues=[emergency, *bulk], source=source, broker=broker, audit=audit, clock=clock
    ).drain()

    assert alert.message_id in broker.at, "the emergency waited for the next run"
    assert broker.at[alert.message_id] - arrival < 3.5  # a look a second, a receive between
