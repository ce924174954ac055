"""The compliance report on trails a review found it mishandled: a router call's records split
either side of the window's closing checkpoint, a forged checkpoint, records of the wrong types,
and a consumer's clock a little behind at the period's start."""

from __future__ import annotations

import base64
import json
import tracemalloc
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from fabric.adapters.compliance_memory import MemorySigner
from fabric.audit_chain import Keyring, canonical, merkle_root
from fabric.compliance import Figures, instant
from fabric.compliance_run import ComplianceReporter, Period, StoredObject
from fabric.errors import TransportUnavailable
from tests.unit.test_compliance_run import (
    WRITER,
    CountingStore,
    Trail,
    accepted_and_routed,
    reporter,
)

DAY = date(2026, 12, 2)
LATER = datetime(2026, 12, 6, tzinfo=UTC)  # every checkpoint of the window is due


def two_days() -> Trail:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 48)  # Dec 1-2, sealed hourly
    trail.write(datetime(2026, 12, 3, 0, 30, tzinfo=UTC), *accepted_and_routed("m-a"))
    return trail


# -- a router call's records split at the window's closing checkpoint ---------------------------


def split_at_the_closing_checkpoint(stamped: str) -> Trail:
    """One router call's ``accepted`` and ``routed`` (stamped ``stamped``) written in two audit
    objects, the hourly checkpoint of Dec 3 01:00 (the one closing Dec 2's window) between."""
    trail = two_days()
    accepted, routed = accepted_and_routed("m-split")
    trail.write(datetime(2026, 12, 3, 0, 59, 59, 950000, tzinfo=UTC), {**accepted, "at": stamped})
    trail.checkpoint(datetime(2026, 12, 3, 1, tzinfo=UTC))
    trail.write(datetime(2026, 12, 3, 1, 0, 0, 50000, tzinfo=UTC), {**routed, "at": stamped})
    trail.hours(datetime(2026, 12, 3, 1, tzinfo=UTC), 26)
    return trail


def test_a_batch_split_at_the_closing_checkpoint_fails_neither_day() -> None:
    trail = split_at_the_closing_checkpoint("2026-12-03T00:59:59.9Z")  # Dec 3's message
    for day in (DAY, date(2026, 12, 3)):
        report = reporter(trail, now=LATER)[0].report(Period.day(day))
        assert report["verification"]["problem"] is None, day
        assert report["verification"]["verified"] is True, day
    dec2 = reporter(trail, now=LATER)[0].report(Period.day(DAY))
    assert dec2["outcomes"] == {"accepted": 48, "routed": 48}  # the split message is Dec 3's


def test_an_acceptance_of_the_period_without_an_outcome_is_still_named() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 36)
    lost = {"event": "accepted", "message_id": "lost", "groups": ["media"]}
    key = trail.write(datetime(2026, 12, 2, 12, 5, tzinfo=UTC), lost)
    trail.hours(datetime(2026, 12, 2, 12, tzinfo=UTC), 38)
    report = reporter(trail, now=LATER)[0].report(Period.day(DAY))
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"] == (
        f"{key} record 145: an accepted message has no outcome (routed or fallback)"
    )


def test_an_acceptance_of_the_period_written_in_the_margin_without_an_outcome_is_named() -> None:
    trail = two_days()  # 194 records
    late = {"event": "accepted", "message_id": "late", "groups": ["media"]}
    key = trail.write(
        datetime(2026, 12, 3, 0, 40, tzinfo=UTC), {**late, "at": "2026-12-02T23:59:00Z"}
    )
    trail.hours(datetime(2026, 12, 3, 1, tzinfo=UTC), 26)
    report = reporter(trail, now=LATER)[0].report(Period.day(DAY))
    assert report["verification"]["problem"] == (
        f"{key} record 195: an accepted message has no outcome (routed or fallback)"
    )


