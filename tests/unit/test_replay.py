"""Replay on an in-memory archive: the trail verified first, selection, filters, dedupe, bad
bodies, dry run, pace, cursor.

The trail is what the router really emits (accepted records and the stored bytes, through an
in-memory audit sink), written into the in-memory bucket by the real audit writer: chained
audit objects under ``audit/``, archive objects under ``archive/``, signed checkpoints under
``checkpoints/``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pytest

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.adapters.compliance_memory import MemorySigner
from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.adapters.memory_archive import MemoryArchive
from fabric.adapters.memory_cipher import LocalCipher
from fabric.audit import AuditBatch, AuditEvent
from fabric.audit_chain import Chain, Keyring, encode_object
from fabric.audit_writer import AuditWriter, encode_archive
from fabric.envelope import format_timestamp
from fabric.ports import Failure
from fabric.replay import (
    ReplayCursor,
    Replayer,
    ReplayFilter,
    ReplayReport,
    ReplayRequest,
    parse_request,
)
from fabric.router import Router
from fabric.routing import RoutingTable, default_routing_table, parse_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import ALL_AUDIENCE, AUDIENCE_HEADER, REPLAY_HEADER
from tests.unit.test_compliance_run import MemoryChains

DAY = datetime(2026, 12, 1, tzinfo=UTC)
CANARY = "CANARY-Siti-Rahayu-born-2017"
REPLAY_ID = "replay-2026-12-03-incident-4711"


class Trail:
    """A writer's trail in a MemoryArchive (or moto's bucket through the S3 adapter), fed by
    a real router, written by the real audit writer (``seal`` makes a signed checkpoint)."""

    def __init__(
        self,
        writer: str = "fabric-test-audit-writer",
        *,
        archive: MemoryArchive | S3ObjectStore | None = None,
        signer: MemorySigner | None = None,
    ) -> None:
        self.archive = archive or MemoryArchive()
        self.writer = writer
        self.signer = signer or MemorySigner()
        self.cipher = LocalCipher()
        self.clock = DAY
        self.chains = MemoryChains()
        self.audit_writer = AuditWriter(
            writer,
            chains=self.chains,
            objects=self.archive,
            signer=self.signer,
            now=lambda: self.clock,
        )

    def route(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        source: str,
        at: datetime,
        written: datetime | None = None,
        archive: bool = True,
        seal: bool = True,
    ) -> list[dict[str, Any]]:
        """Route ``messages`` at ``at`` and write the call's records (and, if ``archive``,
        bodies) as one object on the day of ``written`` (default: ``at``), sealed by a
        checkpoint at once unless ``seal`` is false."""
        sink = self.recorded(messages, source=source, at=at)
        records = [record.to_dict() for record in sink.records]
        if not archive:
            for record in records:
                if record["event"] == "accepted":
                    record["archived"] = False
        self.write(records, sink.bodies if archive else {}, written or at)
        if seal:
            self.seal(written or at)
        return records

    def recorded(
        self, messages: Sequence[dict[str, Any]], *, source: str, at: datetime
    ) -> MemoryAuditSink:
        """What a real router records for ``messages`` at ``at`` (its audit records and stored
        bodies), nothing written yet."""
        sink = MemoryAuditSink()
        router = Router(
            table=default_routing_table(),
            transports=[MemoryTransport()],
            cipher=self.cipher,
            audit=sink,
            environment="test",
            clock=lambda: at,
        )
        router.route(list(messages), source=source)
        return sink

    def write(
        self, records: list[dict[str, Any]], bodies: Mapping[str, bytes], written: datetime
    ) -> str:
        """One writer call at ``written``: the audit object's key."""
        self.clock = written
        batch = AuditBatch([{**r, "emitted_by": "router"} for r in records], dict(bodies))
        key = self.audit_writer.write([(str(uuid.uuid4()), batch)]).key
        assert key is not None
        return key

    def seal(self, at: datetime) -> str:
        """A signed checkpoint at ``at`` of what was written since the last one."""
        self.clock = at
        return self.audit_writer.checkpoint()


def donation(n: int, **overrides: object) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": str(uuid.UUID(int=n + 1)),
        "topic": "donation.received",
        "classification": "internal",
        "payload": {"amount": n},
    }
    message.update(overrides)
    return message


def incident(n: int) -> dict[str, Any]:
    return {
        "message_id": str(uuid.UUID(int=1000 + n)),
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"child": CANARY},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def replayer(
    trail: Trail,
    *,
    broker: MemoryTransport | None = None,
    audit: MemoryAuditSink | None = None,
    clock: Clock | None = None,
    writers: Sequence[str] | None = None,
    table: RoutingTable | None = None,
) -> tuple[Replayer, MemoryTransport, MemoryAuditSink]:
    broker = broker or MemoryTransport(name="rabbitmq")
    audit = audit or MemoryAuditSink()
    clock = clock or Clock()
    return (
        Replayer(
            archive=trail.archive,
            writers=writers or (trail.writer,),
            keys=Keyring([trail.signer]),
            broker=broker,
            audit=audit,
            table=table or default_routing_table(),
            clock=clock,
            sleep=clock.sleep,
            now=lambda: DAY + timedelta(days=2),
        ),
        broker,
        audit,
    )


