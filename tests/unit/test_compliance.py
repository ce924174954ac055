"""The compliance report's figures and its three renderings."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser
from typing import Any

from fabric.compliance import (
    IdSet,
    ObjectLock,
    build_report,
    instant,
    render_csv,
    render_html,
)

PERIOD = ("2026-12-03T00:00:00Z", "2026-12-04T00:00:00Z")


def record(event: str, at: str = "2026-12-03T10:00:00.000Z", **fields: object) -> dict:
    return {"event": event, "at": at, **fields}


def report(records: list[dict] | None = None, **overrides: object) -> dict:
    if records is None:
        records = [
            record("accepted", transport="rabbitmq", classification="restricted", encrypted=True),
            record("accepted", transport="rabbitmq", classification="restricted", encrypted=False),
            record("accepted", transport="sns", classification="public", message_id="f1"),
            record("fallback", message_id="f1", groups=["media"], reason="broker unavailable"),
            record("rejected", reason="unavailable"),
            record("rejected", reason="malformed_json"),
            record("redriven"),
            record("accepted", at="2026-12-02T23:59:59.999Z", transport="rabbitmq"),  # before
        ]
    arguments: dict = {
        "environment": "prod",
        "period": PERIOD,
        "records": records,
        "locks": [
            ObjectLock("a", "COMPLIANCE", "2033-12-03T00:00:00Z"),
            ObjectLock("b", None, None),
        ],
        "verified": True,
        "problem": None,
        "generated_at": "2026-12-04T00:05:00.000Z",
        **overrides,
    }
    return build_report(**arguments)


def emergency(message_id: str, at: str, *groups: str, **fields: Any) -> dict:
    """An emergency the router accepted for ``groups`` (government and community unless named)."""
    return record(
        "accepted", at=at, message_id=message_id, priority="emergency", transport="rabbitmq",
        groups=list(groups or ("community", "government")), **fields,
    )  # fmt: skip


def delivered(message_id: str, at: str, group: str, priority: str = "emergency") -> dict:
    return record("delivered", at=at, message_id=message_id, priority=priority, groups=[group])


def test_the_figures_count_only_the_period() -> None:
    figures = report()
    assert figures["outcomes"] == {"accepted": 3, "fallback": 1, "redriven": 1, "rejected": 2}
    assert figures["accepted_by_transport"] == {"rabbitmq": 2, "sns": 1}
    assert figures["fallback_activations"] == 1
    # 3 stored of the 4 valid messages offered (the malformed one is bad input, not a failure)
    assert figures["acceptance_rate"] == 0.75
    assert figures["delivery_success_rate"] is None  # they name no groups: no copies
    assert figures["encryption"] == {"restricted_accepted": 2, "encrypted": 1, "coverage": 0.5}
    assert figures["object_lock"]["unlocked"] == ["b"], "an unlocked object is named"
    assert figures["object_lock"]["modes"] == {"COMPLIANCE": 1, "none": 1}


def test_the_period_boundaries_hold_whatever_the_fraction_of_a_second() -> None:
    # format_timestamp drops trailing zeros: ".5Z" sorts before "Z" as text, not in time.
    inside = [
        record("accepted", at="2026-12-03T00:00:00Z"),
        record("accepted", at="2026-12-03T00:00:00.5Z"),
        record("accepted", at="2026-12-03T23:59:59.999999Z"),
        record("accepted", at="2026-12-03T08:00:00+07:00"),  # 01:00 UTC
    ]
    outside = [
        record("accepted", at="2026-12-02T23:59:59.9Z"),
        record("accepted", at="2026-12-04T00:00:00Z"),
        record("accepted", at="2026-12-04T00:00:00.25Z"),
        record("accepted", at="2026-12-04T06:00:00+07:00"),  # 23:00 UTC on the 3rd: inside
    ]
    assert report([*inside, *outside])["outcomes"] == {"accepted": 5}
    assert instant("2026-12-03T00:00:00.5Z") > instant("2026-12-03T00:00:00Z")
    assert instant("not a time") == ""


def test_emergency_latency_runs_from_acceptance_to_each_groups_first_delivery() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:00Z"),
        delivered("e1", "2026-12-03T10:00:00.25Z", "community"),
        delivered("e1", "2026-12-03T10:00:00.1Z", "government"),
        delivered("e1", "2026-12-03T10:00:05Z", "government"),  # a redelivery: not the first
        emergency("e2", "2026-12-03T23:59:59.9Z", "government"),
        # delivered after the period: still this period's emergency
        delivered("e2", "2026-12-04T00:00:00.4Z", "government"),
        emergency("e3", "2026-12-03T11:00:00Z", "government"),  # never delivered
        # accepted before the period: its delivery is not this period's latency
        delivered("e0", "2026-12-03T00:00:01Z", "government"),
        # not an emergency
        record("accepted", message_id="n1", priority="normal", transport="rabbitmq"),
        delivered("n1", "2026-12-03T10:00:01Z", "media", priority="normal"),
    ]
    latency = report(records)["emergency_latency_ms"]
    assert latency["source"] == "delivered records"
    # One figure per copy: e1 for community and for government, e2 for government.
    assert (latency["count"], latency["p50"], latency["max"]) == (3, 250.0, 500.0)
    assert (latency["emergencies_accepted"], latency["copies"]) == (3, 4)
    assert (latency["undelivered_copies"], latency["undelivered_message_ids"]) == (1, ["e3"])
    assert latency["by_group"] == {
        "community": {"count": 1, "p50": 250.0, "p95": 250.0, "p99": 250.0, "max": 250.0},
        "government": {"count": 2, "p50": 100.0, "p95": 500.0, "p99": 500.0, "max": 500.0},
    }


def test_emergency_latency_is_split_by_the_path_it_was_accepted_on() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:00Z"),
        delivered("e1", "2026-12-03T10:00:00.02Z", "government"),
        record(
            "accepted",
            at="2026-12-03T11:00:00Z",
            message_id="e2",
            priority="emergency",
            transport="fallback",
        ),
        delivered("e2", "2026-12-03T11:00:30Z", "government"),  # after the drain
    ]
    latency = report(records)["emergency_latency_ms"]
    assert latency["count"] == 2
    assert (latency["by_path"]["broker"]["count"], latency["by_path"]["broker"]["p99"]) == (1, 20.0)
    assert latency["by_path"]["fallback"]["p99"] == 30_000.0
    page = render_html(report(records))
    assert "accepted on the broker path" in page
    assert "emergency_latency_ms.broker_path,p99,20.0" in render_csv(report(records))


def test_a_delivery_without_a_priority_is_paired_by_its_emergency_queue() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:00Z"),
        record(
            "delivered",
            at="2026-12-03T10:00:00.03Z",
            message_id="e1",
            queues=["fabric.community.emergency"],
        ),
        record("accepted", message_id="n1", priority="normal", transport="rabbitmq"),
        record("delivered", message_id="n1", queues=["fabric.media"]),  # not kept: no emergency
    ]
    latency = report(records)["emergency_latency_ms"]
    assert (latency["count"], latency["p50"]) == (1, 30.0)
    assert list(latency["by_group"]) == ["community"]


def test_emergency_latency_percentiles_are_nearest_rank() -> None:
    records = []
    for i in range(1, 101):  # latencies 1 ms .. 100 ms
        records.append(emergency(f"e{i}", "2026-12-03T10:00:00Z"))
        records.append(delivered(f"e{i}", f"2026-12-03T10:00:00.{i:03d}Z", "government"))
    latency = report(records)["emergency_latency_ms"]
    assert (latency["p50"], latency["p95"], latency["p99"], latency["max"]) == (50, 95, 99, 100)


def test_emergency_latency_says_not_recorded_only_without_pairs() -> None:
    latency = report([emergency("e1", "2026-12-03T10:00:00Z")])["emergency_latency_ms"]
    assert latency["source"] == "not recorded"
    assert (latency["count"], latency["p99"], latency["undelivered_copies"]) == (0, None, 2)
    page = render_html(report([emergency("e1", "2026-12-03T10:00:00Z")]))
    assert "not recorded" in page


def test_a_fallback_message_is_drained_only_when_every_groups_copy_was_moved() -> None:
    def fallback(message_id: str, *groups: str) -> dict:
        return record("fallback", at="2026-12-03T10:00:00Z", message_id=message_id, groups=groups)

    def drained(message_id: str, group: str, at: str = "2026-12-03T10:05:00Z") -> dict:
        return record("drained", at=at, message_id=message_id, groups=[group])

    records = [
        fallback("both", "government", "media"),
        drained("both", "government"),
        drained("both", "media", at="2026-12-04T00:10:00Z"),  # after the period: still counts
        fallback("half", "government", "media"),
        drained("half", "government"),
        fallback("none", "community"),
        fallback("early", "business"),
        drained("early", "business", at="2026-12-03T09:00:00Z"),  # before its fallback
    ]
    figures = report(records)
    assert figures["fallback_activations"] == 4
    assert figures["fallback_not_drained"] == {
        "messages": 3,
        "message_ids": ["early", "half", "none"],
    }
    assert figures["dead_letters"]["drained"] == 3  # those in the period


def test_letters_put_back_from_the_overflow_queue_are_not_counted_as_redriven() -> None:
    # Back in their DLQ they are still dead letters; only a move to their origin is a redrive.
    records = [
        record("redriven", message_id="m1", transport="fabric.community.dlq"),
        record("redriven", message_id="m2", transport="fabric.overflow"),
        record("redriven", message_id="batch-1", transport="fabric.overflow"),
    ]
    figures = report(records)
    assert figures["dead_letters"]["redriven"] == 1
    assert figures["dead_letters"]["returned_from_overflow"] == 2


def test_deliveries_retries_replays_and_unarchived_bodies_are_counted() -> None:
    records = [
        delivered("m1", "2026-12-03T10:00:00Z", "media", priority="normal"),
        delivered("m2", "2026-12-03T10:00:00Z", "media", priority="normal"),
        record("retried", message_id="m3", attempt=2),
        record("replayed", message_id="m4", replay_id="r1"),
        record("accepted", message_id="m5", transport="rabbitmq", archived=False),
    ]
    figures = report(records)
    assert figures["deliveries"] == {"delivered": 2, "retried": 1, "replayed": 1}
    assert figures["archive"] == {"records_not_archived": 1}


def test_the_page_is_self_contained_and_says_the_verdict() -> None:
    page = render_html(report(verified=False, problem="audit/x record 7: sequence gap"))
    tags: list[str] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            tags.append(tag)
            for name, value in attrs:
                assert "http" not in (value or ""), "no external resource"
                assert not name.startswith("on"), "no inline script"

    Collect().feed(page)
    assert not {"script", "link", "img", "iframe", "object"} & set(tags)
    assert "url(" not in page
    assert "@import" not in page
    assert tags.count("svg") == 5
    assert "NOT VERIFIED: audit/x record 7: sequence gap" in page
    assert "50.00 %" in page
    assert "Acceptance rate (stored of offered)" in page


def test_the_page_shows_latency_per_group_and_the_trail_read() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:00Z"),
        delivered("e1", "2026-12-03T10:00:00.0125Z", "government"),
    ]
    writers = [
        {
            "writer": "fabric-prod-audit-writer",
            "records": 2,
            "objects": 1,
            "checkpoints": 25,
            "unsealed_objects": 0,
            "problem": None,
        }
    ]
    page = render_html(report(records, writers=writers))
    assert "12.5 ms / 12.5 ms / 12.5 ms (max 12.5 ms, 1 copies)" in page
    # Community's copy was never delivered: the page names the message.
    assert "<th>Emergencies with a copy not delivered</th><td>e1</td>" in page
    assert "<th>government</th>" in page
    assert "fabric-prod-audit-writer" in page


def test_the_csv_has_every_figure() -> None:
    rows = list(csv.reader(io.StringIO(render_csv(report()))))
    assert rows[0] == ["section", "name", "value"]
    assert ["outcomes", "accepted", "3"] in rows
    assert ["delivery", "acceptance_rate", "0.75"] in rows
    assert ["delivery", "success_rate", ""] in rows
    assert ["delivery", "fallback_not_drained", "1"] in rows
    assert ["deliveries", "retried", "0"] in rows
    assert ["emergency_latency_ms", "p99", ""] in rows
    assert ["verification", "verified", "True"] in rows


def test_one_groups_delivery_never_stands_in_for_another_groups_copy() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:00Z", "government", "media"),
        delivered("e1", "2026-12-03T10:00:00.02Z", "government"),  # media never consumed it
        emergency("e2", "2026-12-03T10:00:00Z", "media"),
        # a consumer of a group the message was not addressed to (or naming none at all)
        delivered("e2", "2026-12-03T10:00:00.02Z", "community"),
        record("delivered", at="2026-12-03T10:00:00.03Z", message_id="e2", priority="emergency"),
    ]
    figures = report(records)
    latency = figures["emergency_latency_ms"]
    assert (latency["count"], latency["copies"], latency["undelivered_copies"]) == (1, 3, 2)
    assert latency["undelivered_message_ids"] == ["e1", "e2"]
    assert list(latency["by_group"]) == ["government"]
    assert figures["copies"] == {
        "addressed": 3,
        "delivered": 1,
        "undelivered": 2,
        "undelivered_messages": 2,
        "undelivered_message_ids": ["e1", "e2"],
    }
    assert figures["delivery_success_rate"] == 1 / 3


def test_delivery_success_counts_each_copy_once_whatever_the_redeliveries() -> None:
    def accepted(message_id: str, *groups: str) -> dict:
        return record("accepted", message_id=message_id, transport="rabbitmq", groups=groups)

    records = [
        accepted("m1", "media"),
        delivered("m1", "2026-12-03T10:00:01Z", "media", priority="normal"),
        delivered("m1", "2026-12-03T10:00:02Z", "media", priority="normal"),  # at least once
        accepted("m2", "business", "community"),
        delivered("m2", "2026-12-03T10:00:01Z", "business", priority="normal"),
        accepted("m3", "media"),  # dead-lettered: stored, never delivered
        record("dead-lettered", message_id="m3"),
    ]
    figures = report(records)
    assert figures["acceptance_rate"] == 1.0
    assert (figures["copies"]["addressed"], figures["copies"]["delivered"]) == (4, 2)
    assert figures["delivery_success_rate"] == 0.5
    assert figures["deliveries"]["delivered"] == 3  # the records, redelivery included


def test_a_delivery_stamped_before_its_acceptance_is_counted_as_clock_skew() -> None:
    records = [
        emergency("e1", "2026-12-03T10:00:05Z", "government"),
        delivered("e1", "2026-12-03T10:00:00Z", "government"),
    ]
    latency = report(records)["emergency_latency_ms"]
    assert (latency["p50"], latency["delivered_before_acceptance"]) == (-5000.0, 1)
    assert "Emergency deliveries stamped before acceptance (clock skew)</th><td>1<" in render_html(
        report(records)
    )


def test_objects_whose_retention_has_passed_are_named() -> None:
    locks = [
        ObjectLock("fresh", "COMPLIANCE", "2033-12-03T00:00:00Z"),
        ObjectLock("lapsed", "COMPLIANCE", "2020-01-01T00:00:00Z"),
        ObjectLock("open", None, None),
    ]
    lock = report(locks=locks)["object_lock"]
    assert (lock["expired"], lock["unlocked"]) == (["lapsed"], ["open"])
    assert ["object_lock", "expired", "1"] in list(
        csv.reader(io.StringIO(render_csv(report(locks=locks))))
    )


def test_a_delivery_consumed_from_a_groups_sqs_queue_counts_for_that_group() -> None:
    # The SQS entry point records the queue's ARN and no groups; the audit writer accepts such
    # a record from a group's consumer only for that group's queues (named ...-<group>).
    arn = "arn:aws:sqs:ap-southeast-3:123456789012:fabric-prod-emergency-government"
    records = [
        emergency("e1", "2026-12-03T10:00:00Z", "government"),
        record("delivered", at="2026-12-03T10:00:00.05Z", message_id="e1", queues=[arn]),
    ]
    figures = report(records)
    assert figures["delivery_success_rate"] == 1.0
    latency = figures["emergency_latency_ms"]
    assert (latency["count"], latency["p50"], latency["undelivered_copies"]) == (1, 50.0, 0)
    assert list(latency["by_group"]) == ["government"]


def test_an_acceptance_that_names_no_groups_counts_alike_in_copies_and_latency() -> None:
    # Records from before acceptances named their groups: the groups that delivered them.
    records = [
        record("accepted", message_id="e1", priority="emergency", transport="rabbitmq"),
        delivered("e1", "2026-12-03T10:00:00.05Z", "government"),
    ]
    figures = report(records)
    assert figures["copies"]["addressed"] == figures["emergency_latency_ms"]["copies"] == 1
    assert figures["delivery_success_rate"] == 1.0


def test_a_consumers_record_cannot_claim_a_body_was_not_archived() -> None:
    records = [
        record("accepted", message_id="m1", transport="rabbitmq", archived=False),
        record("delivered", message_id="m1", groups=["media"], archived=False),
    ]
    assert report(records)["archive"] == {"records_not_archived": 1}


def test_the_earliest_retain_until_is_compared_as_an_instant() -> None:
    # S3's dates lose their trailing zeros: as text, "...:00.5Z" sorts before "...:00Z".
    locks = [
        ObjectLock("a", "COMPLIANCE", "2033-12-03T10:00:00.5Z"),
        ObjectLock("b", "COMPLIANCE", "2033-12-03T10:00:00Z"),
        ObjectLock("c", "COMPLIANCE", "2033-12-03T10:00:01Z"),
    ]
    lock = report(locks=locks)["object_lock"]
    assert lock["earliest_retain_until"] == "2033-12-03T10:00:00Z"


def test_a_message_id_set_holds_exactly_its_ids_across_merges() -> None:
    ids = IdSet()
    added = [f"m-{n}" for n in range(0, 20_000, 2)]
    assert all(ids.add(message_id) for message_id in added)
    assert not any(ids.add(message_id) for message_id in added[::7])
    assert len(ids) == len(added)
    assert all(message_id in ids for message_id in added)
    assert not any(f"m-{n}" in ids for n in range(1, 20_000, 2))
    assert 7 not in ids


def test_a_refused_requests_record_counts_once_and_leaves_the_message_figures_alone() -> None:
    # The records a refused request leaves (Router.refuse_request, as the entry points call
    # it): no message id, no topic. Each counts once, as one refused request, whatever the
    # number of messages in it; the acceptance, delivery and encryption figures are unmoved.
    from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
    from fabric.adapters.memory_cipher import LocalCipher
    from fabric.router import Router
    from fabric.routing import default_routing_table

    audit = MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[MemoryTransport()],
        cipher=LocalCipher(),
        audit=audit,
        environment="prod",
    )
    router.refuse_request(reason="too_large", source="media")
    router.refuse_request(reason="unauthenticated", source=None)
    refused = [{**r.to_dict(), "at": "2026-12-03T11:00:00Z"} for r in audit.records]
    assert [r["message_id"] for r in refused] == [None, None]

    before, after = report(), report([*report_records(), *refused])
    assert after["outcomes"] == {**before["outcomes"], "rejected": 4}
    assert after["rejected_by_reason"] == {
        **before["rejected_by_reason"],
        "too_large": 1,
        "unauthenticated": 1,
    }
    for figure in ("acceptance_rate", "delivery_success_rate", "copies", "encryption"):
        assert after[figure] == before[figure], figure
    assert "unauthenticated" in render_html(after)
    assert ["rejected_by_reason", "unauthenticated", "1"] in list(
        csv.reader(io.StringIO(render_csv(after)))
    )


def report_records() -> list[dict]:
    """The records ``report()`` reads by default."""
    return [
        record("accepted", transport="rabbitmq", classification="restricted", encrypted=True),
        record("accepted", transport="rabbitmq", classification="restricted", encrypted=False),
        record("accepted", transport="sns", classification="public", message_id="f1"),
        record("fallback", message_id="f1", groups=["media"], reason="broker unavailable"),
        record("rejected", reason="unavailable"),
        record("rejected", reason="malformed_json"),
        record("redriven"),
        record("accepted", at="2026-12-02T23:59:59.999Z", transport="rabbitmq"),
    ]