def test_a_late_acceptance_without_an_outcome_is_named_by_the_report_that_reads_it() -> None:
    # Stamped Dec 2 23:30, written Dec 3 01:30, after the checkpoint that closed Dec 2's window
    # (a writer backlog), its `routed` lost: Dec 2's report never reads it, so Dec 3's must name
    # it, or no daily report would.
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 48)
    trail.checkpoint(datetime(2026, 12, 3, 1, tzinfo=UTC))
    accepted, _routed = accepted_and_routed("m-lost")
    trail.write(
        datetime(2026, 12, 3, 1, 30, tzinfo=UTC), {**accepted, "at": "2026-12-02T23:30:00Z"}
    )
    trail.hours(datetime(2026, 12, 3, 2, tzinfo=UTC), 30)
    run = reporter(trail, now=LATER)[0]
    assert run.report(Period.day(DAY))["verification"]["verified"] is True
    later = run.report(Period.day(DAY + timedelta(days=1)))
    assert later["late_records"] == {"records": 1, "by_day": {"2026-12-02": 1}}
    assert later["verification"]["verified"] is False
    assert later["verification"]["problem"].endswith(
        "an accepted message has no outcome (routed or fallback)"
    )


def test_an_acceptance_of_the_day_before_whose_outcome_came_before_the_anchor_is_not_owed() -> None:
    # One router call split: its `routed` written at 22:59:59.5, then the 23:00 checkpoint (the
    # next day's anchor), then its `accepted` (by the other audit path) at 23:00:03. The day's
    # own report reads both; the next day's reads only the acceptance, which is not its to
    # answer for (it is not late: written within its day's window).
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 46)  # through Dec 2 22:00
    accepted, routed = accepted_and_routed("m-split")
    stamp = "2026-12-02T22:59:59Z"
    trail.write(datetime(2026, 12, 2, 22, 59, 59, 500000, tzinfo=UTC), {**routed, "at": stamp})
    trail.checkpoint(datetime(2026, 12, 2, 23, tzinfo=UTC))
    trail.write(datetime(2026, 12, 2, 23, 0, 3, tzinfo=UTC), {**accepted, "at": stamp})
    trail.hours(datetime(2026, 12, 2, 23, tzinfo=UTC), 30)
    run = reporter(trail, now=LATER)[0]
    for day in (DAY, DAY + timedelta(days=1)):
        report = run.report(Period.day(day))
        assert report["verification"]["verified"] is True, (day, report["verification"])


def test_a_late_acceptance_in_a_writers_first_interval_is_named_and_counted_late() -> None:
    # A writer that began with a backlog: its very first object, written Dec 3 00:30, holds an
    # acceptance stamped Dec 1 whose `routed` was lost. Dec 1's report ran when the writer had
    # stored nothing; Dec 3's, which reads that object, must name it.
    trail = Trail()
    accepted, _routed = accepted_and_routed("m-lost")
    trail.write(
        datetime(2026, 12, 3, 0, 30, tzinfo=UTC), {**accepted, "at": "2026-12-01T10:00:00Z"}
    )
    trail.hours(datetime(2026, 12, 3, 1, tzinfo=UTC), 30)
    report = reporter(trail, now=LATER)[0].report(Period.day(date(2026, 12, 3)))
    assert report["late_records"] == {"records": 1, "by_day": {"2026-12-01": 1}}
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"].endswith(
        "an accepted message has no outcome (routed or fallback)"
    )


# -- a forged checkpoint ----------------------------------------------------------------------


class RoleStore(CountingStore):
    """The report's role may read only ``audit/<writer>/`` and ``checkpoints/<writer>/``: S3
    answers AccessDenied elsewhere, which the S3 adapter raises as TransportUnavailable."""

    def read(self, key: str) -> StoredObject | None:
        if not key.startswith((f"audit/{WRITER}/", f"checkpoints/{WRITER}/")):
            raise TransportUnavailable(f"cannot read {key}: AccessDenied")
        return super().read(key)


def three_days_behind_the_role() -> Trail:
    trail = Trail()
    trail.store.__class__ = RoleStore
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    return trail


