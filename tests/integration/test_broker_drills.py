"""Broker fault drills (kill -9, memory alarm, full queue, exchange deleted, frozen publisher)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.sns import SnsFallbackTransport
from fabric.bootstrap import exchange_for
from fabric.breaker import BreakerTransport, State
from fabric.router import MessageResult, Router
from fabric.routing import default_routing_table, topic_matches
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import INGRESS_EXCHANGE, UNROUTED_QUEUE, definitions, queue_name
from fabric.topology_apply import apply_topology
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, management
from tests.integration.private_node import PrivateNode, private_node

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# The production breaker stays open 5 s; 1 s keeps the drills short and changes nothing else.
OPEN_SECONDS = 1.0
DONATION = "donation.pledge.received"
ALERT = "child-safety.incident.reported"


# --- the private node and its per-test vhost --------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    """One private node for the module (booting costs seconds); stopped and removed after."""
    with private_node() as started:
        yield started


def topology(vhost: str, **max_length: int) -> dict[str, Any]:
    """The generated topology without its broker-wide users; ``max_length`` overrides queues'
    ``x-max-length`` by queue name."""
    document = definitions(default_routing_table(), vhost=vhost)
    document["users"], document["permissions"] = [], []
    for queue in document["queues"]:
        if queue["name"] in max_length:
            queue["arguments"]["x-max-length"] = max_length[queue["name"]]
    return document


def apply(node: PrivateNode, vhost: str, document: dict[str, Any]) -> None:
    apply_topology(node.management_client(), document, passwords={}, vhost=vhost)


@pytest.fixture
def make_vhost(node: PrivateNode) -> Iterator[Callable[..., str]]:
    """Makes fresh vhosts on the private node with the generated topology (``topology``'s
    overrides); deletes them afterwards."""
    made: list[str] = []

    def make(**max_length: int) -> str:
        if not node.running:  # an earlier drill failed while the node was down
            node.start()
        name = f"fabric-drill-{uuid.uuid4().hex[:12]}"
        made.append(name)
        node.add_vhost(name)
        apply(node, name, topology(name, **max_length))
        return name

    yield make
    for name in made:
        node.delete_vhost(name)


@pytest.fixture
def node_vhost(make_vhost: Callable[..., str]) -> str:
    """A fresh vhost on the private node with the generated topology."""
    return make_vhost()


# --- a router, the messages, and where copies of them ended up --------------------------------


def build_router(
    port: int, vhost: str, aws: dict[str, Any], **settings: Any
) -> tuple[Router, BreakerTransport, RabbitSettings]:
    rabbit_settings = RabbitSettings(
        "127.0.0.1",
        port,
        lambda: ("guest", "guest"),
        vhost=vhost,
        connect_timeout=1.0,
        connection_name=settings.pop("connection_name", f"fabric-drill-{uuid.uuid4().hex[:8]}"),
        **settings,
    )
    fallback = SnsFallbackTransport(
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        client_factory=lambda: boto3.client("sns", region_name=REGION),
    )
    breaker = BreakerTransport(
        RabbitMqTransport(rabbit_settings, exchange_for=exchange_for), open_seconds=OPEN_SECONDS
    )
    router = Router(
        table=default_routing_table(),
        transports=[breaker, fallback],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(),
        environment="test",
    )
    return router, breaker, rabbit_settings


def message(topic: str) -> dict[str, Any]:
    if topic == ALERT:
        return {
            "message_id": str(uuid.uuid4()),
            "topic": ALERT,
            "priority": "emergency",
            "classification": "restricted",
            "payload": {"summary": "drill"},
        }
    return {"message_id": str(uuid.uuid4()), "topic": topic, "payload": {"n": 1}}


SOURCE = {DONATION: "business", ALERT: "community"}


@dataclass
class Stream:
    """Everything one drill sent through a router, and every answer it got."""

    router: Router
    sent: dict[str, str] = field(default_factory=dict)  # message id -> topic
    results: list[MessageResult] = field(default_factory=list)
    calls: list[list[MessageResult]] = field(default_factory=list)  # the results, by call

    def send(self, count: int, topic: str = DONATION) -> list[MessageResult]:
        batch = [message(topic) for _ in range(count)]
        self.sent.update((m["message_id"], topic) for m in batch)
        results = list(self.router.route(batch, source=SOURCE[topic]).results)
        self.results.extend(results)
        self.calls.append(results)
        return results

    def by_transport(self) -> Counter[str | None]:
        return Counter(r.transport for r in self.results)

    def until_rabbitmq(self, within: float) -> list[MessageResult]:
        """Send one message at a time until RabbitMQ takes one (the breaker probed and closed)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            results = self.send(1)
            if results[0].transport == "rabbitmq":
                return results
            time.sleep(0.1)
        raise AssertionError(f"RabbitMQ took nothing within {within} s: {self.by_transport()}")