def request(**overrides: Any) -> ReplayRequest:
    fields: dict[str, Any] = {
        "start": DAY,
        "end": DAY + timedelta(days=1),
        "replay_id": REPLAY_ID,
    }
    fields.update(overrides)
    return ReplayRequest(**fields)


def ids(report: ReplayReport) -> list[str]:
    return [item.message_id for item in report.messages]


def test_the_stored_bytes_go_out_again_with_the_same_id_and_the_replay_header() -> None:
    trail = Trail()
    large = donation(1, headers={"amount-band": "large"})
    trail.route([large], source="community", at=DAY + timedelta(hours=3))
    run, broker, audit = replayer(trail)
    report = run.run(request())

    assert (report.selected, report.replayed, report.stopped) == (1, 1, "done")
    (sent,) = broker.published
    (archived,) = [v for k, v in trail.archive.objects.items() if k.startswith("archive/")]
    (line,) = archived.splitlines()
    assert sent.message_id == str(uuid.UUID(int=2))
    assert sent.body == base64.b64decode(json.loads(line)["body"])
    assert sent.headers[REPLAY_HEADER] == REPLAY_ID
    assert sent.headers[AUDIENCE_HEADER] == ALL_AUDIENCE
    assert sent.headers["amount-band"] == "large"
    # Routed as the router routes it today: a large donation also goes to government.
    assert sent.audience == {Stakeholder.BUSINESS, Stakeholder.COMMUNITY, Stakeholder.GOVERNMENT}
    assert sent.redeliver_to is None
    (record,) = audit.records
    assert record.event is AuditEvent.REPLAYED
    assert (record.message_id, record.replay_id, record.transport) == (
        sent.message_id,
        REPLAY_ID,
        "rabbitmq",
    )
    assert record.body_sha256 == hashlib.sha256(sent.body).hexdigest()
    assert record.groups == ("business", "community", "government")


def test_what_todays_routing_table_would_refuse_is_reported_refused_and_not_published() -> None:
    # Since the donations were stored, community lost the right to publish them: the router
    # would refuse them today, and so does a replay.
    trail = Trail()
    trail.route([donation(1), donation(2)], source="community", at=DAY + timedelta(hours=3))
    data = tomllib.loads(resources.files("fabric").joinpath("routing_table.toml").read_text())
    for rule in data["publish"]:
        if rule["source"] == "community":
            rule["topics"] = [t for t in rule["topics"] if not t.startswith("donation")]
    revoked = parse_routing_table(data)  # its own table: tables keep per-table caches
    run, broker, audit = replayer(trail, table=revoked)

    report = run.run(request())

    assert (report.selected, report.replayed, report.refused) == (2, 0, 2)
    assert {item.outcome for item in report.problems} == {"refused"}
    assert all(item.detail.startswith("source_not_allowed") for item in report.problems)
    assert broker.published == []
    assert audit.records == []


def test_a_restricted_message_is_replayed_as_the_ciphertext_it_was_stored_as() -> None:
    trail = Trail()
    (accepted, *_) = trail.route([incident(1)], source="community", at=DAY + timedelta(hours=1))
    run, broker, audit = replayer(trail)
    run.run(request())

    (sent,) = broker.published
    assert hashlib.sha256(sent.body).hexdigest() == accepted["body_sha256"]
    assert CANARY.encode() not in sent.body
    assert sent.emergency is True
    (record,) = audit.records
    assert record.encrypted is True
    assert record.classification == "restricted"


def test_only_acceptances_inside_the_period_are_selected_end_exclusive() -> None:
    trail = Trail()
    trail.route([donation(0)], source="community", at=DAY - timedelta(microseconds=1))
    trail.route([donation(1)], source="community", at=DAY)
    trail.route([donation(4, topic="NOT A TOPIC")], source="community", at=DAY + timedelta(hours=2))
    trail.route([donation(2)], source="community", at=DAY + timedelta(hours=23, minutes=59))
    trail.route([donation(3)], source="community", at=DAY + timedelta(days=1))
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert ids(report) == [str(uuid.UUID(int=2)), str(uuid.UUID(int=3))]
    assert [m.message_id for m in broker.published] == ids(report)


def test_records_written_up_to_late_days_after_the_end_are_found() -> None:
    # Both were accepted in the period's last second; one reached the writer minutes later, the
    # other a day later (its batch waited on the audit queue). Each was sealed two hours after.
    trail = Trail()
    late = DAY + timedelta(hours=23, minutes=59, seconds=59)
    for n, written in ((1, DAY + timedelta(days=1, seconds=30)), (2, DAY + timedelta(days=2))):
        trail.route([donation(n)], source="community", at=late, written=written)
        trail.seal(written + timedelta(hours=2))
    run, _, _ = replayer(trail)

    assert ids(run.run(request(late_days=0))) == [str(uuid.UUID(int=2))]
    assert ids(run.run(request())) == [str(uuid.UUID(int=2)), str(uuid.UUID(int=3))]