def naming(trail: Trail, extra: list[str], *, signer: MemorySigner | None = None) -> str:
    """Dec 2 12:00's checkpoint again (a new version of its key), also naming ``extra``: signed
    by ``signer``, or with its old signature (forged)."""
    key = trail.store.keys(f"checkpoints/{WRITER}/")[36]
    body: dict[str, Any] = json.loads(trail.store.objects[key].data)
    body["objects"] = body["objects"] + [{"key": k, "sha256": "0" * 64} for k in extra]
    if signer is not None:
        del body["signature"]
        body["merkle_root"] = merkle_root([bytes.fromhex(i["sha256"]) for i in body["objects"]])
        body["signature"] = base64.b64encode(signer.sign(canonical(body))).decode()
    trail.store.put(key, json.dumps(body).encode())
    return key


OUTSIDE = f"archive/{WRITER}/2026/12/02/000000000001-000000000002.jsonl"


def test_a_forged_checkpoint_naming_a_key_outside_the_trail_is_not_verified() -> None:
    trail = three_days_behind_the_role()
    key = naming(trail, [OUTSIDE])
    run, reports, topic, _ = reporter(trail)
    summary = run.run(Period.day(DAY))  # before: TransportUnavailable, nothing written
    assert summary["verified"] is False
    assert summary["problem"] == f"{key}: the signature does not match the checkpoint"
    assert len(reports.files) == 3
    assert topic.published[0][0].endswith("NOT VERIFIED")
    assert OUTSIDE not in trail.store.reads


def test_a_forged_checkpoint_naming_many_keys_reads_none_of_them() -> None:
    trail = three_days_behind_the_role()
    names = [f"audit/{WRITER}/2026/12/02/9{n:011d}-9{n:011d}.jsonl" for n in range(5000)]
    key = naming(trail, names)
    run = reporter(trail)[0]
    trail.store.reads.clear()
    report = run.report(Period.day(DAY))
    assert report["verification"]["problem"] == (
        f"{key}: the signature does not match the checkpoint"
    )
    assert not set(names) & set(trail.store.reads)
    assert len(trail.store.reads) < 100  # the window's own objects and checkpoints


def test_a_signed_checkpoint_naming_a_key_outside_the_writers_objects_is_not_verified() -> None:
    trail = three_days_behind_the_role()
    key = naming(trail, [OUTSIDE], signer=trail.signer)
    report = reporter(trail)[0].report(Period.day(DAY))
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"] == (
        f"{OUTSIDE}: named by {key}, outside audit/{WRITER}/"
    )
    assert OUTSIDE not in trail.store.reads


class CountingKey:
    """The trail's key, counting the signatures it checks (KMS calls, in AWS)."""

    def __init__(self, signer: MemorySigner) -> None:
        self.key_id, self._signer, self.verified = signer.key_id, signer, 0

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        self.verified += 1
        return self._signer.verify(message, signature)


def test_checking_seals_before_reading_costs_one_signature_check_per_checkpoint() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    key = CountingKey(trail.signer)
    _, reports, topic, _ = reporter(trail)
    run = ComplianceReporter(
        environment="test",
        writers=[WRITER],
        trail=trail.store,
        keys=Keyring([key]),
        reports=reports,
        topic=topic,
        clock=lambda: LATER,
    )
    report = run.report(Period.day(DAY))
    assert report["verification"]["verified"] is True
    assert key.verified == 27  # the window's 26 checkpoints and its anchor, once each


# -- records of the wrong types ---------------------------------------------------------------


def tampered(change: Any) -> tuple[str, dict[str, Any]]:
    """Dec 2's report after an object of the day was replaced by ``change`` of its records."""
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[10]
    records = [json.loads(line) for line in trail.store.objects[key].data.splitlines()]
    records = change(records)
    trail.store.put(key, b"".join(json.dumps(r).encode() + b"\n" for r in records))
    run, reports, _, _ = reporter(trail)
    summary = run.run(Period.day(DAY))
    assert len(reports.files) == 3
    return key, summary


def _groups_five(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "groups": 5} if r["event"] == "accepted" else r for r in records]


def _emergency_at_no_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    accepted = next(r for r in records if r["event"] == "accepted")
    accepted.update(priority="emergency", at="2026-12-02T1x:00:00Z")
    delivered = {
        "event": "delivered",
        "message_id": accepted["message_id"],
        "groups": ["media"],
        "at": "2026-12-02T11:00:00Z",
    }
    return [*records, delivered, {**delivered, "queues": 7, "groups": None}]