@dataclass(frozen=True)
class Copy:
    """One stored copy: which group stream holds it (and on which transport), and its bytes."""

    group: str
    emergency: bool
    message_id: str
    body: bytes
    where: str


def broker_copies(port: int, vhost: str) -> list[Copy]:
    """Drain every group work queue (and the unrouted queue) of ``vhost``."""
    found: list[Copy] = []
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, virtual_host=vhost)
    )
    channel = connection.channel()
    queues = [(g.value, e, queue_name(g, emergency=e)) for g in STAKEHOLDERS for e in (False, True)]
    for group, emergency, name in [*queues, ("unrouted", False, UNROUTED_QUEUE)]:
        for _ in range(100_000):
            method, properties, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                break
            found.append(Copy(group, emergency, properties.message_id, body, "rabbitmq"))
    connection.close()
    return found


def fallback_copies(aws: dict[str, Any]) -> list[Copy]:
    """Drain every fallback SQS queue."""
    found: list[Copy] = []
    for (flow, group), url in aws["queues"].items():
        for _ in range(10_000):
            received = aws["sqs"].receive_message(QueueUrl=url, MaxNumberOfMessages=10)
            if not received.get("Messages"):
                break
            for item in received["Messages"]:
                body = item["Body"].encode()
                message_id = json.loads(body)["message_id"]
                found.append(Copy(group.value, flow == "emergency", message_id, body, "fallback"))
    return found


def destinations(topic: str) -> set[tuple[str, bool]]:
    """The (group, emergency) streams the routing table sends a header-less ``topic`` to."""
    return {
        (group.value, route.emergency)
        for route in default_routing_table().routes
        if route.headers is None and topic_matches(route.pattern, topic)
        for group in route.groups
    }


def assert_nothing_lost(
    sent: dict[str, str],
    results: list[MessageResult],
    copies: list[Copy],
    *,
    in_doubt: frozenset[str] = frozenset(),
) -> int:
    """lost = 0, false acks = 0, and only at-least-once duplicates; returns the duplicates.

    Every message was accepted (the fallback is up in every drill), and every accepted message
    has a copy in every stream it routes to, or is held in the unrouted queue (RabbitMQ routes
    a publish that races an exchange's deletion there, through the alternate exchange; an
    operator redrives it). An accepted message stored nowhere would be a false acknowledgment.
    Nothing is stored that was not sent or where it does not route. Two copies in one stream
    carry the same message id and the same bytes, so a consumer that deduplicates by
    ``message_id`` sees each message exactly once. Only the messages ``in_doubt`` (the
    documented residual of a deletion: see ``doubted_by_the_deletion``) may miss copies, and
    then only in some of their streams, never in all.
    """
    assert [r.status for r in results] == ["accepted"] * len(sent)
    assert {r.message_id for r in results} == set(sent)
    held: dict[tuple[str, bool, str], list[Copy]] = {}
    for copy in copies:
        held.setdefault((copy.group, copy.emergency, copy.message_id), []).append(copy)
    phantom = {c.message_id for c in copies} - set(sent)
    assert not phantom, f"stored but never sent: {sorted(phantom)[:5]}"
    misrouted = [
        k for k in held if k[0] != "unrouted" and (k[0], k[1]) not in destinations(sent[k[2]])
    ]
    assert not misrouted, f"stored where it does not route: {misrouted[:5]}"
    unrouted = {k[2] for k in held if k[0] == "unrouted"}
    lost = [
        (group, emergency, message_id)
        for message_id, topic in sent.items()
        for group, emergency in destinations(topic)
        if (group, emergency, message_id) not in held and message_id not in unrouted
    ]
    unexplained = [item for item in lost if item[2] not in in_doubt]
    assert not unexplained, (
        f"{len(unexplained)} accepted deliveries stored nowhere, e.g. {unexplained[:3]}"
    )
    stored = {c.message_id for c in copies}
    assert {item[2] for item in lost} <= stored, "an accepted message with no copy anywhere"
    bodies = {c.message_id: c.body for c in copies}
    differing = {c.message_id for c in copies if c.body != bodies[c.message_id]}
    assert not differing, f"copies with one message id but different bytes: {differing}"
    return sum(len(held_copies) - 1 for held_copies in held.values())