def test_topic_patterns_source_and_message_ids_narrow_the_selection() -> None:
    trail = Trail()
    at = DAY + timedelta(hours=5)
    trail.route([donation(1), donation(2, topic="donation.pledged")], source="community", at=at)
    trail.route([donation(3, topic="volunteer.match.made")], source="business", at=at)
    trail.route([incident(4)], source="community", at=at)
    run, _, _ = replayer(trail)

    def chosen(selection: ReplayFilter) -> set[str]:
        return set(ids(run.run(request(selection=selection))))

    one, two, three, four = (str(uuid.UUID(int=n)) for n in (2, 3, 4, 1004))
    assert chosen(ReplayFilter(topics=("donation.*",))) == {one, two}
    assert chosen(ReplayFilter(topics=("donation.received", "volunteer.#"))) == {one, three}
    assert chosen(ReplayFilter(topics=("child-safety.*",))) == set()  # * is one word
    assert chosen(ReplayFilter(topics=("#.reported",))) == {four}
    assert chosen(ReplayFilter(source="business")) == {three}
    assert chosen(ReplayFilter(message_ids=frozenset({two, four}))) == {two, four}
    assert chosen(ReplayFilter(topics=("donation.#",), source="business")) == set()


def test_a_message_accepted_twice_is_replayed_once_from_its_first_acceptance() -> None:
    trail = Trail()
    trail.route([donation(1, payload="first")], source="community", at=DAY + timedelta(hours=9))
    trail.route([donation(1, payload="again")], source="community", at=DAY + timedelta(hours=1))
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.selected, report.replayed) == (1, 1)
    (sent,) = broker.published
    assert json.loads(sent.body)["payload"] == "again"  # the earlier one in time


def test_a_body_that_does_not_match_its_hash_is_reported_corrupt_and_not_published() -> None:
    trail = Trail()
    trail.route([donation(1), donation(2)], source="community", at=DAY + timedelta(hours=1))
    (key,) = [k for k in trail.archive.objects if k.startswith("archive/")]
    lines = trail.archive.objects[key].splitlines()
    entry = json.loads(lines[0])
    tampered = base64.b64decode(entry["body"]).replace(b'"amount"', b'"amounT"')
    entry["body"] = base64.b64encode(tampered).decode()
    lines[0] = json.dumps(entry).encode()
    trail.archive.put(key, b"\n".join(lines) + b"\n")
    run, broker, audit = replayer(trail)
    report = run.run(request())

    assert (report.replayed, report.corrupt, report.stopped) == (1, 1, "done")
    (problem,) = report.problems
    assert problem.outcome == "corrupt"
    assert "SHA-256" in (problem.detail or "")
    assert [m.message_id for m in broker.published] == [
        m for m in ids(report) if m != problem.message_id
    ]
    assert len(audit.records) == 1


def test_a_body_that_was_not_archived_is_reported_missing_never_skipped_silently() -> None:
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1), archive=False)
    trail.route([donation(2)], source="community", at=DAY + timedelta(hours=2))
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.selected, report.replayed, report.missing_body) == (2, 1, 1)
    (problem,) = report.problems
    assert (problem.message_id, problem.outcome) == (str(uuid.UUID(int=2)), "missing-body")
    assert "archived: false" in (problem.detail or "")
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=3))]
    assert report.to_dict()["problems"] == [problem.to_dict()]


def test_a_body_archived_by_a_later_call_is_found_in_the_periods_other_archive_objects() -> None:
    # Accepted on the fallback path without its body (too big for the SQS audit message); the
    # drain archived the same bytes later, in another writer call, the next day.
    trail = Trail()
    records = trail.route(
        [donation(1)], source="community", at=DAY + timedelta(hours=23), archive=False
    )
    accepted = next(r for r in records if r["event"] == "accepted")
    sink = trail.recorded([donation(1)], source="community", at=DAY + timedelta(hours=23))
    drained = {
        "event": "drained",
        "at": format_timestamp(DAY + timedelta(days=1, hours=1)),
        "message_id": accepted["message_id"],
        "source": "drain",
        "body_sha256": accepted["body_sha256"],
    }
    trail.write([drained], sink.bodies, DAY + timedelta(days=1, hours=1))
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.replayed, report.missing_body) == (1, 0)
    assert hashlib.sha256(broker.published[0].body).hexdigest() == accepted["body_sha256"]


def test_a_dry_run_lists_what_would_go_where_and_publishes_and_audits_nothing() -> None:
    trail = Trail()
    trail.route([donation(1), incident(2)], source="community", at=DAY + timedelta(hours=1))
    trail.route([donation(3)], source="community", at=DAY + timedelta(hours=2), archive=False)
    run, broker, audit = replayer(trail)
    report = run.run(request(dry_run=True, rate_per_s=1))

    assert broker.published == []
    assert audit.records == []
    assert (report.would_replay, report.replayed, report.missing_body) == (2, 0, 1)
    listed = {item.message_id: item for item in report.messages}
    assert listed[str(uuid.UUID(int=2))].groups == ("business", "community")
    assert listed[str(uuid.UUID(int=1002))].groups == ("community", "government")
    assert {item.outcome for item in report.messages} == {"would-replay"}
    assert report.to_dict()["dry_run"] is True


