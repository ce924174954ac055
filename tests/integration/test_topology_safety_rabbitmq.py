"""What the topology code may take away, on the real local RabbitMQ: the custom resource's
replacement (owner record), queues deleted on a statistics sample that missed a message,
recreated queues and their routes, and what the platform's broker users may do."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from types import SimpleNamespace
from typing import Any

import pika
import pika.exceptions
import pytest
from botocore.exceptions import ClientError

from fabric import topology, topology_resource
from fabric.adapters import management
from fabric.adapters.management import ManagementClient
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
from fabric.adapters.rabbitmq_overflow import RabbitMqOverflowQueue
from fabric.audit import AuditEvent, AuditRecord, encode_audit_batch
from fabric.audit_writer import batches_from_event
from fabric.bootstrap import exchange_for
from fabric.custom_resource import respond
from fabric.drain import PROBE_ROUTING_KEY
from fabric.errors import ManagementUnavailable
from fabric.ports import Failure, MessageKind, OutboundMessage
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name
from fabric.topology_apply import Kept, Resource, apply_topology, delete_topology
from fabric.topology_resource import on_event, owner_parameter
from tests.integration import test_management_api as api
from tests.integration import test_overflow_redrive as overflow_redrive
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT
from tests.integration.test_management_api import (
    DLX,
    UNROUTED_QUEUE,
    WORK,
    WORK_DLQ,
    Sandbox,
    _apply,
    _connect,
    _publish,
    _take_as_guest,
    _wait_for_sampled_counts,
    prepared_ahead,
)

pytestmark = pytest.mark.integration

client, sandbox = api.client, api.sandbox  # the real broker's fixtures
prepared, ahead = api.prepared, api.ahead  # sandboxes prepared when the module starts
moto_aws, deployed_redrive = overflow_redrive.moto_aws, overflow_redrive.deployed_redrive


def fast_client(interval: float = 0.2) -> ManagementClient:
    """A client that waits little for the statistics: right where nothing publishes meanwhile."""
    return ManagementClient(MANAGEMENT, *GUEST, statistics_interval=interval)


# --- 1. the custom resource's owner record ------------------------------------------------------


def test_the_owner_record_is_a_broker_wide_parameter_the_api_keeps(
    client: ManagementClient,
) -> None:
    name = owner_parameter(f"/fabric-test-{uuid.uuid4().hex[:8]}")  # a "/" and a ":" in it
    value = {"vhost": "/", "owners": ["fabric-test-topology-0123456789abcdef"]}
    try:
        client.put_global_parameter(name, value)

        assert client.get_global_parameter(name) == value
        assert client.delete_global_parameter(name) is True
        assert client.get_global_parameter(name) is None
        assert client.delete_global_parameter(name) is False
    finally:
        client.delete_global_parameter(name)


@pytest.fixture
def deployed(
    monkeypatch: pytest.MonkeyPatch, client: ManagementClient
) -> Iterator[SimpleNamespace]:
    """The topology function's settings for a vhost of its own, its users renamed for this test
    (users are broker-wide), their secrets in a fake Secrets Manager."""
    vhost = f"fabric-test-{uuid.uuid4().hex[:12]}"
    rename = {
        str(user["name"]): f"{vhost}-{user['name']}"
        for user in topology.definitions(default_routing_table())["users"]
    }
    passwords = {name: secrets.token_urlsafe(16) for name in rename.values()}
    original = topology_resource.topology_document

    def renamed(target: str) -> dict[str, Any]:
        document = original(target)
        document["users"] = [{**u, "name": rename[u["name"]]} for u in document["users"]]
        document["permissions"] = [
            {**p, "user": rename[p["user"]]} for p in document["permissions"]
        ]
        return document

    class Secrets:
        def get_secret_value(self, SecretId: str, VersionStage: str) -> dict[str, str]:
            if VersionStage == "AWSPENDING":
                raise ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "Get")
            user = SecretId.removeprefix("arn:")
            password = GUEST[1] if user == GUEST[0] else passwords[user]
            return {"SecretString": json.dumps({"username": user, "password": password})}

    monkeypatch.setattr(topology_resource, "topology_document", renamed)
    monkeypatch.setattr(topology_resource, "PLATFORM_USER", rename[topology.PLATFORM_USER])
    # Nothing publishes while these run: a short statistics wait is as good as the real one.
    monkeypatch.setattr(management, "STATISTICS_INTERVAL_S", 0.2)
    environ = {
        "MANAGEMENT_URL": MANAGEMENT,
        "ADMIN_SECRET_ARN": f"arn:{GUEST[0]}",
        "USER_SECRET_ARNS": json.dumps({name: f"arn:{name}" for name in rename.values()}),
        "FABRIC_ENV": "itest",
        "RABBITMQ_VHOST": vhost,
    }
    requests = iter(range(1, 100))

    def cloudformation(kind: str, physical_id: str | None, ids: dict[str, str]) -> dict[str, Any]:
        return {
            "RequestType": kind,
            "ResponseURL": "https://cloudformation-response.example/presigned",
            "StackId": f"arn:aws:cloudformation:ap-southeast-3:1:stack/{ids.get('stack', 'S')}/1",
            "LogicalResourceId": ids.get("logical_id", "Topology"),
            "RequestId": f"req-{next(requests)}",
            **({"PhysicalResourceId": physical_id} if physical_id else {}),
        }

    def request(kind: str, physical_id: str | None = None, **ids: str) -> tuple[str, Any]:
        return on_event(cloudformation(kind, physical_id, ids), environ, secrets_client=Secrets)

    def answer(
        kind: str,
        physical_id: str | None = None,
        *,
        through: Callable[[ManagementClient], Any] = lambda broker: broker,
        **ids: str,
    ) -> dict[str, Any]:
        """The function's answer to CloudFormation, its calls to the broker going ``through``."""
        event = cloudformation(kind, physical_id, ids)
        return respond(
            event,
            "stream-1",
            lambda *_: on_event(
                event,
                environ,
                client_factory=lambda *login: through(ManagementClient(*login)),
                secrets_client=Secrets,
            ),
            send=lambda *_: None,
        )

    yield SimpleNamespace(
        vhost=vhost,
        request=request,
        answer=answer,
        users=rename,
        platform=rename[topology.PLATFORM_USER],
        password=passwords[rename[topology.PLATFORM_USER]],
    )
    try:
        client.delete_vhost(vhost)
        client.delete_global_parameter(owner_parameter(vhost))
    finally:
        for name in rename.values():
            client.delete_user(name)