@pytest.mark.parametrize("change", [_groups_five, _emergency_at_no_time])
def test_a_tampered_object_with_records_of_the_wrong_types_is_not_verified(change: Any) -> None:
    key, summary = tampered(change)
    assert summary["verified"] is False
    assert summary["problem"] == f"{key}: its SHA-256 differs from the checkpoint's"


@pytest.mark.parametrize(
    "at",
    [
        "2026-12-02T1x:00:00Z",
        "2026-13-02T10:00:00Z",
        "2026-02-30T10:00:00Z",
        "\uff12026-12-02T10:00:00Z",  # a fullwidth digit,
    ],
)
def test_an_at_that_is_no_time_is_never_in_a_period(at: str) -> None:
    assert instant(at) == ""


def test_the_fabric_s_own_ats_still_sort_in_time_order() -> None:
    assert [
        instant(at)
        for at in ("2026-12-02T10:00:00Z", "2026-12-02T10:00:00.5Z", "2026-12-02T10:00:00.1234567Z")
    ] == [
        "2026-12-02T10:00:00.000000",
        "2026-12-02T10:00:00.500000",
        "2026-12-02T10:00:00.123456",
    ]


# -- a consumer's clock a little behind at the period's start ----------------------------------


@pytest.mark.parametrize(
    ("accepted", "delivered", "counted"),
    [
        ("2026-12-02T12:00:00.1Z", "2026-12-02T11:59:59.8Z", 1),
        # Before the fix, dropped: the copy undelivered. Not one of the period's own records.
        ("2026-12-02T00:00:00.1Z", "2026-12-01T23:59:59.8Z", 0),
    ],
)
def test_a_delivery_stamped_a_little_early_counts_at_the_start_as_mid_period(
    accepted: str, delivered: str, counted: int
) -> None:
    figures = Figures("2026-12-02T00:00:00Z", "2026-12-03T00:00:00Z")
    figures.add(
        {
            "event": "accepted",
            "message_id": "m",
            "at": accepted,
            "transport": "rabbitmq",
            "priority": "emergency",
            "groups": ["media"],
        }
    )
    figures.add({"event": "routed", "message_id": "m", "at": accepted})
    figures.add({"event": "delivered", "message_id": "m", "at": delivered, "groups": ["media"]})
    assert (figures.copies()["delivered"], figures.copies()["addressed"]) == (1, 1)
    latency = figures.latency()
    assert (latency["undelivered_copies"], latency["delivered_before_acceptance"]) == (0, 1)
    assert latency["max"] == -300.0
    assert figures.events["delivered"] == counted


def test_a_delivery_long_before_the_start_follows_up_nothing() -> None:
    figures = Figures("2026-12-02T00:00:00Z", "2026-12-03T00:00:00Z")
    figures.add(
        {"event": "accepted", "message_id": "m", "at": "2026-12-02T00:00:01Z", "groups": ["g"]}
    )
    figures.add(
        {"event": "delivered", "message_id": "m", "at": "2026-12-01T22:59:00Z", "groups": ["g"]}
    )
    assert figures.copies()["delivered"] == 0
    assert figures.events == {"accepted": 1}


# -- records that reached the trail after their day's report window closed -------------------