def test_the_rate_limit_paces_publishing() -> None:
    trail = Trail()
    at = DAY + timedelta(hours=1)
    trail.route([donation(n) for n in range(25)], source="community", at=at)
    clock = Clock()
    run, broker, _ = replayer(trail, clock=clock)
    report = run.run(request(rate_per_s=10))

    assert report.replayed == len(broker.published) == 25
    # 25 messages at 10 a second: the last batch starts after at least two seconds.
    assert clock.slept >= 2.0
    assert report.replayed / max(clock.now, 1e-9) <= 12.5


def test_max_messages_stops_with_a_cursor_that_the_next_run_resumes_without_repeats() -> None:
    trail = Trail()
    for n in range(7):
        trail.route([donation(n)], source="community", at=DAY + timedelta(minutes=n))
    run, broker, _ = replayer(trail)
    first = run.run(request(max_messages=3))
    assert (first.replayed, first.remaining, first.stopped) == (3, 4, "message limit")
    assert first.cursor == ReplayCursor(DAY + timedelta(minutes=2), str(uuid.UUID(int=3)))

    # The cursor travels through the runbook as JSON and back.
    resumed = parse_request(
        {
            "start": format_timestamp(DAY),
            "end": format_timestamp(DAY + timedelta(days=1)),
            "replay_id": first.replay_id,
            "max_messages": 3,
            "after": first.to_dict()["cursor"],
        }
    )
    second = run.run(resumed)
    third = run.run(dataclasses.replace(resumed, after=second.cursor))
    assert (second.replayed, second.pending, second.stopped) == (3, 4, "message limit")
    assert (third.replayed, third.remaining, third.stopped) == (1, 0, "done")
    published = [m.message_id for m in broker.published]
    assert published == [str(uuid.UUID(int=n + 1)) for n in range(7)]
    assert run.run(dataclasses.replace(resumed, after=third.cursor)).pending == 0


def test_a_broker_that_cannot_take_messages_stops_the_run_where_it_can_resume() -> None:
    trail = Trail()
    trail.route([donation(n) for n in range(3)], source="community", at=DAY + timedelta(hours=1))
    run, _, audit = replayer(trail, broker=MemoryTransport(failure=Failure.UNAVAILABLE))
    report = run.run(request())
    assert (report.replayed, report.failed, report.stopped) == (0, 1, "broker unavailable")
    assert report.cursor is None
    assert audit.records == []

    # A refused message in the middle: the cursor stops before it, the ones before are done.
    refused = str(uuid.UUID(int=2))
    run, broker, audit = replayer(trail, broker=MemoryTransport(fail_ids={refused}))
    report = run.run(request())
    assert report.stopped == "broker refused"
    assert report.cursor == ReplayCursor(DAY + timedelta(hours=1), str(uuid.UUID(int=1)))
    assert [r.message_id for r in audit.records] == [m.message_id for m in broker.published]
    assert report.problems[0].message_id == refused


def test_a_replay_that_cannot_be_audited_stops_after_what_the_broker_stored() -> None:
    trail = Trail()
    for n in range(150):
        trail.route([donation(n)], source="community", at=DAY + timedelta(seconds=n))
    run, broker, _ = replayer(trail, audit=MemoryAuditSink(available=False))
    report = run.run(request())
    assert report.stopped == "audit unavailable"
    # One batch went out and is not repeated by a re-run; the rest waits.
    assert report.replayed == len(broker.published) == 100
    assert report.remaining == 50
    assert report.cursor is not None
    assert report.cursor.message_id == broker.published[-1].message_id


def test_an_unreachable_bucket_stops_the_run_and_nothing_is_published() -> None:
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    trail.archive.available = False
    run, broker, _ = replayer(trail)
    report = run.run(request())
    assert (report.stopped, report.selected) == ("archive unavailable", 0)
    assert broker.published == []


def forged_emergency(
    trail: Trail,
    key: str,
    *,
    first_seq: int,
    prev: str,
    message_id: str = str(uuid.UUID(int=666)),
    at: datetime = DAY + timedelta(hours=5),
) -> str:
    """An object at ``key`` that is not the writer's: a chained acceptance of an emergency that
    was never published, with its body in an archive object beside it. Its message id."""
    envelope = {
        "schema": "fabric.envelope/1",
        "message_id": message_id,
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "internal",
        "source": "government",
        "timestamp": format_timestamp(at),
        "headers": {},
        "payload": {"forged": True},
    }
    body = json.dumps(envelope).encode()
    digest = hashlib.sha256(body).hexdigest()
    base = {"at": format_timestamp(at), "message_id": envelope["message_id"]}
    chain = Chain(trail.writer, first_seq - 1, prev)
    records = chain.link(
        [
            {**base, "event": "accepted", "topic": envelope["topic"], "source": "government",
             "body_sha256": digest, "archived": True, "batch": "forged", "emitted_by": "router"},
            {**base, "event": "routed", "queues": ["fabric.government.emergency"],
             "batch": "forged", "emitted_by": "router"},
        ]
    )  # fmt: skip
    trail.archive.put(key, encode_object(records))
    trail.archive.put("archive/" + key.removeprefix("audit/"), encode_archive({digest: body}))
    return str(envelope["message_id"])