def state_of(breaker: BreakerTransport) -> State:
    """The breaker's state now (a call, so that type narrowing does not carry across waits)."""
    return breaker.state


class Fault(threading.Thread):
    """Runs ``action`` once, ``after`` seconds from now, beside the stream it disturbs."""

    def __init__(self, action: Callable[[], object], after: float) -> None:
        super().__init__(daemon=True)
        self.action, self.after = action, after
        self.errors: list[Exception] = []
        self.start()

    def run(self) -> None:
        time.sleep(self.after)
        try:
            self.action()
        except Exception as exc:  # reported by stream_until, in the test's thread
            self.errors.append(exc)


def stream_until(stream: Stream, fault: Fault, batch: int, limit: float) -> None:
    """Keep publishing batches while ``fault`` runs, then three batches more."""
    deadline = time.monotonic() + limit
    while fault.is_alive() and time.monotonic() < deadline:
        stream.send(batch)
    fault.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not fault.is_alive(), "the fault did not happen in time"
    assert not fault.errors, fault.errors
    for _ in range(3):
        stream.send(batch)


# --- drills on the private node ---------------------------------------------------------------


def test_a_broker_killed_mid_stream_loses_nothing_and_takes_traffic_again_after_restart(
    node: PrivateNode, node_vhost: str, aws: dict[str, Any]
) -> None:
    router, breaker, _ = build_router(node.amqp_port, node_vhost, aws)
    stream = Stream(router)
    assert {r.transport for r in stream.send(20)} == {"rabbitmq"}
    stream_until(stream, Fault(node.kill, after=0.2), batch=20, limit=15)
    assert not node.running
    counts = stream.by_transport()
    assert counts["fallback"] > 0, counts  # the kill hit the stream; the rest failed over
    assert state_of(breaker) in {State.OPEN, State.HALF_OPEN}
    node.start()
    stream.until_rabbitmq(within=20)
    assert state_of(breaker) is State.CLOSED
    assert {r.transport for r in stream.send(20)} == {"rabbitmq"}
    # Read after the restart: what RabbitMQ confirmed before the kill survived it.
    copies = broker_copies(node.amqp_port, node_vhost) + fallback_copies(aws)
    assert_nothing_lost(stream.sent, stream.results, copies)


def memory_alarm(node: PrivateNode) -> bool:
    alarms = node.ctl("eval", "rabbit_alarm:get_alarms().").stdout
    return "memory" in alarms


