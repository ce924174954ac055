"""The generated RabbitMQ topology delivers exactly what the routing table says, and no more."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import topology
from fabric.bootstrap import exchange_for
from fabric.envelope import Envelope, validate_envelope
from fabric.ports import MessageKind, OutboundMessage
from fabric.routing import RoutingTable, default_routing_table, topic_matches
from fabric.stakeholders import STAKEHOLDERS, Stakeholder

TABLE = default_routing_table()
DEFINITIONS = topology.definitions(TABLE)
NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


class SimulatedBroker:
    """Routes like RabbitMQ over a definitions document (topic semantics from fabric.routing,
    which the integration tier proves equal to RabbitMQ's)."""

    def __init__(self, definitions: dict[str, Any]) -> None:
        self.exchanges = {e["name"]: e for e in definitions["exchanges"]}
        self.bindings: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for binding in definitions["bindings"]:
            self.bindings[binding["source"]].append(binding)

    def publish(self, exchange: str, key: str, headers: dict[str, str]) -> set[str]:
        queues: set[str] = set()
        visited: set[str] = set()

        def visit(name: str) -> None:
            if name in visited:
                return
            visited.add(name)
            kind = self.exchanges[name]["type"]
            hits = [b for b in self.bindings[name] if self._matches(kind, b, key, headers)]
            alternate = self.exchanges[name]["arguments"].get("alternate-exchange")
            if not hits and alternate:
                visit(alternate)
            for binding in hits:
                if binding["destination_type"] == "queue":
                    queues.add(binding["destination"])
                else:
                    visit(binding["destination"])

        visit(exchange)
        return queues

    @staticmethod
    def _matches(kind: str, binding: dict[str, Any], key: str, headers: dict[str, str]) -> bool:
        if kind == "fanout":
            return True
        if kind == "direct":
            return bool(binding["routing_key"] == key)
        if kind == "topic":
            return topic_matches(binding["routing_key"], key)
        args = binding["arguments"]
        pairs = [(k, v) for k, v in args.items() if not k.startswith("x-")]
        hits = [headers.get(k) == v for k, v in pairs]
        return all(hits) if args["x-match"] == "all" else any(hits)


BROKER = SimulatedBroker(DEFINITIONS)


def envelope(topic: str, **fields: Any) -> Envelope:
    result = validate_envelope({"topic": topic, "payload": {}, **fields}, "government", now=NOW)
    assert isinstance(result, Envelope), result
    return result


def publish_as_router(message: Envelope) -> set[str]:
    return BROKER.publish(
        topology.INGRESS_EXCHANGE, message.topic, topology.delivery_headers(message)
    )


def expected_queues(table: RoutingTable, message: Envelope) -> set[str]:
    return {topology.queue_name(d.group, emergency=d.emergency) for d in table.deliveries(message)}


def test_a_child_safety_incident_lands_in_government_and_community_emergency_queues() -> None:
    queues = publish_as_router(envelope("child-safety.incident.reported"))
    assert queues == {"fabric.government.emergency", "fabric.community.emergency"}


def test_a_message_no_binding_matches_lands_in_the_unrouted_queue() -> None:
    queues = BROKER.publish(topology.INGRESS_EXCHANGE, "child-safety.audit.exported", {})
    assert queues == {topology.UNROUTED_QUEUE}


def test_a_non_emergency_topic_published_to_the_emergency_exchange_is_not_lost() -> None:
    queues = BROKER.publish(topology.EMERGENCY_EXCHANGE, "donation.received", {})
    assert queues == {topology.UNROUTED_QUEUE}


def test_audience_narrows_delivery_at_the_broker_too() -> None:
    message = envelope("research.sync.requested", audience=["academic"])
    assert publish_as_router(message) == {"fabric.academic"}


def test_without_gate_headers_nothing_reaches_a_group_queue() -> None:
    assert BROKER.publish(topology.INGRESS_EXCHANGE, "research.sync.requested", {}) == set()


TOPIC_WORDS = sorted(
    {w for r in TABLE.routes for w in r.pattern.split(".") if w not in "*#"} | {"other", "x"}
)
HEADER_CHOICES = st.fixed_dictionaries(
    {},
    optional={
        "requires-background-check": st.sampled_from(["yes", "no"]),
        "amount-band": st.sampled_from(["large", "small"]),
        "cross-border": st.sampled_from(["yes", "no"]),
    },
)


@settings(max_examples=400)
@given(
    words=st.lists(st.sampled_from(TOPIC_WORDS), min_size=1, max_size=4),
    headers=HEADER_CHOICES,
)
def test_every_queue_receives_exactly_what_the_routing_table_says(
    words: list[str], headers: dict[str, str]
) -> None:
    message = envelope(".".join(words), headers=headers)
    expected = expected_queues(TABLE, message)
    delivered = publish_as_router(message)
    if expected:
        assert delivered == expected
    else:
        assert delivered <= {topology.UNROUTED_QUEUE}


def test_every_route_of_the_table_delivers_somewhere() -> None:
    for route in TABLE.routes:
        topic = route.pattern.replace("#", "x").replace("*", "x")
        headers = dict(route.headers.values) if route.headers else {}
        message = envelope(topic, headers=headers)
        assert {topology.queue_name(g, emergency=route.emergency) for g in route.groups} <= (
            publish_as_router(message)
        ), route.name


QUEUES = {q["name"]: q for q in DEFINITIONS["queues"]}
EXCHANGES = {e["name"]: e for e in DEFINITIONS["exchanges"]}
WORK_QUEUES = [topology.queue_name(g, emergency=e) for g in STAKEHOLDERS for e in (False, True)]
RETRY_QUEUES = [
    topology.retry_queue_name(g, s, emergency=e)
    for g in STAKEHOLDERS
    for e in (False, True)
    for s in (topology.EMERGENCY_RETRY_TIERS_SECONDS if e else topology.RETRY_TIERS_SECONDS)
]


def test_every_queue_is_a_durable_quorum_queue_with_an_explicit_delivery_limit() -> None:
    for queue in QUEUES.values():
        assert queue["durable"] is True
        assert queue["auto_delete"] is False
        assert queue["arguments"]["x-queue-type"] == "quorum"
        assert queue["arguments"]["x-delivery-limit"] > 0
        assert queue["arguments"]["x-overflow"] == "reject-publish"
        assert queue["arguments"]["x-max-length"] > 0


@pytest.mark.parametrize("name", WORK_QUEUES + RETRY_QUEUES)
def test_work_and_retry_queues_dead_letter_at_least_once(name: str) -> None:
    arguments = QUEUES[name]["arguments"]
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-dead-letter-exchange"] in EXCHANGES
    assert arguments["x-delivery-limit"] == topology.DELIVERY_LIMIT


@pytest.mark.parametrize("group", STAKEHOLDERS)
@pytest.mark.parametrize("emergency", [False, True])
def test_a_poison_message_is_dead_lettered_into_its_own_dlq(
    group: Stakeholder, emergency: bool
) -> None:
    arguments = QUEUES[topology.queue_name(group, emergency=emergency)]["arguments"]
    landed = BROKER.publish(
        arguments["x-dead-letter-exchange"], arguments["x-dead-letter-routing-key"], {}
    )
    assert landed == {topology.dead_letter_queue_name(group, emergency=emergency)}


@pytest.mark.parametrize("name", RETRY_QUEUES)
def test_a_retry_waits_in_its_tier_then_returns_to_its_origin_queue(name: str) -> None:
    group = Stakeholder(name.split(".")[1])
    emergency = ".emergency." in name
    seconds = int(name.rsplit(".", 1)[1].removesuffix("s"))
    assert BROKER.publish(topology.retry_exchange_name(group), name, {}) == {name}
    arguments = QUEUES[name]["arguments"]
    assert arguments["x-message-ttl"] == seconds * 1000
    back = BROKER.publish(
        arguments["x-dead-letter-exchange"], arguments["x-dead-letter-routing-key"], {}
    )
    assert back == {topology.queue_name(group, emergency=emergency)}


def test_unknown_retry_tier_is_refused() -> None:
    with pytest.raises(ValueError, match="tier"):
        topology.retry_queue_name(Stakeholder.MEDIA, 7)


def test_names_follow_the_documented_scheme() -> None:
    gov = Stakeholder.GOVERNMENT
    assert topology.queue_name(gov) == "fabric.government"
    assert topology.queue_name(gov, emergency=True) == "fabric.government.emergency"
    assert topology.dead_letter_queue_name(gov) == "fabric.government.dlq"
    assert topology.retry_queue_name(gov, 30) == "fabric.government.retry.30s"
    assert topology.retry_exchange_name(gov) == "fabric.x.retry.government"
    assert topology.user_name(gov) == "fabric-government"
    assert all(name.startswith("fabric.x.") for name in EXCHANGES)
    assert not any(name.startswith("fabric.x.") for name in QUEUES)


PERMISSIONS = {p["user"]: p for p in DEFINITIONS["permissions"]}
ALL_RESOURCES = [*QUEUES, *EXCHANGES, "amq.default", "amq.topic"]


@pytest.mark.parametrize("group", STAKEHOLDERS)
def test_a_group_user_reads_only_its_own_queues_and_writes_only_its_retries_and_audit(
    group: Stakeholder,
) -> None:
    permission = PERMISSIONS[topology.user_name(group)]
    # RabbitMQ applies the regexes unanchored (re:run); ours carry their own anchors.
    readable = {r for r in ALL_RESOURCES if re.search(permission["read"], r)}
    writable = {r for r in ALL_RESOURCES if re.search(permission["write"], r)}
    configurable = {r for r in ALL_RESOURCES if re.search(permission["configure"], r)}
    assert readable == {
        topology.queue_name(group),
        topology.queue_name(group, emergency=True),
    }
    assert writable == {topology.retry_exchange_name(group), topology.AUDIT_EXCHANGE}
    assert configurable == set()


def test_users_carry_no_credentials_and_the_platform_users_are_separate() -> None:
    names = [u["name"] for u in DEFINITIONS["users"]]
    assert names == [
        topology.PLATFORM_USER,
        topology.REDRIVE_USER,
        topology.AUDIT_READER_USER,
        *(topology.user_name(g) for g in STAKEHOLDERS),
        topology.MONITOR_USER,
    ]
    assert all(set(user) == {"name", "tags"} for user in DEFINITIONS["users"])
    assert re.search(PERMISSIONS[topology.PLATFORM_USER]["write"], topology.INGRESS_EXCHANGE)


def reach(user: str) -> dict[str, set[str]]:
    """What ``user``'s permissions match among the topology's exchanges and queues."""
    permission = PERMISSIONS[user]
    return {
        kind: {r for r in ALL_RESOURCES if re.search(permission[kind], r)}
        for kind in ("configure", "write", "read")
    }


@pytest.mark.parametrize(
    "user", [topology.PLATFORM_USER, topology.REDRIVE_USER, topology.AUDIT_READER_USER]
)
def test_the_platform_users_configure_nothing(user: str) -> None:
    # Their functions publish, get and ack, and declare nothing; configure would let them delete
    # a queue with its messages. The topology function declares as the administrator.
    assert reach(user)["configure"] == set()


def test_the_routers_user_writes_only_where_it_publishes_and_reads_no_queue() -> None:
    platform = reach(topology.PLATFORM_USER)
    # Where the router, the drain and the replay publish (a routed message, an unroutable one,
    # an audit batch, a redelivered one).
    published = {
        exchange_for(OutboundMessage("m", "case.opened", b"", frozenset({Stakeholder.MEDIA}))),
        exchange_for(OutboundMessage("m", "nothing.routes", b"", frozenset())),
        exchange_for(OutboundMessage("m", "audit", b"", frozenset(), kind=MessageKind.AUDIT)),
        exchange_for(OutboundMessage("m", "t", b"", frozenset(), redeliver_to="fabric.media")),
    }
    assert platform["write"] == published == set(topology.PLATFORM_EXCHANGES)
    # Nothing to read, so nothing to purge (RabbitMQ checks queue.purge against read), and no
    # exchange read: binding and unbinding need read on the source, so no rewired routes.
    assert platform["read"] == set()


def test_the_redrive_and_the_audit_reader_read_only_their_queues() -> None:
    redrive, reader = reach(topology.REDRIVE_USER), reach(topology.AUDIT_READER_USER)
    dead_letter_queues = {
        topology.dead_letter_queue_name(g, emergency=e) for g in STAKEHOLDERS for e in (False, True)
    }
    # The redrive: every DLQ and the overflow queue; back through the redeliver and overflow
    # return exchanges, and its audit batches. It can purge what it reads, and nothing else.
    assert redrive["read"] == {topology.OVERFLOW_QUEUE, *dead_letter_queues}
    assert redrive["write"] == {
        topology.REDELIVER_EXCHANGE,
        topology.OVERFLOW_RETURN_EXCHANGE,
        topology.AUDIT_EXCHANGE,
    }
    # The audit writer's event source: fabric.audit, and it publishes nothing.
    assert reader == {"configure": set(), "write": set(), "read": {topology.AUDIT_QUEUE}}
    # None of them binds: no exchange read, no queue written.
    for user in (topology.PLATFORM_USER, topology.REDRIVE_USER, topology.AUDIT_READER_USER):
        assert reach(user)["read"].isdisjoint(EXCHANGES)
        assert reach(user)["write"].isdisjoint(QUEUES)
    # The audit writer trusts the batches of the two that publish them.
    assert topology.TRUSTED_AUDIT_PUBLISHERS == (topology.PLATFORM_USER, topology.REDRIVE_USER)


def test_definitions_are_deterministic_json_and_self_consistent() -> None:
    again = topology.definitions(default_routing_table())
    assert json.dumps(again, sort_keys=True) == json.dumps(DEFINITIONS, sort_keys=True)
    assert len(QUEUES) == len(DEFINITIONS["queues"])
    assert len(EXCHANGES) == len(DEFINITIONS["exchanges"])
    for binding in DEFINITIONS["bindings"]:
        assert binding["source"] in EXCHANGES
        targets = QUEUES if binding["destination_type"] == "queue" else EXCHANGES
        assert binding["destination"] in targets
    assert all(item["vhost"] == "/" for item in DEFINITIONS["queues"])
    assert topology.definitions(TABLE, vhost="fabric")["vhosts"] == [{"name": "fabric"}]


def test_sns_filter_policy_selects_the_group_on_the_audience_attribute() -> None:
    assert topology.sns_filter_policy(Stakeholder.MEDIA) == {"audience": ["media"]}


def test_delivery_headers_open_every_gate_unless_an_audience_names_groups() -> None:
    assert topology.delivery_headers(envelope("donation.received", headers={"k": "v"})) == {
        "k": "v",
        "fabric-audience": "all",
    }
    assert topology.delivery_headers(envelope("research.sync", audience=["academic"])) == {
        "fabric-to-academic": "yes"
    }


TERMINAL_QUEUES = [
    topology.UNROUTED_QUEUE,
    topology.AUDIT_QUEUE,
    *(topology.dead_letter_queue_name(g, emergency=e) for g in STAKEHOLDERS for e in (False, True)),
]


@pytest.mark.parametrize("name", TERMINAL_QUEUES)
def test_a_terminal_queue_dead_letters_at_its_delivery_limit_into_the_overflow_queue(
    name: str,
) -> None:
    # Every redrive run (dry runs, filtered runs, chunks) and every failed audit-writer batch
    # hands letters back, and each hand-back counts as a delivery: at the limit the broker
    # would drop a letter of a queue without a dead-letter exchange.
    arguments = QUEUES[name]["arguments"]
    assert arguments["x-delivery-limit"] == topology.TERMINAL_DELIVERY_LIMIT
    assert arguments["x-dead-letter-exchange"] == topology.OVERFLOW_EXCHANGE
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"  # at-least-once needs it
    assert arguments["x-dead-letter-routing-key"] == name
    landed = BROKER.publish(
        arguments["x-dead-letter-exchange"], arguments["x-dead-letter-routing-key"], {}
    )
    assert landed == {topology.OVERFLOW_QUEUE}
    # The way back the redrive of the overflow queue takes: the routing key names the queue.
    back = BROKER.publish(
        topology.OVERFLOW_RETURN_EXCHANGE, arguments["x-dead-letter-routing-key"], {}
    )
    assert back == {name}


def test_the_overflow_queue_is_the_only_queue_without_a_dead_letter_exchange() -> None:
    assert set(topology.terminal_queues()) == set(TERMINAL_QUEUES)
    without = {n for n, q in QUEUES.items() if "x-dead-letter-exchange" not in q["arguments"]}
    assert without == {topology.OVERFLOW_QUEUE}
    arguments = QUEUES[topology.OVERFLOW_QUEUE]["arguments"]
    assert arguments == {
        "x-queue-type": "quorum",
        # Explicit (4.x defaults to 20) and far beyond what the redrive's peeks could use up:
        # nothing would take a letter dropped at it.
        "x-delivery-limit": topology.OVERFLOW_DELIVERY_LIMIT,
        "x-overflow": "reject-publish",
        "x-max-length": topology.TERMINAL_MAX_LENGTH,
        "x-max-length-bytes": topology.MAX_LENGTH_BYTES,
    }
    assert EXCHANGES[topology.OVERFLOW_EXCHANGE]["type"] == "fanout"
    assert EXCHANGES[topology.OVERFLOW_RETURN_EXCHANGE]["type"] == "direct"
    into_overflow = [
        b for b in DEFINITIONS["bindings"] if b["destination"] == topology.OVERFLOW_QUEUE
    ]
    assert [b["source"] for b in into_overflow] == [topology.OVERFLOW_EXCHANGE]
    assert topology.OVERFLOW_DELIVERY_LIMIT >= 1_000_000 * topology.TERMINAL_DELIVERY_LIMIT
    # It is no group's DLQ, and no group user can read (or peek) it: only the redrive.
    with pytest.raises(ValueError, match="not a dead-letter queue"):
        topology.work_queue_of(topology.OVERFLOW_QUEUE)
    assert re.search(PERMISSIONS[topology.REDRIVE_USER]["read"], topology.OVERFLOW_QUEUE)
    assert re.search(PERMISSIONS[topology.REDRIVE_USER]["write"], topology.OVERFLOW_RETURN_EXCHANGE)
    for group in STAKEHOLDERS:
        assert not re.search(
            PERMISSIONS[topology.user_name(group)]["read"], topology.OVERFLOW_QUEUE
        )


def test_a_lower_terminal_delivery_limit_changes_only_the_terminal_queues() -> None:
    lowered = topology.definitions(TABLE, terminal_delivery_limit=2)
    limits = {q["name"]: q["arguments"]["x-delivery-limit"] for q in lowered["queues"]}
    for name, limit in limits.items():
        if name == topology.OVERFLOW_QUEUE:
            # A drill that peeks the overflow queue must not drop what it peeks.
            assert limit == topology.OVERFLOW_DELIVERY_LIMIT
        else:
            assert limit == (2 if name in TERMINAL_QUEUES else topology.DELIVERY_LIMIT), name
    with pytest.raises(ValueError, match="not positive"):
        topology.definitions(TABLE, terminal_delivery_limit=0)