def sealed_trail() -> tuple[Trail, str]:
    """Two calls of genuine traffic, sealed at 03:00; the sealed object's key."""
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    trail.route([donation(2)], source="community", at=DAY + timedelta(hours=2))
    trail.seal(DAY + timedelta(hours=3))
    (sealed, *_) = sorted(k for k in trail.archive.objects if k.startswith("audit/"))
    return trail, sealed


def test_an_object_no_checkpoint_names_among_sealed_ones_stops_the_run_before_anything() -> None:
    trail, _ = sealed_trail()
    # Slipped in between the sealed objects by someone who is not the writer.
    key = f"audit/{trail.writer}/2026/12/01/000000000002-000000000003.jsonl"
    forged = forged_emergency(trail, key, first_seq=2, prev="0" * 64)
    for dry_run in (False, True):
        run, broker, audit = replayer(trail)
        report = run.run(request(dry_run=dry_run))

        assert report.stopped == "trail not verified"
        assert (report.selected, report.replayed, report.would_replay) == (0, 0, 0)
        assert broker.published == []
        assert audit.records == []
        assert forged not in ids(report)
        (problem,) = report.trail_problems
        assert problem.startswith(f"{trail.writer}: {key}: an object no checkpoint names")
        assert report.to_dict()["trail_problems"] == [problem]


def test_a_sealed_object_edited_after_its_checkpoint_stops_the_run() -> None:
    trail, sealed = sealed_trail()
    edited = trail.archive.objects[sealed].replace(b"donation.received", b"donation.refunded")
    trail.archive.put(sealed, edited)
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert f"{sealed}: its SHA-256 differs" in problem


def test_an_unsealed_object_that_breaks_the_hash_chain_stops_the_run() -> None:
    trail, _ = sealed_trail()
    trail.route([donation(3)], source="community", at=DAY + timedelta(hours=4))  # unsealed
    key = f"audit/{trail.writer}/2026/12/01/000000000007-000000000008.jsonl"
    forged_emergency(trail, key, first_seq=7, prev="0" * 64)
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert "prev hash does not match" in problem


def test_an_unreadable_audit_object_stops_the_run_and_is_named() -> None:
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    broken = f"audit/{trail.writer}/2026/12/01/000000000099-000000000099.jsonl"
    trail.archive.put(broken, b"not json\n")
    run, broker, _ = replayer(trail)
    report = run.run(request())
    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert problem.startswith(f"{trail.writer}: {broken}: not a batch object")


def test_an_acceptance_not_yet_sealed_is_held_back_unless_the_request_includes_it() -> None:
    trail, _ = sealed_trail()
    trail.route([donation(3)], source="community", at=DAY + timedelta(hours=4), seal=False)
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, report.trail_problems, report.unsealed_objects) == ("done", [], 1)
    assert (report.replayed, report.unsealed) == (2, 1)
    (held,) = report.problems
    assert (held.message_id, held.outcome) == (str(uuid.UUID(int=4)), "unsealed")
    assert str(uuid.UUID(int=4)) not in [m.message_id for m in broker.published]

    run, broker, _ = replayer(trail)
    report = run.run(request(include_unsealed=True))
    assert (report.replayed, report.unsealed) == (3, 0)


def test_a_correctly_chained_forgery_after_the_last_checkpoint_is_never_published() -> None:
    # Anyone who can put an object after the last checkpoint can extend the unkeyed hash
    # chain: its acceptances are held back, and it cannot displace a sealed acceptance.
    trail, _ = sealed_trail()
    last = trail.chains.load(trail.writer)
    key = f"audit/{trail.writer}/2026/12/01/{last.seq + 1:012d}-{last.seq + 2:012d}.jsonl"
    forged = forged_emergency(trail, key, first_seq=last.seq + 1, prev=last.last_hash)
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert forged not in [m.message_id for m in broker.published]
    assert [item.message_id for item in report.problems if item.outcome == "unsealed"] == [forged]
    assert report.replayed == 2  # the sealed ones


def test_an_unsealed_acceptance_never_displaces_a_sealed_one_of_the_same_message() -> None:
    trail, _ = sealed_trail()
    last = trail.chains.load(trail.writer)
    key = f"audit/{trail.writer}/2026/12/01/{last.seq + 1:012d}-{last.seq + 2:012d}.jsonl"
    genuine = str(uuid.UUID(int=2))  # donation(1), accepted and sealed at 01:00
    at = DAY + timedelta(minutes=30)
    forged_emergency(
        trail, key, first_seq=last.seq + 1, prev=last.last_hash, message_id=genuine, at=at
    )
    run, broker, _ = replayer(trail)
    report = run.run(request(include_unsealed=True))

    (sent,) = [m for m in broker.published if m.message_id == genuine]
    assert json.loads(sent.body)["payload"] == {"amount": 1}
    assert report.replayed == 2


