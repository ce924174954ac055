"""The routing table: who receives what, who may send what, and which tables are refused."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.envelope import Envelope, Reason, Rejection, validate_envelope
from fabric.errors import RoutingTableError
from fabric.routing import (
    Delivery,
    HeaderMatch,
    HeaderMode,
    RoutingTable,
    default_routing_table,
    load_routing_table,
    parse_routing_table,
    pattern_covers,
    patterns_intersect,
    split_words,
    topic_matches,
)
from fabric.stakeholders import STAKEHOLDERS, Stakeholder

GOV, BIZ, ACA, COM, MED = (
    Stakeholder.GOVERNMENT,
    Stakeholder.BUSINESS,
    Stakeholder.ACADEMIC,
    Stakeholder.COMMUNITY,
    Stakeholder.MEDIA,
)
NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return default_routing_table()


def message(source: str, topic: str, **fields: Any) -> Envelope:
    result = validate_envelope({"topic": topic, "payload": {}, **fields}, source, now=NOW)
    assert isinstance(result, Envelope), result
    return result


def admitted(table: RoutingTable, source: str, topic: str, **fields: Any) -> frozenset[Delivery]:
    envelope = message(source, topic, **fields)
    assert table.admit(envelope) is None
    return table.deliveries(envelope)


def refusal(table: RoutingTable, source: str, topic: str, **fields: Any) -> Reason:
    rejection = table.admit(message(source, topic, **fields))
    assert isinstance(rejection, Rejection)
    return rejection.reason


# --- the product's table ----------------------------------------------------------------------


def test_child_safety_incident_from_community_reaches_government_and_community_urgently(
    table: RoutingTable,
) -> None:
    deliveries = admitted(
        table, "community", "child-safety.incident.reported", classification="restricted"
    )
    assert deliveries == {Delivery(GOV, True), Delivery(COM, True)}


def test_public_missing_child_alert_reaches_every_group_on_the_emergency_path(
    table: RoutingTable,
) -> None:
    deliveries = admitted(table, "government", "child-safety.alert.public", classification="public")
    assert deliveries == {Delivery(group, True) for group in STAKEHOLDERS}


def test_incident_without_restricted_classification_is_refused(table: RoutingTable) -> None:
    assert (
        refusal(table, "community", "child-safety.incident.reported")
        is Reason.CLASSIFICATION_TOO_LOW
    )


def test_case_updates_reach_only_government_and_only_government_may_send_them(
    table: RoutingTable,
) -> None:
    assert table.resolve(message("government", "case.child.updated")) == {GOV}
    assert refusal(table, "community", "case.updated", classification="restricted") is (
        Reason.SOURCE_NOT_ALLOWED
    )


def test_media_may_request_story_clearance_but_not_report_incidents(table: RoutingTable) -> None:
    assert table.may_publish("media", "approval.story-clearance.requested")
    assert not table.may_publish("media", "child-safety.incident.reported")
    assert not table.may_publish("svc:unknown", "approval.story-clearance.requested")


def test_approval_requests_go_to_government_and_decisions_back_to_the_requester(
    table: RoutingTable,
) -> None:
    assert admitted(table, "academic", "approval.research-access.requested") == {
        Delivery(GOV, False)
    }
    assert admitted(table, "government", "approval.research-access.decided") == {
        Delivery(ACA, False)
    }


def test_volunteer_match_needing_a_background_check_also_reaches_government(
    table: RoutingTable,
) -> None:
    plain = admitted(table, "community", "volunteer.match.proposed")
    flagged = admitted(
        table,
        "community",
        "volunteer.match.proposed",
        headers={"requires-background-check": "yes"},
    )
    assert {d.group for d in plain} == {COM, BIZ}
    assert {d.group for d in flagged} == {COM, BIZ, GOV}


def test_any_one_compliance_header_sends_a_donation_to_government(table: RoutingTable) -> None:
    for headers in ({"cross-border": "yes"}, {"amount-band": "large", "cross-border": "no"}):
        assert GOV in table.resolve(message("business", "donation.received", headers=headers))
    assert GOV not in table.resolve(message("business", "donation.received"))


def test_audience_narrows_the_table_and_cannot_extend_it(table: RoutingTable) -> None:
    assert admitted(table, "academic", "research.sync.requested", audience=["academic"]) == {
        Delivery(ACA, False)
    }
    assert refusal(table, "academic", "research.sync.requested", audience=["media"]) is (
        Reason.AUDIENCE_NOT_ROUTABLE
    )


def test_a_permitted_topic_no_route_matches_resolves_to_nobody(table: RoutingTable) -> None:
    envelope = message("government", "child-safety.audit.exported")
    assert table.admit(envelope) is None
    assert table.deliveries(envelope) == frozenset()


def test_the_shipped_table_equals_a_fresh_load_of_the_file(table: RoutingTable) -> None:
    path = Path(__file__).parents[2] / "layers/fabric/fabric/routing_table.toml"
    assert load_routing_table(path) == table
    assert table.version >= 1


# --- validation at load -----------------------------------------------------------------------


def base_table() -> dict[str, Any]:
    return {
        "schema": "fabric.routing/1",
        "version": 1,
        "routes": [
            {
                "name": "incidents",
                "pattern": "incident.#",
                "groups": ["government"],
                "emergency": True,
            },
            {"name": "donations", "pattern": "donation.*", "groups": ["business", "community"]},
        ],
        "publish": [{"source": "community", "topics": ["incident.reported", "donation.#"]}],
    }


def refused(mutate: Any) -> RoutingTableError:
    data = copy.deepcopy(base_table())
    mutate(data)
    with pytest.raises(RoutingTableError) as caught:
        parse_routing_table(data)
    return caught.value


def test_the_base_table_is_valid() -> None:
    assert len(parse_routing_table(base_table()).routes) == 2


def add_route(**route: Any) -> Any:
    return lambda data: data["routes"].append(route)


@pytest.mark.parametrize(
    ("mutate", "route", "words"),
    [
        (add_route(name="x", pattern="a.b", groups=["press"]), "x", "unknown group"),
        (add_route(name="x", pattern="a.B", groups=["media"]), "x", "invalid word"),
        (add_route(name="x", pattern="a..b", groups=["media"]), "x", "invalid word"),
        (add_route(name="x", pattern="a.b*", groups=["media"]), "x", "invalid word"),
        (
            add_route(name="x", pattern="donation.*", groups=["media"], colour="red"),
            "x",
            "unknown key",
        ),
        (add_route(name="donations", pattern="other", groups=["media"]), "donations", "duplicate"),
        (
            add_route(name="x", pattern="donation.*", groups=["media"], match_headers={"x-k": "v"}),
            "x",
            "reserved",
        ),
        (
            add_route(name="x", pattern="donation.*", groups=["media"], header_match="any"),
            "x",
            "match_headers",
        ),
        (
            add_route(
                name="x", pattern="donation.*", groups=["media"], min_classification="secret"
            ),
            "x",
            "min_classification",
        ),
        (
            lambda d: d["publish"].append({"source": "press", "topics": ["a"]}),
            "publish[1]",
            "unknown source",
        ),
        (
            lambda d: d["publish"].append({"source": "community", "topics": ["a"]}),
            "publish[1]",
            "merge",
        ),
    ],
)
def test_malformed_routes_and_rules_are_refused_by_name(
    mutate: Any, route: str, words: str
) -> None:
    error = refused(mutate)
    assert error.route == route
    assert words in str(error)


def test_a_route_shadowed_by_a_broader_one_is_unreachable() -> None:
    error = refused(
        add_route(name="small-donations", pattern="donation.small", groups=["business"])
    )
    assert error.route == "small-donations"
    assert "unreachable" in str(error)
    assert "donations" in str(error)


def test_of_two_duplicate_routes_the_later_one_is_reported() -> None:
    error = refused(add_route(name="again", pattern="donation.*", groups=["community", "business"]))
    assert error.route == "again"


@pytest.mark.parametrize(
    "route",
    [
        {"pattern": "donation.small", "groups": ["media"]},
        {"pattern": "donation.#", "groups": ["business"]},
        {"pattern": "donation.small", "groups": ["business"], "min_classification": "restricted"},
    ],
    ids=["new-group", "broader-pattern", "stricter-floor"],
)
def test_routes_that_add_something_are_reachable(route: dict[str, Any]) -> None:
    data = base_table()
    data["routes"].append({"name": "extra", **route})
    assert parse_routing_table(data).routes[-1].name == "extra"


def test_a_header_route_under_a_plain_route_for_the_same_groups_is_unreachable() -> None:
    error = refused(
        add_route(
            name="tagged", pattern="donation.small", groups=["business"], match_headers={"k": "v"}
        )
    )
    assert error.route == "tagged"


def test_emergency_route_overlapping_a_normal_route_for_the_same_group_is_refused() -> None:
    error = refused(add_route(name="all-events", pattern="#.reported", groups=["government"]))
    assert error.route == "incidents"
    assert "all-events" in str(error)


def test_emergency_and_normal_routes_may_not_overlap_even_for_different_groups() -> None:
    # RabbitMQ would route one message to government's emergency queue and academic's normal
    # one, but the fallback path carries a message on one SNS topic, one path: academic's copy
    # would end up in academic's emergency queue after the drain.
    def research(data: dict[str, Any]) -> None:
        data["routes"].append({"name": "research", "pattern": "#.reported", "groups": ["academic"]})
        data["publish"][0]["topics"].append("x.reported")

    error = refused(research)
    assert error.route == "incidents"
    assert "overlaps non-emergency route 'research'" in str(error)
    assert "fallback path cannot carry apart" in str(error)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["routes"][0].update(groups=[["government"]]), "incidents"),
        (lambda d: d["routes"][0].update(min_classification=["restricted"]), "incidents"),
        (lambda d: d["publish"][0].update(source=["government"]), "publish[0]"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_where(mutate: Any, where: str) -> None:
    assert refused(mutate).route == where


def test_emergency_and_normal_header_routes_that_exclude_each_other_may_coexist() -> None:
    data = base_table()
    data["routes"][0]["match_headers"] = {"severity": "high"}
    data["routes"].append(
        {
            "name": "minor-incidents",
            "pattern": "incident.#",
            "groups": ["government"],
            "match_headers": {"severity": "low"},
        }
    )
    assert len(parse_routing_table(data).routes) == 3


def test_a_route_nobody_may_publish_to_is_refused() -> None:
    error = refused(add_route(name="orphan", pattern="research.#", groups=["academic"]))
    assert error.route == "orphan"
    assert "publish" in str(error)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(schema="fabric.routing/2"),
        lambda d: d.update(version=0),
        lambda d: d.update(routes=[]),
        lambda d: d.update(publish=[]),
        lambda d: d.update(owner="me"),
    ],
    ids=["schema", "version", "no-routes", "no-publish", "unknown-key"],
)
def test_malformed_table_documents_are_refused(mutate: Any) -> None:
    assert refused(mutate).route is None


def test_a_table_file_that_is_not_toml_is_a_routing_table_error(tmp_path: Path) -> None:
    path = tmp_path / "table.toml"
    path.write_text("routes = [", encoding="utf-8")
    with pytest.raises(RoutingTableError, match="TOML"):
        load_routing_table(path)


# --- topic semantics against an independent reference ----------------------------------------


def reference_match(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """Textbook recursive definition of RabbitMQ topic matching on word lists."""
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(reference_match(rest, key[i:]) for i in range(len(key) + 1))
    return bool(key) and (head in ("*", key[0])) and reference_match(rest, key[1:])


pattern_words = st.sampled_from(["a", "b", "*", "#", ""])
key_words = st.sampled_from(["a", "b", "c", ""])


@given(st.lists(pattern_words, max_size=5), st.lists(key_words, max_size=6))
def test_topic_matching_equals_the_reference_definition(pattern: list[str], key: list[str]) -> None:
    pattern_text, key_text = ".".join(pattern), ".".join(key)
    expected = reference_match(split_words(pattern_text), split_words(key_text))
    assert topic_matches(pattern_text, key_text) is expected


def test_rabbitmq_word_splitting_edge_cases() -> None:
    assert split_words("") == ()
    assert split_words(".") == ("", "")
    assert topic_matches("#", "")
    assert not topic_matches("*", "")
    assert topic_matches("*", ".") is False
    assert topic_matches("*.*", ".")
    assert topic_matches("a.#.b", "a.b")
    assert topic_matches("a", "a")
    assert not topic_matches("a", "a.a")


VALID_WORDS = ("a", "b", "*", "#")
SMALL_PATTERNS = [
    ".".join(words) for n in range(1, 4) for words in itertools.product(VALID_WORDS, repeat=n)
]


@cache
def small_keys() -> list[str]:
    return [".".join(w) for n in range(1, 6) for w in itertools.product(("a", "b", "c"), repeat=n)]


def test_pattern_intersection_and_cover_agree_with_brute_force() -> None:
    keys = small_keys()
    matched = {p: frozenset(k for k in keys if topic_matches(p, k)) for p in SMALL_PATTERNS}
    for first, second in itertools.product(SMALL_PATTERNS, repeat=2):
        assert patterns_intersect(first, second) is bool(matched[first] & matched[second]), (
            first,
            second,
        )
        assert pattern_covers(first, second) is (matched[second] <= matched[first]), (
            first,
            second,
        )


HEADER_SETS = [
    dict(items)
    for n in range(3)
    for items in itertools.combinations([("k", "1"), ("k", "2"), ("m", "1"), ("n", "1")], n)
    if len({name for name, _ in items}) == n
]
CONDITIONS = [
    HeaderMatch(mode, tuple(sorted(values.items())))
    for mode in HeaderMode
    for values in HEADER_SETS
    if values
]


def test_header_implication_and_compatibility_agree_with_brute_force() -> None:
    universe = [*HEADER_SETS, {"k": "1", "m": "1", "n": "1"}, {"k": "2", "m": "1", "n": "1"}]
    for first, second in itertools.product(CONDITIONS, repeat=2):
        both = [h for h in universe if first.matches(h) and second.matches(h)]
        assert first.compatible(second) is bool(both), (first, second)
        implied = all(second.matches(h) for h in universe if first.matches(h))
        assert first.implies(second) is implied, (first, second)