def the_router_logs_in(vhost: str, user: str, password: str) -> bool:
    """The platform's login works and may publish: the drain's probe, which no queue takes, is
    returned, not refused (nothing is stored: the Delete after must find the queues empty)."""
    connection = _connect(vhost, user, password)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            channel.basic_publish(
                topology.REDELIVER_EXCHANGE, PROBE_ROUTING_KEY, b"", mandatory=True
            )
    finally:
        connection.close()
    return True


def test_replacing_the_topology_resource_keeps_the_routers_login_and_the_queues(
    client: ManagementClient, deployed: SimpleNamespace
) -> None:
    old, _ = deployed.request("Create")
    new, _ = deployed.request("Create", logical_id="TopologyV2")  # a refactor renamed it
    queues = {q["name"] for q in client.list_queues(deployed.vhost)}

    _, data = deployed.request("Delete", old)  # CloudFormation's cleanup of the old one

    assert data == {"Deleted": "0", "Kept": "0"}
    assert the_router_logs_in(deployed.vhost, deployed.platform, deployed.password)
    assert {q["name"] for q in client.list_queues(deployed.vhost)} == queues
    assert client.get_global_parameter(owner_parameter(deployed.vhost)) == {
        "vhost": deployed.vhost,
        "owners": [new],
    }

    _, data = deployed.request("Delete", new)  # the stack's Delete, later: the last owner

    # The topology goes (queues whose count is not sampled yet stay, as always).
    assert int(data["Deleted"]) > 0
    assert client.get_user(deployed.platform) is None
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        the_router_logs_in(deployed.vhost, deployed.platform, deployed.password)
    assert client.get_global_parameter(owner_parameter(deployed.vhost)) is None