def test_an_authentic_but_incomplete_trail_is_named_and_the_message_still_replayed() -> None:
    # The accepted record reached the trail, its outcome did not: exactly what replay recovers.
    trail = Trail()
    records = trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    sink = trail.recorded([donation(2)], source="community", at=DAY + timedelta(hours=2))
    accepted_only = [r.to_dict() for r in sink.records if r.event is AuditEvent.ACCEPTED]
    trail.write(accepted_only, sink.bodies, DAY + timedelta(hours=2))
    trail.seal(DAY + timedelta(hours=3))
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert report.stopped == "done"
    assert [m.message_id for m in broker.published] == [
        records[0]["message_id"],
        str(uuid.UUID(int=3)),
    ]
    assert report.trail_problems == []
    (problem,) = report.trail_incomplete
    assert problem.endswith(": an accepted message has no outcome (routed or fallback)")


def test_every_configured_writers_trail_is_read_and_no_other() -> None:
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    stranger = Trail("writer-c", archive=first.archive, signer=first.signer)
    first.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    second.route([donation(2)], source="community", at=DAY + timedelta(hours=2))
    stranger.route([donation(3)], source="community", at=DAY + timedelta(hours=3))
    run, _, _ = replayer(first, writers=("writer-a", "writer-b"))
    assert ids(run.run(request())) == [str(uuid.UUID(int=2)), str(uuid.UUID(int=3))]


def test_a_rate_too_low_for_the_time_limit_stops_at_the_limit_instead_of_sleeping_past_it() -> None:
    trail = Trail()
    trail.route([donation(1), donation(2)], source="community", at=DAY + timedelta(hours=3))
    clock = Clock()
    run, broker, _ = replayer(trail, clock=clock)

    report = run.run(request(rate_per_s=0.001, max_seconds=60))

    assert report.stopped == "time limit"
    assert clock.slept <= 60  # never past the function's time
    assert len(broker.published) == 1


def test_progress_is_reported_after_every_batch_and_at_the_end() -> None:
    trail = Trail()
    trail.route([donation(n) for n in range(250)], source="community", at=DAY + timedelta(hours=1))
    seen: list[int] = []
    run, _, _ = replayer(trail)
    report = run.run(request(), progress=lambda r: seen.append(r.replayed))
    assert seen == [100, 200, 250, 250]
    assert len(report.to_dict(messages_limit=10)["messages"]) == 10  # type: ignore[arg-type]
    assert report.to_dict()["replayed"] == 250


# -- the request -------------------------------------------------------------------------------

GOOD = {"start": "2026-12-01T00:00:00Z", "end": "2026-12-02T00:00:00+07:00"}


def test_a_request_is_read_with_its_defaults() -> None:
    parsed = parse_request(
        {
            **GOOD,
            "topics": ["donation.#"],
            "message_ids": ["0F8FAD5B-D9CB-469F-A165-70867728950E"],
            "source": "community",
            "rate_per_s": 50,
            "max_seconds": 5000,
        },
        max_seconds=840,
    )
    assert parsed.start == DAY
    assert parsed.end == datetime(2026, 12, 1, 17, tzinfo=UTC)
    assert parsed.selection.message_ids == {"0f8fad5b-d9cb-469f-a165-70867728950e"}
    assert (parsed.max_messages, parsed.max_seconds, parsed.rate_per_s) == (1000, 840, 50.0)
    assert (parsed.dry_run, parsed.after, parsed.late_days) == (False, None, 1)
    assert uuid.UUID(parsed.replay_id)  # a fresh one when none is given
    assert parse_request(GOOD).replay_id != parsed.replay_id


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ([], "must be a JSON object"),
        ({**GOOD, "queue": "x"}, "unknown fields: queue"),
        ({"end": GOOD["end"]}, "start must be an RFC 3339"),
        ({**GOOD, "start": "2026-12-01 00:00"}, "start: not an RFC 3339"),
        ({**GOOD, "end": "2026-12-01T00:00:00Z"}, "start must be before end"),
        ({**GOOD, "end": "2027-01-15T00:00:00Z"}, "at most 31 days"),
        ({**GOOD, "topics": ["Donation.#"]}, "topic filter 'Donation.#'"),
        ({**GOOD, "topics": "donation.#"}, "topics must be a list"),
        ({**GOOD, "message_ids": ["m-1"]}, "'m-1' is not a message id"),
        ({**GOOD, "source": "router"}, "source must be one of academic"),
        ({**GOOD, "source": ["community"]}, "source must be one of academic"),
        ({**GOOD, "rate_per_s": float("nan")}, "rate_per_s must be a positive number"),
        ({**GOOD, "rate_per_s": float("inf")}, "rate_per_s must be a positive number"),
        ({**GOOD, "dry_run": "yes"}, "dry_run and include_unsealed must be true or false"),
        ({**GOOD, "include_unsealed": 1}, "dry_run and include_unsealed must be true or false"),
        ({**GOOD, "max_messages": 0}, "max_messages must be a positive whole number"),
        ({**GOOD, "max_messages": True}, "max_messages must be a positive whole number"),
        ({**GOOD, "rate_per_s": -1}, "rate_per_s must be a positive number"),
        ({**GOOD, "replay_id": "has spaces"}, "replay_id must match"),
        ({**GOOD, "late_days": 15}, "late_days must be a whole number from 0 to 14"),
        ({**GOOD, "after": {"at": GOOD["start"]}}, "after must be a cursor"),
        ({**GOOD, "after": {"at": "x", "message_id": "y"}}, "at: not an RFC 3339"),
    ],
)
def test_a_malformed_request_is_refused_with_what_is_wrong(event: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_request(event)


def test_a_write_the_writer_abandoned_verifies_and_its_messages_are_replayed_once() -> None:
    # The state update after an object was stored failed; the retry wrote the same records
    # under another key, and the checkpoint names the first attempt as abandoned.
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1))
    trail.chains.failures = 1
    with pytest.raises(TimeoutError):
        trail.route([donation(2)], source="community", at=DAY + timedelta(hours=2), seal=False)
    trail.route([donation(2), donation(3)], source="community", at=DAY + timedelta(hours=2))
    checkpoints = [k for k in trail.archive.objects if k.startswith("checkpoints/")]
    assert any(b'"abandoned":[{' in trail.archive.objects[k] for k in checkpoints)
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, report.trail_problems, report.trail_incomplete) == ("done", [], [])
    assert sorted(m.message_id for m in broker.published) == [
        str(uuid.UUID(int=n)) for n in (2, 3, 4)
    ]