def written_late(written: datetime, stamped: str) -> Trail:
    """Dec 1 to Dec 4, sealed hourly, and one router call's records stamped ``stamped`` that
    reached the writer at ``written`` (a writer backlog)."""
    trail = Trail()
    first = datetime(2026, 12, 1, tzinfo=UTC)
    hours = int((written - first).total_seconds() // 3600)
    trail.hours(first, hours)
    trail.write(written, *({**r, "at": stamped} for r in accepted_and_routed("m-late")))
    trail.hours(first + timedelta(hours=hours), 96 - hours)
    return trail


@pytest.mark.parametrize(
    ("written", "stamped", "accepted_on_dec_2", "late"),
    [
        # Past Dec 2's window (it closed at Dec 3 01:00): Dec 3's report names them.
        (datetime(2026, 12, 3, 1, 30, tzinfo=UTC), "2026-12-02T23:30:00Z", 48, {"12-03": 2}),
        # Within the margin: Dec 2's report counts them, and nobody calls them late (the
        # start of Dec 3's window, read again, is not late).
        (datetime(2026, 12, 3, 0, 40, tzinfo=UTC), "2026-12-02T23:30:00Z", 49, {}),
        # A day and a half late, sealed at Dec 3 00:00: in Dec 2's margin, Dec 3's own.
        (datetime(2026, 12, 2, 23, 30, tzinfo=UTC), "2026-12-01T10:00:00Z", 48, {"12-03": 2}),
        (datetime(2026, 12, 2, 12, 30, tzinfo=UTC), "2026-12-01T10:00:00Z", 48, {"12-02": 2}),
    ],
)
def test_a_record_past_its_day_s_window_is_named_late_by_one_daily_report(
    written: datetime, stamped: str, accepted_on_dec_2: int, late: dict[str, int]
) -> None:
    trail = written_late(written, stamped)
    named = {}
    for day in (date(2026, 12, 2), date(2026, 12, 3)):
        report = reporter(trail, now=LATER)[0].report(Period.day(day))
        assert report["verification"]["verified"] is True
        if day == DAY:
            assert report["outcomes"]["accepted"] == accepted_on_dec_2
        if report["late_records"]["records"]:
            named[f"{day:%m-%d}"] = report["late_records"]["records"]
            assert report["late_records"]["by_day"] == {stamped[:10]: 2}
    assert named == late


def test_late_records_reach_the_summary_the_page_and_the_rows() -> None:
    trail = written_late(datetime(2026, 12, 3, 1, 30, tzinfo=UTC), "2026-12-02T23:30:00Z")
    run, reports, topic, _ = reporter(trail, now=LATER)
    summary = run.run(Period.day(date(2026, 12, 3)))
    assert summary["late_records"] == 2
    assert json.loads(topic.published[0][1])["late_records"] == 2
    files = {name.rsplit(".", 1)[-1]: data.decode() for name, (data, _) in reports.files.items()}
    assert "late_records,2026-12-02,2" in files["csv"]
    assert "2 (2026-12-02: 2), counted in none of those days&#x27; reports" in files["html"]
    # Dec 2's own report lacks them, and says verified: nothing it read is wrong.
    dec2 = reporter(trail, now=LATER)[0].report(Period.day(DAY))
    assert (dec2["outcomes"]["accepted"], dec2["late_records"]["records"]) == (48, 0)


# -- memory for copies not delivered ----------------------------------------------------------


def test_a_message_not_delivered_holds_under_250_bytes_whatever_its_groups() -> None:
    groups = ["government", "business", "academic", "community", "media"]
    figures = Figures("2026-12-02T00:00:00Z", "2026-12-03T00:00:00Z")
    count = 20_000
    tracemalloc.start()
    try:
        for n in range(count):
            message_id = str(uuid.UUID(int=n * 7919))
            at = f"2026-12-02T{n % 24:02d}:00:00.{n % 1000:03d}Z"
            for record in (
                {"event": "accepted", "message_id": message_id, "at": at, "groups": groups},
                {"event": "routed", "message_id": message_id, "at": at},
                # One group of every tenth message delivered: the rest still waits.
                *(
                    [
                        {
                            "event": "delivered",
                            "message_id": message_id,
                            "at": at,
                            "groups": ["media"],
                        }
                    ]
                    if n % 10 == 0
                    else []
                ),
            ):
                figures.add(json.loads(json.dumps(record)))  # every string its own, as read
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    copies = figures.copies()
    assert copies["undelivered_messages"] == count
    assert copies["delivered"] == count // 10
    everyone = sorted(str(uuid.UUID(int=n * 7919)) for n in range(count))
    assert copies["undelivered_message_ids"] == everyone[:20]
    # Before: a set of its own per message, 1,150 bytes each with five groups.
    assert held / count < 250, held / count