class Meddled:
    """The real broker as one request reaches it, except for ``method``: ``instead`` runs
    in its place, the first time."""

    def __init__(self, broker: ManagementClient, method: str, instead: Callable[..., Any]) -> None:
        self._broker, self._method, self._instead = broker, method, instead
        self._done = False

    @property
    def username(self) -> str:
        return self._broker.username

    def __getattr__(self, name: str) -> Any:
        if name != self._method or self._done:
            return getattr(self._broker, name)
        self._done = True
        return partial(self._instead, getattr(self._broker, name))


def test_the_old_stacks_delete_during_the_new_stacks_create_leaves_the_router_its_login(
    client: ManagementClient, deployed: SimpleNamespace
) -> None:
    # A move to another stack, both stacks deployed at once: the old stack's Delete comes while
    # the new stack's Create applies a change.
    old, _ = deployed.request("Create")
    assert client.delete_user(deployed.users[user_name(Stakeholder.MEDIA)])
    deleted: list[Any] = []

    def delete_old_first(put_user: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        deleted.append(deployed.request("Delete", old)[1])
        put_user(*args, **kwargs)

    new = deployed.answer(
        "Create", through=lambda b: Meddled(b, "put_user", delete_old_first), stack="S2"
    )

    assert new["Status"] == "SUCCESS"
    assert deleted == [{"Deleted": "0", "Kept": "0"}]
    assert the_router_logs_in(deployed.vhost, deployed.platform, deployed.password)
    assert client.get_global_parameter(owner_parameter(deployed.vhost)) == {
        "vhost": deployed.vhost,
        "owners": [new["PhysicalResourceId"]],
    }


def test_a_first_create_that_fails_part_way_leaves_the_next_resource_the_only_owner(
    client: ManagementClient, deployed: SimpleNamespace
) -> None:
    def deadline_passed(*_args: Any, **_kwargs: Any) -> None:
        raise ManagementUnavailable("deadline", method="PUT", path="permissions")

    failed = deployed.answer(
        "Create", through=lambda b: Meddled(b, "put_permissions", deadline_passed)
    )
    assert failed["Status"] == "FAILED"
    assert client.get_user(deployed.platform) is not None  # made before it failed

    rollback = deployed.answer("Delete", failed["PhysicalResourceId"])

    assert rollback["Status"] == "SUCCESS"
    assert client.get_user(deployed.platform) is None, "the rollback removed what it left"
    owner, _ = deployed.request("Create")  # the next deploy
    assert client.get_global_parameter(owner_parameter(deployed.vhost)) == {
        "vhost": deployed.vhost,
        "owners": [owner],
    }
    deployed.request("Delete", owner)  # the stack's Delete
    assert client.get_user(deployed.platform) is None
    assert client.get_global_parameter(owner_parameter(deployed.vhost)) is None


# --- 2. deleting queues on a sample that missed a message ---------------------------------------


@prepared_ahead(_apply)
def test_delete_keeps_a_queue_whose_confirmed_message_the_last_sample_missed(
    client: ManagementClient, ahead: Sandbox
) -> None:
    # The one test that waits the broker's real statistics interval (three times 5 s).
    sandbox = ahead  # applied
    _wait_for_sampled_counts(client, sandbox.vhost, {WORK: 0, WORK_DLQ: 0, UNROUTED_QUEUE: 0})
    _publish(sandbox, "case.opened", b"confirmed after the last sample")

    report = delete_topology(ManagementClient(MANAGEMENT, *GUEST), sandbox.document, sandbox.vhost)

    assert Kept(Resource.QUEUE, WORK, "holds 1 messages") in report.kept
    assert (Resource.QUEUE, UNROUTED_QUEUE) in report.deleted
    # Its dead letters still reach its DLQ: kept, and bound again after the count.
    assert {(b["source"], b["destination"]) for b in client.list_bindings(sandbox.vhost)} >= {
        (DLX, WORK_DLQ)
    }
    assert _take_as_guest(client, sandbox.vhost, WORK) == b"confirmed after the last sample"


def fanout_document(vhost: str, exchange: str, queues: list[str], limit: int) -> dict[str, Any]:
    return {
        "exchanges": [
            {
                "name": exchange,
                "vhost": vhost,
                "type": "fanout",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
        ],
        "queues": [
            {
                "name": name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                # The first and the last are recreated when the limit changes.
                "arguments": {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": limit if name in (queues[0], queues[-1]) else 10,
                },
            }
            for name in queues
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": name,
                "destination_type": "queue",
                "routing_key": "",
                "arguments": {},
            }
            for name in queues
        ],
    }


FANOUT = ("fabric.x.fan", "fabric.a", "fabric.b", "fabric.z")  # exchange, then its queues


def _apply_fanout(client: ManagementClient, sandbox: Sandbox) -> None:
    exchange, *names = FANOUT
    document = fanout_document(sandbox.vhost, exchange, names, 10)
    apply_topology(client, document, passwords={}, vhost=sandbox.vhost)


@prepared_ahead(_apply_fanout)
def test_a_recreated_queue_has_its_route_back_before_the_next_queue_is_recreated(
    client: ManagementClient, ahead: Sandbox
) -> None:
    vhost = ahead.vhost  # the fanout document applied, its queue limits 10
    exchange, recreated, other, last = FANOUT
    names = [recreated, other, last]
    _wait_for_sampled_counts(client, vhost, dict.fromkeys(names, 0))
    publisher = _connect(vhost, *GUEST)
    channel = publisher.channel()
    channel.confirm_delivery()

    class PublishesMeanwhile(ManagementClient):
        """A producer publishes while the last queue is being recreated."""

        def delete_queue(self, target: str, name: str) -> bool:
            if name == last:
                channel.basic_publish(
                    exchange,
                    "",
                    b"routed meanwhile",
                    pika.BasicProperties(delivery_mode=2),
                    mandatory=True,
                )  # confirmed: some queue took it
            return super().delete_queue(target, name)

    try:
        apply_topology(
            PublishesMeanwhile(MANAGEMENT, *GUEST, statistics_interval=0.2),
            fanout_document(vhost, exchange, names, 11),
            passwords={},
            vhost=vhost,
            recreate_empty=True,
        )
    finally:
        publisher.close()

    assert _take_as_guest(client, vhost, other) == b"routed meanwhile"
    assert _take_as_guest(client, vhost, recreated) == b"routed meanwhile"
    recreated_queue = client.get_queue(vhost, recreated)
    assert recreated_queue is not None
    assert recreated_queue["arguments"]["x-delivery-limit"] == 11


# --- 3. what the platform's users may do ---------------------------------------------------------

PLATFORM_USERS = (topology.PLATFORM_USER, topology.REDRIVE_USER, topology.AUDIT_READER_USER)


@pytest.fixture
def platform(client: ManagementClient, sandbox: Sandbox) -> Iterator[SimpleNamespace]:
    """The generated topology in the sandbox's vhost with the platform's three users (renamed:
    users are broker-wide) and their generated permissions: ``login[name]`` is the renamed
    user's (user, password), ``settings(name)`` its ``RabbitSettings``."""
    vhost = sandbox.vhost
    login = {name: (f"{vhost}-{name}", secrets.token_urlsafe(16)) for name in PLATFORM_USERS}
    document = topology.definitions(default_routing_table(), vhost=vhost)
    document["users"] = [{"name": login[name][0], "tags": []} for name in PLATFORM_USERS]
    document["permissions"] = [
        {**p, "user": login[p["user"]][0]} for p in document["permissions"] if p["user"] in login
    ]
    apply_topology(fast_client(), document, passwords=dict(login.values()), vhost=vhost)

    def settings(name: str) -> RabbitSettings:
        return RabbitSettings(
            host=AMQP[0],
            port=AMQP[1],
            credentials=lambda: login[name],
            vhost=vhost,
            confirm_timeout=5.0,
        )

    try:
        yield SimpleNamespace(vhost=vhost, login=login, settings=settings)
    finally:
        for user, _password in login.values():
            client.delete_user(user)


def test_no_platform_user_can_declare_delete_purge_or_rebind_beyond_what_it_reads(
    client: ManagementClient, platform: SimpleNamespace
) -> None:
    group = Stakeholder.MEDIA
    work, dlq = topology.queue_name(group), topology.dead_letter_queue_name(group)
    government = topology.queue_name(Stakeholder.GOVERNMENT)
    emergency = topology.queue_name(Stakeholder.GOVERNMENT, emergency=True)
    gate = topology.group_exchange_name(Stakeholder.GOVERNMENT, emergency=True)
    (gate_binding,) = [
        b
        for b in topology.definitions(default_routing_table())["bindings"]
        if (b["source"], b["destination"]) == (gate, emergency)
    ]
    guest = _connect(platform.vhost, *GUEST).channel()
    guest.confirm_delivery()
    kept = (emergency, topology.UNROUTED_QUEUE, dlq, topology.OVERFLOW_QUEUE, topology.AUDIT_QUEUE)
    for queue in kept:  # a message each that a purge would take
        guest.basic_publish("", queue, b"kept", pika.BasicProperties(delivery_mode=2))
    # Purge needs read on the queue: the router's user reads none, the redrive reads only the
    # DLQs and the overflow queue, the audit reader only the audit queue.
    purges = {
        topology.PLATFORM_USER: (work, emergency, topology.UNROUTED_QUEUE, dlq, *kept[3:]),
        topology.REDRIVE_USER: (work, emergency, topology.UNROUTED_QUEUE, topology.AUDIT_QUEUE),
        topology.AUDIT_READER_USER: (work, emergency, topology.UNROUTED_QUEUE, dlq, kept[3]),
    }

    codes: dict[str, int] = {}
    for name in PLATFORM_USERS:
        connection = _connect(platform.vhost, *platform.login[name])

        def reply_code(attempt: Callable[[Any], object], c: Any = connection) -> int:
            """The code the broker closes a new channel with for ``attempt``; 0: it was done."""
            try:
                attempt(c.channel())
            except pika.exceptions.ChannelClosedByBroker as closed:
                return int(closed.reply_code)
            return 0

        try:
            codes |= {
                f"{name} queue.delete": reply_code(lambda c: c.queue_delete(work)),
                f"{name} queue.declare": reply_code(
                    lambda c: c.queue_declare("fabric.sneaky", durable=True)
                ),
                **{
                    f"{name} queue.purge {queue}": reply_code(lambda c, q=queue: c.queue_purge(q))
                    for queue in purges[name]
                },
                # Binding and unbinding need read on the source exchange: none grants it.
                f"{name} queue.bind": reply_code(
                    lambda c: c.queue_bind(work, topology.INGRESS_EXCHANGE, "case.#")
                ),
                f"{name} queue.unbind": reply_code(
                    lambda c: c.queue_unbind(emergency, gate, arguments=gate_binding["arguments"])
                ),
                f"{name} exchange.bind": reply_code(
                    lambda c: c.exchange_bind(
                        topology.group_exchange_name(group), topology.INGRESS_EXCHANGE, "case.#"
                    )
                ),
            }
        finally:
            connection.close()
    assert codes == dict.fromkeys(codes, 403)  # ACCESS_REFUSED, each one

    # Nothing purged, and the routing as generated: a restricted case reaches government alone,
    # and government's emergency traffic still reaches its emergency queue.
    everyone = pika.BasicProperties(
        delivery_mode=2, headers={topology.AUDIENCE_HEADER: topology.ALL_AUDIENCE}
    )
    for topic in ("case.opened", "child-safety.alert.public"):
        guest.basic_publish(topology.INGRESS_EXCHANGE, topic, b"{}", everyone, mandatory=True)
    depth = {
        q: guest.queue_declare(q, passive=True).method.message_count
        for q in (work, government, *kept)
    }
    guest.connection.close()
    assert depth == {
        work: 0,
        government: 1,
        emergency: 2,
        topology.UNROUTED_QUEUE: 1,
        dlq: 1,
        topology.OVERFLOW_QUEUE: 1,
        topology.AUDIT_QUEUE: 1,
    }
    assert client.get_queue(platform.vhost, "fabric.sneaky") is None


def test_what_the_platform_functions_do_on_the_broker_their_users_permissions_allow(
    platform: SimpleNamespace,
) -> None:
    # Every broker operation done with its function's credentials, as its code does it: the
    # router, drain and replay publish as the platform user (fabric.bootstrap.exchange_for; the
    # drain's probe comes back unrouted); the audit writer's event source consumes fabric.audit
    # as the audit reader; the redrive takes a dead letter back to its work queue and overflow
    # letters back to their terminal queues as its own user, a platform audit batch among them.
    router, redrive = (
        platform.settings(topology.PLATFORM_USER),
        platform.settings(topology.REDRIVE_USER),
    )
    gov, media = Stakeholder.GOVERNMENT, Stakeholder.MEDIA
    everyone = {topology.AUDIENCE_HEADER: topology.ALL_AUDIENCE}
    messages = [
        OutboundMessage("routed", "case.opened", b"{}", frozenset({gov}), headers=everyone),
        OutboundMessage(
            "emergency",
            "child-safety.alert.public",
            b"{}",
            frozenset({gov}),
            emergency=True,
            headers=everyone,
        ),
        OutboundMessage("unroutable", "nothing.routes.this", b"{}", frozenset()),
        # No binding takes it: the ingress exchange's alternate exchange does.
        OutboundMessage(
            "unbound", "nothing.routes.this", b"{}", frozenset({media}), headers=everyone
        ),
        OutboundMessage("audit", "audit", b"batch", frozenset(), kind=MessageKind.AUDIT),
        OutboundMessage(
            "redelivered",
            "case.opened",
            b"{}",
            frozenset({media}),
            redeliver_to=topology.queue_name(media),
        ),
    ]
    probe = OutboundMessage(
        "probe", PROBE_ROUTING_KEY, b"", frozenset(), redeliver_to=PROBE_ROUTING_KEY
    )
    publisher = RabbitMqTransport(router, exchange_for=exchange_for)
    try:
        outcomes = publisher.publish(messages)
        (probed,) = publisher.publish([probe])
    finally:
        publisher.close()
    assert [o.message_id for o in outcomes if not o.stored] == []
    assert probed.failure is Failure.RETURNED  # taken, and stored nowhere

    reader = _connect(platform.vhost, *platform.login[topology.AUDIT_READER_USER])
    try:
        channel = reader.channel()
        method, properties, body = next(channel.consume(topology.AUDIT_QUEUE, inactivity_timeout=5))
        # The audit writer gives up on it: it goes on to the overflow queue, user-id and all.
        channel.basic_reject(method.delivery_tag, requeue=False)
        channel.cancel()
    finally:
        reader.close()
    platform_user = platform.login[topology.PLATFORM_USER][0]
    assert (body, properties.user_id) == (b"batch", platform_user)

    guest = _connect(platform.vhost, *GUEST).channel()
    guest.confirm_delivery()
    work_dlq = topology.dead_letter_queue_name(media)
    emergency_dlq = topology.dead_letter_queue_name(gov, emergency=True)
    guest.basic_publish(
        topology.DEAD_LETTER_EXCHANGE,
        topology.queue_name(gov, emergency=True),
        b"parked",
        pika.BasicProperties(delivery_mode=2, message_id="dead", type="child-safety.alert.public"),
        mandatory=True,
    )
    guest.basic_publish(
        topology.OVERFLOW_EXCHANGE,
        work_dlq,  # the terminal queue it came from
        b"overflowed",
        pika.BasicProperties(delivery_mode=2, message_id="overflowed", type="case.opened"),
        mandatory=True,
    )
    deadline = time.monotonic() + 10  # at-least-once dead-lettering moves the batch a bit later
    while guest.queue_declare(topology.OVERFLOW_QUEUE, passive=True).method.message_count < 2:
        assert time.monotonic() < deadline, "the rejected batch never reached fabric.overflow"
        time.sleep(0.05)

    redrive_user = platform.login[topology.REDRIVE_USER][0]
    dead = RabbitMqDeadLetterQueue(
        redrive, emergency_dlq, origin=RabbitMqTransport(redrive, exchange_for=exchange_for)
    )
    overflow = RabbitMqOverflowQueue(redrive, trusted={platform_user, redrive_user})
    for queue, count in ((dead, 1), (overflow, 2)):
        try:
            letters = queue.peek(10)
            assert [letter.stays for letter in letters] == [None] * count
            assert queue.move(letters) == letters
            assert queue.remove(letters) == {letter.handle for letter in letters}
        finally:
            queue.release()

    queues = {
        topology.queue_name(gov): 1,
        topology.queue_name(gov, emergency=True): 2,  # the alert, and the letter redriven
        topology.queue_name(media): 1,  # redelivered
        topology.UNROUTED_QUEUE: 2,
        topology.AUDIT_QUEUE: 1,  # the batch, back
        emergency_dlq: 0,
        topology.OVERFLOW_QUEUE: 0,
        work_dlq: 1,  # back from the overflow queue
    }
    depth = {q: guest.queue_declare(q, passive=True).method.message_count for q in queues}
    assert depth == queues
    # The batch is back as the redrive's, which the audit writer trusts as it did the platform's.
    _method, properties, body = guest.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
    guest.connection.close()
    assert (body, properties.message_id, properties.user_id) == (b"batch", "audit", redrive_user)


def test_a_consumers_overflowed_audit_batch_stays_where_the_redrive_cannot_vouch_for_it(
    client: ManagementClient, platform: SimpleNamespace
) -> None:
    # A stakeholder's consumer records carry its group's user-id: put back as the redrive's they
    # would be trusted with any event, put back without one refused. The letter stays.
    group_user, password = f"{platform.vhost}-{user_name(Stakeholder.MEDIA)}", "pw-" + "x" * 12
    client.put_user(group_user, password=password, tags=[])
    client.put_permissions(
        platform.vhost, group_user, configure="^$", write=topology.OVERFLOW_EXCHANGE, read="^$"
    )
    try:
        consumer = _connect(platform.vhost, group_user, password).channel()
        consumer.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            topology.AUDIT_QUEUE,
            b"consumer batch",
            pika.BasicProperties(delivery_mode=2, message_id="batch-2", user_id=group_user),
        )
        consumer.connection.close()
        trusted = {platform.login[n][0] for n in (topology.PLATFORM_USER, topology.REDRIVE_USER)}
        overflow = RabbitMqOverflowQueue(platform.settings(topology.REDRIVE_USER), trusted=trusted)
        try:
            (letter,) = overflow.peek(10)
            assert group_user in str(letter.stays)
            assert overflow.move([letter]) == []
            assert overflow.remove([letter]) == set()
        finally:
            overflow.release()
    finally:
        client.delete_user(group_user)
    guest = _connect(platform.vhost, *GUEST).channel()
    depth = {
        q: guest.queue_declare(q, passive=True).method.message_count
        for q in (topology.OVERFLOW_QUEUE, topology.AUDIT_QUEUE)
    }
    guest.connection.close()
    assert depth == {topology.OVERFLOW_QUEUE: 1, topology.AUDIT_QUEUE: 0}