class _AuditPutFails(MemoryArchive):
    """The next ``failures`` puts of an audit object fail (S3 throttling); the archive object
    put before each goes through."""

    failures = 0

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("audit/") and self.failures:
            self.failures -= 1
            raise TimeoutError(f"the put of {key}")
        super().put(key, data)


def routed_batch(trail: Trail, *numbers: int, at: datetime) -> AuditBatch:
    """What the router records for ``donation(n)`` of ``numbers`` at ``at``, as one batch."""
    sink = trail.recorded([donation(n) for n in numbers], source="community", at=at)
    records = [{**r.to_dict(), "emitted_by": "router"} for r in sink.records]
    return AuditBatch(records, dict(sink.bodies))


def test_a_key_abandoned_by_one_checkpoint_and_chained_by_a_later_one_is_not_a_forgery() -> None:
    # Attempt 1 stores 1-4 (b1, b3) and its state update fails; attempt 2 (b1 alone: 1-2) is
    # not stored; the hourly checkpoint names 1-4 as abandoned; attempt 3 carries b3 and b1
    # again, in the other order: key 1-4 once more, other bytes, and the chain's now (the next
    # checkpoint names it). Each checkpoint checked alone read the chain's 1-4 as an abandoned
    # attempt whose hash differs, and the whole day was "not verified".
    archive = _AuditPutFails()
    trail = Trail(archive=archive)
    at = DAY + timedelta(hours=1)
    b1, b3 = routed_batch(trail, 1, at=at), routed_batch(trail, 3, at=at)
    trail.clock = at
    trail.chains.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b1", b1), ("b3", b3)])
    archive.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b1", b1)])
    first = trail.seal(DAY + timedelta(hours=2))
    trail.clock = DAY + timedelta(hours=2, minutes=5)
    again = trail.audit_writer.write([("b3", b3), ("b1", b1)])
    trail.seal(DAY + timedelta(hours=3))
    assert again.key is not None
    assert again.key in {i["key"] for i in json.loads(archive.objects[first])["abandoned"]}
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert sorted(m.message_id for m in broker.published) == [str(uuid.UUID(int=n)) for n in (2, 4)]


def test_a_key_abandoned_twice_across_two_checkpoints_is_checked_against_both_hashes() -> None:
    # Attempt 1 stores 1-2 (b1), its state update fails; attempt 2 (b1 and b2: 1-4) is not
    # stored; the hourly checkpoint names 1-2 with attempt 1's hash; attempt 3 (b2: 1-2 again,
    # other bytes) is not stored either; attempt 4 writes 1-4, and its checkpoint names 1-2
    # with attempt 3's hash. S3 still holds attempt 1's bytes there: checked against that one
    # checkpoint's hash alone, the day was "not verified".
    archive = _AuditPutFails()
    trail = Trail(archive=archive)
    at = DAY + timedelta(hours=1)
    b1, b2 = routed_batch(trail, 1, at=at), routed_batch(trail, 2, at=at)
    trail.clock = at
    trail.chains.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b1", b1)])
    archive.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b1", b1), ("b2", b2)])
    trail.seal(DAY + timedelta(hours=2))
    trail.clock = DAY + timedelta(hours=2, minutes=5)
    archive.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b2", b2)])
    trail.audit_writer.write([("b1", b1), ("b2", b2)])  # 1-4, sealed at once
    checkpoints = sorted(k for k in archive.objects if k.startswith("checkpoints/"))
    named = [
        [(i["key"], i["sha256"]) for i in json.loads(archive.objects[k]).get("abandoned", ())]
        for k in checkpoints
    ]
    ((key, one),), ((again, other),) = named
    assert key == again
    assert one != other
    run, broker, _ = replayer(trail)
    report = run.run(request())

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert sorted(m.message_id for m in broker.published) == [str(uuid.UUID(int=n)) for n in (2, 3)]