def wait_for(condition: Callable[[], bool], within: float, what: str | Callable[[], str]) -> None:
    """Poll ``condition`` every 0.1 s; after ``within`` s fail naming ``what`` (or its result)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {within} s")
        time.sleep(0.1)


def test_a_memory_alarm_fails_over_within_the_blocked_timeout_then_rabbitmq_again(
    node: PrivateNode, node_vhost: str, aws: dict[str, Any]
) -> None:
    router, breaker, settings = build_router(node.amqp_port, node_vhost, aws)
    stream = Stream(router)
    assert {r.transport for r in stream.send(5, ALERT)} == {"rabbitmq"}
    try:
        node.ctl("set_vm_memory_high_watermark", "0.000001")
        wait_for(lambda: memory_alarm(node), within=10, what="the memory alarm")
        for _ in range(2):  # on the open connection, then again on the half-open probe's
            started = time.monotonic()
            during = stream.send(5, ALERT)
            elapsed = time.monotonic() - started
            assert {r.transport for r in during} == {"fallback"}
            assert elapsed < settings.blocked_timeout, elapsed
            assert state_of(breaker) is State.OPEN
            time.sleep(OPEN_SECONDS)
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4", check=False)
    wait_for(lambda: not memory_alarm(node), within=10, what="clearing the memory alarm")
    stream.until_rabbitmq(within=10)
    assert state_of(breaker) is State.CLOSED
    assert {r.transport for r in stream.send(5, ALERT)} == {"rabbitmq"}
    copies = broker_copies(node.amqp_port, node_vhost) + fallback_copies(aws)
    assert_nothing_lost(stream.sent, stream.results, copies)


def test_a_full_queue_nacks_and_the_nacked_messages_go_to_the_fallback(
    node: PrivateNode, make_vhost: Callable[..., str], aws: dict[str, Any]
) -> None:
    # The business work queue holds 5; donations also go to community, whose queue has room.
    node_vhost = make_vhost(**{queue_name(Stakeholder.BUSINESS): 5})
    router, breaker, _ = build_router(node.amqp_port, node_vhost, aws)
    stream = Stream(router)
    # One at a time: a quorum queue applies its limit as appends commit, so a burst overshoots.
    for _ in range(20):
        stream.send(1)
    counts = stream.by_transport()
    assert 5 <= counts["rabbitmq"] < 10, counts
    assert counts["fallback"] == 20 - counts["rabbitmq"]
    assert state_of(breaker) is State.CLOSED  # a nack is about one message, not the broker
    assert {r.transport for r in stream.send(3, ALERT)} == {"rabbitmq"}
    copies = broker_copies(node.amqp_port, node_vhost) + fallback_copies(aws)
    duplicates = assert_nothing_lost(stream.sent, stream.results, copies)
    by_rabbitmq = {r.message_id for r in stream.results if r.transport == "rabbitmq"}
    in_full_queue = {c.message_id for c in copies if (c.group, c.where) == ("business", "rabbitmq")}
    assert in_full_queue == by_rabbitmq & {m for m, t in stream.sent.items() if t == DONATION}
    # The community queue took the nacked donations too, and the fallback copied them again.
    assert duplicates == counts["fallback"]


def test_an_exchange_deleted_under_the_publisher_loses_only_copies_of_the_call_before_its_404(
    node: PrivateNode, node_vhost: str, aws: dict[str, Any]
) -> None:
    router, breaker, settings = build_router(node.amqp_port, node_vhost, aws)
    stream = Stream(router)
    assert {r.transport for r in stream.send(20)} == {"rabbitmq"}
    path = f"exchanges/{urllib.parse.quote(node_vhost, safe='')}/{INGRESS_EXCHANGE}"
    stream_until(stream, Fault(lambda: node.management("DELETE", path), 0.1), 20, 15)
    counts = stream.by_transport()
    assert counts["fallback"] > 0, counts  # publishes to the missing exchange failed over
    assert state_of(breaker) in {State.OPEN, State.HALF_OPEN}
    apply(node, node_vhost, topology(node_vhost))  # the operator puts the exchange back
    stream.until_rabbitmq(within=10)
    assert state_of(breaker) is State.CLOSED
    assert {r.transport for r in stream.send(20)} == {"rabbitmq"}
    # Each channel the broker closed took its connection with it: none is left open behind.
    wait_for(
        lambda: len(connections(node, settings.connection_name)) == 1,
        within=5,
        what=lambda: f"one connection left, open: {connections(node, settings.connection_name)}",
    )
    copies = broker_copies(node.amqp_port, node_vhost) + fallback_copies(aws)
    assert_nothing_lost(
        stream.sent, stream.results, copies, in_doubt=doubted_by_the_deletion(stream)
    )


def doubted_by_the_deletion(stream: Stream) -> frozenset[str]:
    """The messages RabbitMQ confirmed in the call before the first one that failed over:
    the documented residual of an exchange deleted under the router (docs/router.md, "An
    exchange deleted under a call"). RabbitMQ routes a publish that races the deletion by the
    bindings it reads as they go, and says so only with the 404 of the next publish; in the
    call that meets it, the router sends what it had confirmed to the fallback too. One the
    call before confirmed may have reached only some of its groups: the compliance report
    shows its other copies undelivered, and replay sends them."""
    first = next(
        i for i, call in enumerate(stream.calls) if any(r.transport == "fallback" for r in call)
    )
    if first == 0:
        return frozenset()
    return frozenset(r.message_id for r in stream.calls[first - 1] if r.transport == "rabbitmq")


def connections(node: PrivateNode, connection_name: str) -> list[str]:
    """The broker's names of the open connections a transport named ``connection_name``."""
    return [
        c["name"]
        for c in node.management("GET", "connections")
        if c.get("client_properties", {}).get("connection_name") == connection_name
    ]


# --- a frozen publisher (on the shared broker, in the test's vhost: nothing is reconfigured) ---

FROZEN_HEARTBEAT = 2


def publisher_main() -> None:
    """A router in a process of its own, driven by JSON lines on stdin; answers one line each.

    ``{"op": "send", "count": n}`` routes n donations; ``{"op": "fallback"}`` drains its
    fallback queues (moto lives in this process). Arguments: AMQP port, vhost, connection name.
    """
    from moto import mock_aws

    from tests.integration.aws_fallback import create_fallback_path

    port, vhost, connection_name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)d %(name)s %(message)s")
    with mock_aws():
        aws = create_fallback_path("fabric-frozen")
        router, _, _ = build_router(
            port, vhost, aws, heartbeat=FROZEN_HEARTBEAT, connection_name=connection_name
        )
        stream = Stream(router)
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "send":
                results = stream.send(command["count"])
                reply: dict[str, Any] = {
                    "results": [[r.message_id, r.status, r.transport] for r in results],
                    "sent": {r.message_id: DONATION for r in results},
                }
            else:
                reply = {
                    "copies": [
                        [c.group, c.emergency, c.message_id, c.body.decode()]
                        for c in fallback_copies(aws)
                    ]
                }
            print(json.dumps(reply), flush=True)