def test_the_wired_redrive_works_as_its_own_user_and_the_writer_takes_its_records(
    platform: SimpleNamespace, moto_aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The redrive function as it is wired (ledger, audit sink, overflow re-signing by default),
    # logged in as the generated fabric-redrive; the audit reader takes its batches from
    # fabric.audit and the audit writer judges them with its default trust, the renamed users
    # standing for the real ones.
    renamed = tuple(platform.login[name][0] for name in topology.TRUSTED_AUDIT_PUBLISHERS)
    monkeypatch.setattr(topology, "TRUSTED_AUDIT_PUBLISHERS", renamed)
    platform_user, redrive_user = renamed
    media = Stakeholder.MEDIA
    publisher = RabbitMqTransport(
        platform.settings(topology.PLATFORM_USER), exchange_for=exchange_for
    )
    accepted = AuditRecord(AuditEvent.ACCEPTED, datetime.now(UTC), str(uuid.uuid4()), "media")
    body = encode_audit_batch([accepted], emitted_by="router")
    batch = OutboundMessage("batch-1", "audit", body, frozenset(), kind=MessageKind.AUDIT)
    try:
        assert [o.stored for o in publisher.publish([batch])] == [True]
    finally:
        publisher.close()
    guest = _connect(platform.vhost, *GUEST).channel()
    guest.confirm_delivery()
    method, _properties, _body = guest.basic_get(topology.AUDIT_QUEUE)
    guest.basic_reject(method.delivery_tag, requeue=False)  # into fabric.overflow
    letter_id = str(uuid.uuid4())
    guest.basic_publish(
        topology.DEAD_LETTER_EXCHANGE,
        topology.queue_name(media),
        b"{}",
        pika.BasicProperties(delivery_mode=2, message_id=letter_id, type="case.opened"),
        mandatory=True,
    )
    deadline = time.monotonic() + 10
    while guest.queue_declare(topology.OVERFLOW_QUEUE, passive=True).method.message_count < 1:
        assert time.monotonic() < deadline, "the rejected batch never reached fabric.overflow"
        time.sleep(0.05)

    runtime = deployed_redrive(platform.vhost, login=platform.login[topology.REDRIVE_USER])
    for queue in (topology.OVERFLOW_QUEUE, topology.dead_letter_queue_name(media)):
        report = runtime.redriver.run(runtime.queue("rabbitmq", queue)).to_dict()
        assert (report["moved"], report["left"], report["stopped"]) == (1, 0, "empty"), queue

    reader = _connect(platform.vhost, *platform.login[topology.AUDIT_READER_USER]).channel()
    messages = []
    while (got := reader.basic_get(topology.AUDIT_QUEUE, auto_ack=True))[0] is not None:
        _method, properties, body = got
        messages.append(
            {
                "basicProperties": {
                    "messageId": properties.message_id,
                    "userId": properties.user_id,
                },
                "data": base64.b64encode(body).decode(),
            }
        )
    reader.connection.close()
    guest.connection.close()
    event = {"eventSource": "aws:rmq", "rmqMessagesByQueue": {topology.AUDIT_QUEUE: messages}}
    written = batches_from_event(event, trusted=frozenset(renamed))

    # The platform's batch back under the redrive's user-id, keeping its id, and the redrive's
    # own `redriven` records: all taken, none refused.
    events = {
        (batch_id if batch_id == "batch-1" else "redrive", record["event"], record["publisher"])
        for batch_id, written_batch in written
        for record in written_batch.records
    }
    assert events == {
        ("batch-1", "accepted", redrive_user),
        ("redrive", "redriven", redrive_user),
    }
    assert platform_user not in {m["basicProperties"]["userId"] for m in messages}