def test_a_key_a_retry_may_still_write_is_named_abandoned_with_all_its_hashes_at_once() -> None:
    # 22:30 attempt 1 stores 1-2 (b1), its state update fails; attempt 2 (b2: 1-2 too) is not
    # stored, and its retry may still store 1-2. The 23:00 checkpoint named 1-2 with attempt
    # 1's hash, the retry after midnight (another key) with attempt 2's: a window from the
    # next day saw only the second hash against attempt 1's bytes, and its day was "not
    # verified" (replay here, the compliance report alike). The writer names a key abandoned
    # once no retry can write it, with every hash it attempted there.
    archive = _AuditPutFails()
    trail = Trail(archive=archive)
    evening = DAY + timedelta(hours=22, minutes=30)
    b1, b2 = routed_batch(trail, 1, at=evening), routed_batch(trail, 2, at=evening)
    trail.clock = evening
    trail.chains.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b1", b1)])
    archive.failures = 1
    with pytest.raises(TimeoutError):
        trail.audit_writer.write([("b2", b2)])
    evening_checkpoint = trail.seal(DAY + timedelta(hours=23))
    trail.clock = DAY + timedelta(days=1, minutes=30)
    trail.audit_writer.write([("b1", b1), ("b2", b2)])  # another day, another key
    assert "abandoned" not in json.loads(archive.objects[evening_checkpoint])
    (settled,) = [
        k for k in archive.objects if k.startswith("checkpoints/") and k > evening_checkpoint
    ]
    assert len(json.loads(archive.objects[settled])["abandoned"]) == 2  # one key, both hashes
    trail.route([donation(3)], source="community", at=DAY + timedelta(days=1, hours=1))
    run, broker, _ = replayer(trail)
    report = run.run(request(start=DAY + timedelta(days=1), end=DAY + timedelta(days=2)))

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=4))]


def test_a_message_whose_earlier_acceptance_is_sealed_between_two_chunks_is_replayed_once() -> None:
    # The message was accepted at 03:00 (sealed) and at 01:00 (its batch reached the writer
    # late: not sealed yet). The first chunk took it in the 03:00 place and stopped at 02:00;
    # once sealed, the 01:00 acceptance made it a message before the cursor, and no chunk
    # replayed it. Its place is its first acceptance, sealed or not.
    trail = Trail()
    twice = donation(1)
    trail.route([donation(2)], source="community", at=DAY + timedelta(hours=2))
    trail.route([twice], source="community", at=DAY + timedelta(hours=3))
    trail.route(
        [twice],
        source="community",
        at=DAY + timedelta(hours=1),
        written=DAY + timedelta(hours=4),
        seal=False,
    )
    run, broker, _ = replayer(trail)
    first = run.run(request(max_messages=1))
    trail.seal(DAY + timedelta(hours=5))
    second = run.run(request(after=first.cursor))

    assert (first.stopped, second.stopped) == ("message limit", "done")
    assert sorted(m.message_id for m in broker.published) == [str(uuid.UUID(int=n)) for n in (2, 3)]
    (sent,) = [m for m in broker.published if m.message_id == str(uuid.UUID(int=2))]
    assert hashlib.sha256(sent.body).hexdigest() in {
        r["body_sha256"]
        for k, v in trail.archive.objects.items()
        if k.startswith("audit/")
        for r in (json.loads(line) for line in v.splitlines())
        if r["event"] == "accepted"
    }


def test_unsealed_objects_across_midnight_are_read_in_chain_order_not_by_day_folder() -> None:
    # A write at 00:00:00.4 and the next at 23:59:59.9 by a host clock half a second behind:
    # the later object sits in the earlier day's folder. Read by key as text, the chain would
    # break and an honest trail read "not verified": it is read by sequence number.
    trail = Trail()
    midnight = DAY + timedelta(days=1)
    trail.route([donation(1)], source="community", at=midnight + timedelta(seconds=0.4), seal=False)
    trail.route([donation(2)], source="community", at=midnight - timedelta(seconds=0.1), seal=False)
    run, broker, _ = replayer(trail)

    report = run.run(request(start=DAY, end=midnight + timedelta(days=1), include_unsealed=True))

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert sorted(m.message_id for m in broker.published) == [
        str(uuid.UUID(int=2)),
        str(uuid.UUID(int=3)),
    ]