class Publisher:
    """The ``publisher_main`` process: ask it things, freeze it, let it go on."""

    def __init__(self, port: int, vhost: str, connection_name: str, stderr: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        fake_aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        env.update(fake_aws, AWS_DEFAULT_REGION=REGION)
        code = "from tests.integration.test_broker_drills import publisher_main; publisher_main()"
        self.stderr = stderr
        with stderr.open("wb") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, str(port), vhost, connection_name],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )

    def ask(self, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        process = self.process
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps(command).encode() + b"\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"the publisher did not answer: {self.stderr.read_text()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, count: int) -> tuple[list[MessageResult], dict[str, str]]:
        answer = self.ask({"op": "send", "count": count})
        results = [MessageResult(*result) for result in answer["results"]]
        return results, answer["sent"]

    def close(self) -> None:
        process = self.process
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def shared_connections(connection_name: str) -> list[str]:
    """The shared broker's open connections named ``connection_name`` (read-only)."""
    return [
        c["name"]
        for c in management("GET", "connections")
        if c.get("client_properties", {}).get("connection_name") == connection_name
    ]


def test_a_frozen_publisher_reconnects_once_and_publishes_to_rabbitmq(
    broker_vhost: str, tmp_path: Path
) -> None:
    name = f"fabric-frozen-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(AMQP[1], broker_vhost, name, tmp_path / "publisher.err")
    sent: dict[str, str] = {}
    results: list[MessageResult] = []
    try:
        before, ids = publisher.send(20)
        sent.update(ids)
        results += before
        assert {r.transport for r in before} == {"rabbitmq"}
        wait_for(lambda: len(shared_connections(name)) == 1, 10, "the publisher's connection")
        (frozen,) = shared_connections(name)
        os.kill(publisher.process.pid, signal.SIGSTOP)
        try:
            # Past its heartbeat, the broker gives up on the frozen process and closes.
            wait_for(
                lambda: not shared_connections(name),
                within=8 * FROZEN_HEARTBEAT,
                what="the broker closing the frozen publisher's connection",
            )
        finally:
            os.kill(publisher.process.pid, signal.SIGCONT)
        started = time.monotonic()
        after, ids = publisher.send(20)
        elapsed = time.monotonic() - started
        sent.update(ids)
        results += after
        assert {r.transport for r in after} == {"rabbitmq"}
        assert elapsed < 2, elapsed  # a connect, not a timeout first
        wait_for(
            lambda: len(shared_connections(name)) == 1,
            within=10,
            what=lambda: f"one new connection, open: {shared_connections(name)}",
        )
        assert shared_connections(name) != [frozen]
        fallback = publisher.ask({"op": "fallback"})["copies"]
    finally:
        publisher.close()
    assert publisher.process.returncode == 0, publisher.stderr.read_text()
    # It reconnected at the first attempt: no connect ever failed.
    assert "rabbitmq connect failed" not in publisher.stderr.read_text()
    copies = broker_copies(AMQP[1], broker_vhost) + [
        Copy(group, emergency, message_id, body.encode(), "fallback")
        for group, emergency, message_id, body in fallback
    ]
    assert_nothing_lost(sent, results, copies)
