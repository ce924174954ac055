"""The local fabric: the dev router in-process on the real local RabbitMQ and an embedded moto.

What it does, in order:

1. starts moto's server on a free loopback port (the AWS emulator) and points boto3 at it;
2. reads the synthesized dev templates and creates in moto what the router needs from them: the
   messages KMS key and one Secrets Manager secret per broker user;
3. applies the topology generated from the routing table to the local RabbitMQ, in its own
   vhost, with those users' passwords, through the management API (as the custom resource does);
4. builds the router from the environment variables the dev template gives the router function,
   with the broker's address replaced by the local one (printed);
5. plays a scenario through the three entry points, consumes every stakeholder queue as that
   stakeholder's own broker user, and prints what arrived where, with latencies, and every
   rejection with its reason;
6. plays the poison-message act: a consumer (the consumer toolkit, as a stakeholder's broker
   user, idempotent on DynamoDB) fails on a message, which is retried in growing delay tiers,
   dead-lettered after the attempt limit, redriven by the redrive function's code after the
   "fix", and processed exactly once (exit 1 otherwise);
7. plays the failover act: the broker becomes unreachable (a fault-injecting loopback proxy
   turns into a silent black hole), messages are accepted through the SNS/SQS fallback, the
   broker returns, the drain function's code moves them back, and the summary shows counts per
   transport and that nothing was lost (exit 1 if anything was);
8. writes the audit trail: every audit batch the run's components put on the audit queue goes
   through the audit writer into the Object Lock audit bucket (as the dev template declares it);
   the replay function's code re-publishes the last hour's child-safety messages from the
   archive those batches made (a dry run first), and its records are written too; the trail is
   sealed by a checkpoint signed with the signing key, read back and verified (exit 1 if the
   verifier finds anything); then the compliance report function's handler reports the run's
   day into the reports bucket and the compliance topic (both in moto, as the dev template
   declares them) and the report is copied to build/reports/compliance-dev.{html,json,csv}.

Usage: python scripts/local_fabric.py [cdk.out] [--keep]   (--keep leaves the vhost for a look)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
REGION = "ap-southeast-3"
LOCAL_VHOST = "fabric-dev-local"
MANAGEMENT_URL = "http://127.0.0.1:15672"
ROUTER_DESCRIPTION = "validates, protects and routes messages"
DRAIN_DESCRIPTION = "drains the fallback queues into RabbitMQ"
REDRIVE_DESCRIPTION = "redrives dead letters to where they came from"
REPLAY_DESCRIPTION = "replays archived messages of a period"
# The audit writer of this run: its own chain in the local audit bucket.
LOCAL_WRITER = "local-writer"
MOTO_ACCOUNT = "123456789012"


# -- the synthesized templates ----------------------------------------------------------------


def dev_templates(assembly: Path) -> dict[str, dict[str, Any]]:
    """The dev stage's templates by stack id (``Stateful``, ``Services``)."""
    stage = assembly / "assembly-dev"
    manifest = json.loads((stage / "manifest.json").read_text())
    templates = {}
    for artifact in manifest["artifacts"].values():
        if artifact["type"] == "aws:cloudformation:stack":
            stack_id = artifact["displayName"].split("/")[-1]
            path = stage / artifact["properties"]["templateFile"]
            templates[stack_id] = json.loads(path.read_text())
    return templates


class Resolver:
    """Resolves the intrinsics of the router's environment against local stand-ins."""

    def __init__(self, templates: dict[str, dict[str, Any]], physical: dict[str, str]) -> None:
        self._templates = templates
        self._physical = physical  # logical id -> local ARN / value

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str | int | float):
            return str(value)
        (function, argument), *_ = value.items()
        if function == "Ref":
            pseudo = {
                "AWS::Region": REGION,
                "AWS::URLSuffix": "amazonaws.com",
                "AWS::AccountId": MOTO_ACCOUNT,
                "AWS::Partition": "aws",
            }
            return pseudo.get(argument, self._physical.get(argument, f"<{argument}>"))
        if function == "Fn::GetAtt":
            name = f"{argument[0]}.{argument[1]}"
            return self._physical.get(name, self._physical.get(argument[0], f"<{name}>"))
        if function == "Fn::Join":
            return argument[0].join(self.resolve(part) for part in argument[1])
        if function == "Fn::GetStackOutput":
            output = self._templates["Stateful"]["Outputs"][argument["OutputName"]]
            return self.resolve(output["Value"])
        if function == "Fn::ImportValue":
            for output in self._templates["Stateful"]["Outputs"].values():
                if output.get("Export", {}).get("Name") == argument:
                    return self.resolve(output["Value"])
        raise ValueError(f"cannot resolve {function} locally")


def function_environment(
    templates: dict[str, dict[str, Any]], description: str = ROUTER_DESCRIPTION
) -> dict[str, Any]:
    """The raw ``Environment.Variables`` of the function in the Services template whose
    description contains ``description`` (the router's by default)."""
    for resource in templates["Services"]["Resources"].values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Lambda::Function" and description in str(
            props.get("Description")
        ):
            return dict(props["Environment"]["Variables"])
    raise LookupError(f"no function that {description} in the dev Services template")


# -- moto --------------------------------------------------------------------------------------


def start_moto() -> Any:
    """Start moto's server on a free loopback port and point boto3 at it (fake credentials)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per AWS call

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }
    )
    return server


def create_aws_resources(
    templates: dict[str, dict[str, Any]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Create in moto what the router uses: the messages key, the broker users' secrets, the
    fallback topics with their filtered group queues. (logical id -> ARN, user -> password)."""
    import boto3

    stateful = templates["Stateful"]["Resources"]
    kms = boto3.client("kms")
    manager = boto3.client("secretsmanager")
    sns = boto3.client("sns")
    sqs = boto3.client("sqs")
    dynamodb = boto3.client("dynamodb")
    physical: dict[str, str] = {}
    passwords: dict[str, str] = {}
    for logical_id, resource in stateful.items():
        props = resource.get("Properties", {})
        kind = resource["Type"]
        if kind == "AWS::KMS::Key" and "restricted payloads" in props.get("Description", ""):
            physical[logical_id] = kms.create_key(Description=props["Description"])["KeyMetadata"][
                "Arn"
            ]
        elif kind == "AWS::SecretsManager::Secret":
            username = json.loads(props["GenerateSecretString"]["SecretStringTemplate"])["username"]
            password = secrets.token_urlsafe(24)
            passwords[username] = password
            physical[logical_id] = manager.create_secret(
                Name=f"fabric-dev-local/{username}",
                SecretString=json.dumps({"username": username, "password": password}),
            )["ARN"]
        elif kind == "AWS::SNS::Topic":
            physical[logical_id] = sns.create_topic(Name=props["TopicName"])["TopicArn"]
        elif kind == "AWS::KMS::Key" and props.get("KeyUsage") == "SIGN_VERIFY":
            physical[logical_id] = kms.create_key(
                Description=props.get("Description", ""),
                KeyUsage="SIGN_VERIFY",
                KeySpec=props["KeySpec"],
            )["KeyMetadata"]["Arn"]
        elif kind == "AWS::S3::Bucket" and props.get("ObjectLockEnabled"):
            name = f"fabric-dev-local-{logical_id.lower()}"
            s3 = boto3.client("s3")
            s3.create_bucket(
                Bucket=name,
                CreateBucketConfiguration={"LocationConstraint": REGION},
                ObjectLockEnabledForBucket=True,
            )
            s3.put_object_lock_configuration(
                Bucket=name, ObjectLockConfiguration=props["ObjectLockConfiguration"]
            )
            physical[logical_id] = name
        elif kind == "AWS::DynamoDB::Table":
            dynamodb.create_table(
                TableName=props["TableName"],
                KeySchema=props["KeySchema"],
                AttributeDefinitions=props["AttributeDefinitions"],
                BillingMode="PAY_PER_REQUEST",
            )
            physical[logical_id] = props["TableName"]
        elif kind == "AWS::SQS::Queue" and "QueueName" in props:
            url = sqs.create_queue(QueueName=props["QueueName"])["QueueUrl"]
            physical[logical_id] = url
            physical[f"{logical_id}.Arn"] = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
    for resource in stateful.values():
        if resource["Type"] == "AWS::SNS::Subscription":
            props = resource["Properties"]
            sns.subscribe(
                TopicArn=physical[props["TopicArn"]["Ref"]],
                Protocol="sqs",
                Endpoint=physical[f"{props['Endpoint']['Fn::GetAtt'][0]}.Arn"],
                Attributes={
                    "RawMessageDelivery": "true",
                    "FilterPolicy": json.dumps(props["FilterPolicy"]),
                },
            )
    return physical, passwords


# -- the broker ----------------------------------------------------------------------------------


def apply_local_topology(passwords: dict[str, str]) -> dict[str, Any]:
    """Apply the routing table's topology to LOCAL_VHOST on the local broker (fresh each run)."""
    from fabric.adapters.management import ManagementClient
    from fabric.routing import default_routing_table
    from fabric.topology import definitions
    from fabric.topology_apply import apply_topology

    client = ManagementClient(MANAGEMENT_URL, "guest", "guest")
    client.delete_vhost(LOCAL_VHOST)
    document = definitions(default_routing_table(), vhost=LOCAL_VHOST)
    known = {user["name"] for user in document["users"]}
    apply_topology(
        client,
        document,
        passwords={name: pwd for name, pwd in passwords.items() if name in known},
        vhost=LOCAL_VHOST,
    )
    return document


def drop_local_topology(document: dict[str, Any]) -> None:
    """Remove the local vhost and the users the run created."""
    from fabric.adapters.management import ManagementClient

    client = ManagementClient(MANAGEMENT_URL, "guest", "guest")
    client.delete_vhost(LOCAL_VHOST)
    for user in document["users"]:
        client.delete_user(user["name"])


# -- the scenario --------------------------------------------------------------------------------


def envelope(topic: str, payload: Any, **fields: Any) -> dict[str, Any]:
    return {"message_id": str(uuid.uuid4()), "topic": topic, "payload": payload, **fields}


def http_event(body: Any, group: str) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "POST /v1/messages",
        "requestContext": {"authorizer": {"jwt": {"claims": {"fabric:group": group}}}},
        "body": body if isinstance(body, str) else json.dumps(body),
        "isBase64Encoded": False,
    }


def sqs_event(bodies: list[str], group: str, prefix: str) -> dict[str, Any]:
    arn = f"arn:aws:sqs:{REGION}:000000000000:{prefix}{group}"
    return {
        "Records": [
            {"messageId": f"sqs-{i}", "body": body, "eventSource": "aws:sqs", "eventSourceARN": arn}
            for i, body in enumerate(bodies)
        ]
    }


def routed_queues(item: dict[str, Any], source: str) -> set[str]:
    """The stakeholder queues the routing table sends an accepted message to: where a copy of it
    must arrive."""
    from fabric import topology
    from fabric.envelope import Envelope, validate_envelope
    from fabric.routing import default_routing_table

    checked = validate_envelope(item, source)
    if not isinstance(checked, Envelope):
        raise RuntimeError(f"an accepted message does not validate: {checked}")
    return set(topology.routed_queues(default_routing_table().deliveries(checked)))


def play(
    runtime: Any, function_arn: str
) -> tuple[dict[str, float], dict[str, set[str]], list[tuple[str, str, str]]]:
    """Run the scenario; (message id -> time it was handed to the router, message id -> the
    queues it must arrive in, rejections)."""
    from fabric.entrypoints import dispatch

    sent: dict[str, float] = {}
    copies: dict[str, set[str]] = {}
    rejected: list[tuple[str, str, str]] = []
    prefix = runtime.settings.ingest_queue_prefix
    now = datetime.now(UTC)

    def record(
        label: str, items: list[dict[str, Any]], results: list[dict[str, Any]], at: float
    ) -> None:
        for item, result in zip(items, results, strict=True):
            if result["status"] == "accepted":
                sent[result["message_id"]] = at
                copies[result["message_id"]] = routed_queues(item, label.split("/", 1)[1])
            else:
                rejected.append(
                    (label, result.get("reason", "?"), str(result.get("detail", ""))[:70])
                )

    # 1. An emergency: a child reported missing, from a community worker's app over HTTPS.
    alert = envelope(
        "child-safety.incident.reported",
        {"summary": "child reported missing near SDN 05 school", "child_name": "Siti R.", "age": 9},
        priority="emergency",
        classification="restricted",
        occurred_at=now.isoformat(),
    )
    started = time.monotonic()
    response = dispatch(http_event(alert, "community"), function_arn, runtime)
    record("https/community", [alert], json.loads(response["body"])["results"], started)
    print(f"  emergency alert over HTTPS: HTTP {response['statusCode']}")

    # 2. A restricted case update from the government case system, by direct invoke (its alias).
    update = envelope(
        "case.assessment.updated",
        {"case": "C-2026-0001", "risk": "high", "social_worker": "W-118"},
        classification="restricted",
    )
    started = time.monotonic()
    result = dispatch({"messages": [update]}, f"{function_arn}:government", runtime)
    record("direct/government", [update], result["results"], started)
    print(f"  restricted case update by direct invoke: {result['accepted']} accepted")

    # 3. A bulk volunteer campaign from business partners over SQS ingest, 300 messages.
    campaign = [
        envelope(
            "volunteer.opportunity.posted", {"role": "reading buddy", "slot": i}, priority="bulk"
        )
        for i in range(300)
    ]
    bodies = [json.dumps(m) for m in campaign]
    for start in range(0, len(bodies), 10):
        batch = bodies[start : start + 10]
        started = time.monotonic()
        failures = dispatch(sqs_event(batch, "business", prefix), function_arn, runtime)
        if failures["batchItemFailures"]:
            raise RuntimeError(f"SQS batch failures: {failures}")
        for item in map(json.loads, batch):
            sent[item["message_id"]] = started
            copies[item["message_id"]] = routed_queues(item, "business")
    print(f"  bulk volunteer campaign over SQS ingest: {len(campaign)} messages, no batch failures")

    # 4. A media story under embargo, from the government press office.
    story = envelope(
        "media.story.published",
        {"headline": "New child-protection hotline for Jakarta"},
        classification="public",
        embargo_until=(now + timedelta(hours=6)).isoformat(),
    )
    started = time.monotonic()
    result = dispatch({"messages": [story]}, f"{function_arn}:government", runtime)
    record("direct/government", [story], result["results"], started)

    # 5. A second emergency, now that connections and data keys are warm: a public alert to all.
    public_alert = envelope(
        "child-safety.alert.public",
        {"message": "AMBER alert lifted: the child has been found safe"},
        priority="emergency",
        classification="public",
    )
    started = time.monotonic()
    result = dispatch({"messages": [public_alert]}, f"{function_arn}:government", runtime)
    record("direct/government", [public_alert], result["results"], started)

    # 6. What producers get wrong.
    duplicate = envelope("donation.received", {"amount_idr": 250000})
    invalid = [
        envelope("donation.received", {"amount_idr": 100000}, priority="urgent"),
        {"topic": "Donation Received", "payload": {}},
        envelope("case.assessment.updated", {"case": "C-1"}, classification="restricted"),
        envelope("research.dataset.synced", {"blob": "x" * 270_000}),
        duplicate,
        duplicate,
    ]
    started = time.monotonic()
    response = dispatch(http_event({"messages": invalid}, "community"), function_arn, runtime)
    record("https/community", invalid, json.loads(response["body"])["results"], started)
    response = dispatch(http_event("{not json", "business"), function_arn, runtime)
    record("https/business", [{}], json.loads(response["body"])["results"], started)
    print(f"  invalid messages over HTTPS: HTTP {response['statusCode']} for the malformed body")
    return sent, copies, rejected


class Consumers:
    """One consumer thread per stakeholder queue, as the group's own broker user, recording when
    each message arrives (for end-to-end latency from the router call). A group's emergency
    queue has a consumer of its own, as the fabric's consumers do, so an alert never waits
    behind the bulk deliveries of the same group."""

    def __init__(self, passwords: dict[str, str]) -> None:
        from fabric.stakeholders import STAKEHOLDERS

        self.arrived: dict[str, list[tuple[str, dict[str, Any], float]]] = defaultdict(list)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(group, emergency, passwords), daemon=True)
            for group in STAKEHOLDERS
            for emergency in (True, False)
        ]
        self._ready = threading.Barrier(len(self._threads) + 1)

    def __enter__(self) -> Consumers:
        for thread in self._threads:
            thread.start()
        self._ready.wait(timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def wait_for_copies(self, copies: dict[str, set[str]], timeout: float) -> None:
        """Until every message has arrived in every queue it was routed to (or ``timeout``)."""
        expected = {(mid, queue) for mid, queues in copies.items() for queue in queues}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not expected <= self.copies():
            time.sleep(0.05)

    def copies(self) -> set[tuple[str, str]]:
        """(message id, queue) of everything that arrived so far."""
        return {(mid, queue) for queue, items in list(self.arrived.items()) for mid, _, _ in items}

    def _run(self, group: Any, emergency: bool, passwords: dict[str, str]) -> None:
        from fabric.adapters.rabbitmq import RabbitSettings
        from fabric.adapters.rabbitmq_consumer import consumer_settler
        from fabric.consumer import Decision, Verdict, rabbitmq_delivery
        from fabric.topology import queue_name, user_name

        user = user_name(group)
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", 5672, LOCAL_VHOST, pika.PlainCredentials(user, passwords[user])
            )
        )
        channel = connection.channel()
        queue = queue_name(group, emergency=emergency)
        # The consumer toolkit's settler, as this group's user: a `delivered` audit record per
        # message (the compliance report's emergency latency comes from them).
        settler = consumer_settler(
            RabbitSettings(
                host="127.0.0.1",
                port=5672,
                vhost=LOCAL_VHOST,
                credentials=lambda: (user, passwords[user]),
            ),
            queue,
            consumer=f"consumer:{group}",
        )

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            self.arrived[queue].append((properties.message_id, json.loads(body), time.monotonic()))
            delivery = rabbitmq_delivery(
                queue,
                message_id=properties.message_id,
                topic=properties.type,
                body=body,
                headers=properties.headers,
            )
            settler.settle([(delivery, Decision(Verdict.DONE))])
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(queue, on_message)
        self._ready.wait(timeout=10)
        while not self._stop.is_set():
            connection.process_data_events(time_limit=0.02)
        connection.close()


def failover(
    router_env: dict[str, str], drain_env: dict[str, str], function_arn: str, consumers: Consumers
) -> set[str]:
    """The failover act; returns the accepted message ids that were never delivered.

    The router and the drain reach RabbitMQ through a fault-injecting loopback proxy (the shared
    broker itself is never touched): the proxy turns into a silent black hole mid-scenario, the
    router keeps accepting through SNS/SQS, the broker comes back, and the drain moves the
    fallback messages into the stakeholder queues.
    """
    from fabric.adapters.memory import MemoryMetrics
    from fabric.bootstrap import build_drainer, build_router_runtime
    from fabric.entrypoints import dispatch
    from fabric.metrics import ACCEPTED_BY_FALLBACK, DRAINED
    from fabric.settings import DrainSettings, RouterSettings

    sys.path.insert(0, str(ROOT))  # the drills' fault-injecting proxy
    from tests.integration.faults import FaultProxy

    proxy = FaultProxy(("127.0.0.1", 5672))
    through_proxy = {"RABBITMQ_PORT": str(proxy.port)}
    metrics = MemoryMetrics()
    runtime = build_router_runtime(
        RouterSettings.from_env({**router_env, **through_proxy}), metrics=metrics
    )
    drainer = build_drainer(DrainSettings.from_env({**drain_env, **through_proxy}), metrics=metrics)
    by_transport: Counter[str] = Counter()
    copies: dict[str, set[str]] = {}  # accepted message id -> the queues it was routed to
    refused: list[dict[str, Any]] = []

    def alert() -> dict[str, Any]:
        return envelope(
            "child-safety.incident.reported",
            {"summary": "drill"},
            priority="emergency",
            classification="restricted",
        )

    def donations(count: int) -> list[dict[str, Any]]:
        return [
            envelope("donation.pledge.received", {"amount_idr": 50000 + i}) for i in range(count)
        ]

    def send(group: str, messages: list[dict[str, Any]]) -> float:
        """Route through the group's alias; the call's duration in ms."""
        started = time.monotonic()
        result = dispatch({"messages": messages}, f"{function_arn}:{group}", runtime)
        elapsed_ms = (time.monotonic() - started) * 1000
        for message, item in zip(messages, result["results"], strict=True):
            if item["status"] == "accepted":
                copies[item["message_id"]] = routed_queues(message, group)
                by_transport[item["transport"]] += 1
            else:
                refused.append(item)
        return elapsed_ms

    try:
        send("community", [alert()])
        send("business", donations(100))
        print(f"  broker healthy: {dict(by_transport)}")
        proxy.blackhole()
        first_accept_ms = send("community", [alert()])
        for _ in range(4):
            send("community", [alert()])
            send("business", donations(30))
        print(
            "  broker unreachable (silent black hole): first emergency accepted through the"
            f" fallback after {first_accept_ms:.0f} ms; so far {dict(by_transport)}"
        )
        print(
            f"  metric {ACCEPTED_BY_FALLBACK} = {metrics.totals[ACCEPTED_BY_FALLBACK]}"
            " (the FallbackActive alarm fires at 1)"
        )
        proxy.reset()
        proxy.restore()
        time.sleep(5.2)  # the router's circuit breaker probes the broker after 5 s open
        send("community", [alert()])
        send("business", donations(50))
        print(f"  broker back, breaker closed after its probe: {dict(by_transport)}")
        report = drainer.drain(max_seconds=120)
        print(
            f"  drain: {report.total} copies moved into RabbitMQ, deleted from SQS after confirm"
            f" (stopped: {report.stopped}; metric {DRAINED} = {metrics.totals[DRAINED]})"
        )
        consumers.wait_for_copies(copies, timeout=20)
    finally:
        proxy.close()
    return tally(copies, by_transport, refused, consumers)


def tally(
    copies: dict[str, set[str]],
    by_transport: Counter[str],
    refused: list[dict[str, Any]],
    consumers: Consumers,
) -> set[str]:
    """Print the failover act's counts; return the ids accepted with a routed copy that never
    arrived, and the refused ones."""
    arrived = Counter(
        (mid, queue)
        for queue, items in list(consumers.arrived.items())
        for mid, _, _ in items
        if mid in copies
    )
    missing = {(mid, queue) for mid, queues in copies.items() for queue in queues} - set(arrived)
    routed = sum(len(queues) for queues in copies.values())
    duplicates = sum(n - 1 for n in arrived.values())
    transports = ", ".join(f"{name} {n}" for name, n in sorted(by_transport.items()))
    print(
        f"  accepted {len(copies)} ({transports}), refused {len(refused)}; {routed} copies"
        f" routed, {routed - len(missing)} delivered, lost {len(missing)},"
        f" duplicate copies {duplicates} (removable by message id)"
    )
    return {mid for mid, _ in missing} | {str(item.get("message_id")) for item in refused}


def access_refused(passwords: dict[str, str]) -> bool:
    """Whether the media user is refused the government queue (it must be)."""
    from fabric.stakeholders import Stakeholder
    from fabric.topology import queue_name, user_name

    user = user_name(Stakeholder.MEDIA)
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", 5672, LOCAL_VHOST, pika.PlainCredentials(user, passwords[user])
        )
    )
    try:
        connection.channel().basic_get(queue_name(Stakeholder.GOVERNMENT), auto_ack=False)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()
    return False


def poison_act(
    runtime: Any,
    *,
    function_arn: str,
    passwords: dict[str, str],
    templates: dict[str, dict[str, Any]],
    resolver: Resolver,
    local: dict[str, str],
) -> bool:
    """A community consumer cannot process an emergency alert until it is "fixed"; True when
    the alert was retried, dead-lettered, redriven and then processed exactly once."""
    from fabric.adapters.rabbitmq import RabbitSettings
    from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
    from fabric.bootstrap import build_redrive
    from fabric.consumer import Delivery, Idempotency, MessageProcessor
    from fabric.entrypoints import dispatch
    from fabric.redrive import parse_request
    from fabric.settings import RedriveSettings
    from fabric.stakeholders import Stakeholder
    from fabric.topology import dead_letter_queue_name, queue_name, user_name

    logging.getLogger("fabric.consumer").setLevel(logging.ERROR)  # the act prints the attempts
    group = Stakeholder.COMMUNITY
    user = user_name(group)
    work, dlq = queue_name(group, emergency=True), dead_letter_queue_name(group, emergency=True)
    redrive_env = {
        name: resolver.resolve(value)
        for name, value in function_environment(templates, REDRIVE_DESCRIPTION).items()
    }
    redrive_env.update(local)
    settings = RabbitSettings(
        host="127.0.0.1",
        port=5672,
        credentials=lambda: (user, passwords[user]),
        vhost=LOCAL_VHOST,
        connection_name="community-consumer",
    )
    alert = envelope(
        "child-safety.incident.reported",
        {"summary": "a shelter reports a missing child"},
        priority="emergency",
        classification="restricted",
        audience=["community"],
    )
    result = dispatch({"messages": [alert]}, f"{function_arn}:government", runtime)
    print(f"   government publishes an emergency alert to community: {result['results'][0]}")
    started = time.monotonic()
    fixed, attempts, processed = False, [], []

    def handler(delivery: Delivery) -> None:
        attempts.append(time.monotonic() - started)
        if not fixed:
            raise ValueError("the community system cannot parse this alert")
        processed.append(delivery.message_id)

    processor = MessageProcessor(
        handler,
        idempotency=Idempotency(redrive_env["IDEMPOTENCY_TABLE"], consumer="community-alerts"),
        max_attempts=3,
    )
    consumer = RabbitMqConsumer(settings, work, processor)
    counts = consumer.run(max_messages=3, idle_timeout_s=20)
    spacing = ", ".join(f"{at:.1f} s" for at in attempts)
    print(f"   attempts at {spacing} after publish: {dict(counts)}; parked in {dlq}")
    runtime_redrive = build_redrive(RedriveSettings.from_env(redrive_env))
    dry = runtime_redrive.redriver.run(
        runtime_redrive.queue("rabbitmq", dlq),
        parse_request({"source": "rabbitmq", "queue": dlq, "dry_run": True}).plan,
    )
    for item in dry.listed:
        print(f"   dry run lists {item.message_id} ({item.topic}, reason {item.reason})")
    fixed = True
    print("   the community team ships a fix; the operator redrives the DLQ")
    report = runtime_redrive.redriver.run(
        runtime_redrive.queue("rabbitmq", dlq),
        parse_request({"source": "rabbitmq", "queue": dlq}).plan,
    )
    print(f"   redrive: moved {report.moved}, stopped: {report.stopped}")
    again = runtime_redrive.redriver.run(runtime_redrive.queue("rabbitmq", dlq))
    print(f"   a second redrive finds {again.scanned} letters (nothing moves twice)")
    counts = consumer.run(max_messages=1, idle_timeout_s=10)
    ok = (
        len(attempts) == 4
        and processed == [alert["message_id"]]
        and report.moved == 1
        and again.scanned == 0
    )
    print(
        f"   after the redrive: {dict(counts)}; processed {len(processed)} time(s)"
        f" -> {'OK' if ok else 'FAILED'}"
    )
    return ok


def _write_from_rabbitmq(writer: Any, passwords: dict[str, str]) -> int:
    """Every batch on the RabbitMQ audit queue through ``writer`` (read as the Amazon MQ event
    source hands them to the function: a consumer's batch may record only consumer events);
    how many batches."""
    import base64

    from fabric.audit_writer import batches_from_event
    from fabric.topology import AUDIT_QUEUE, PLATFORM_USER

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            5672,
            LOCAL_VHOST,
            pika.PlainCredentials(PLATFORM_USER, passwords[PLATFORM_USER]),
        )
    )
    channel = connection.channel()
    batches: list[dict[str, Any]] = []
    count = 0
    last_tag = 0
    while True:
        method, properties, body = channel.basic_get(AUDIT_QUEUE)
        if method is not None:
            properties_seen = {"messageId": properties.message_id, "userId": properties.user_id}
            batches.append(
                {"basicProperties": properties_seen, "data": base64.b64encode(body).decode()}
            )
            last_tag = method.delivery_tag
            count += 1
        if batches and (method is None or len(batches) == 50):
            event = {"eventSource": "aws:rmq", "rmqMessagesByQueue": {AUDIT_QUEUE: batches}}
            writer.write(batches_from_event(event))  # one object per call; acked once stored
            channel.basic_ack(last_tag, multiple=True)
            batches = []
        if method is None:
            break
    connection.close()
    return count


def _write_from_sqs(writer: Any) -> int:
    """Every batch on the SQS audit queue through ``writer``; how many batches."""
    import boto3

    from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE
    from fabric.audit import decode_audit_batch
    from fabric.naming import audit_queue_name

    # What the components sent while RabbitMQ could not take it (the failover act's outage).
    sqs = boto3.client("sqs")
    from_sqs = 0
    url = sqs.get_queue_url(QueueName=audit_queue_name("dev"))["QueueUrl"]
    while received := sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages", []):
        writer.write(
            [
                (
                    m["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"],
                    decode_audit_batch(m["Body"].encode()),
                )
                for m in received
            ]
        )
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)
            ],
        )
        from_sqs += len(received)
    return from_sqs


def replay_act(
    templates: dict[str, dict[str, Any]],
    resolver: Resolver,
    local: dict[str, str],
    passwords: dict[str, str],
) -> bool:
    """The replay function's code re-publishes the last hour's child-safety messages from the
    audit archive: a dry run, then the replay; counts what reached the stakeholder queues with
    the replay's header. True when every selected message was replayed."""
    print("   replay (the replay function's code): the last hour's child-safety messages, from the")
    print("   archive the writer just made")
    from fabric.bootstrap import build_replay
    from fabric.envelope import format_timestamp
    from fabric.replay import parse_request
    from fabric.settings import ReplaySettings
    from fabric.stakeholders import STAKEHOLDERS
    from fabric.topology import PLATFORM_USER, REPLAY_HEADER, queue_name

    environment = {
        name: resolver.resolve(value)
        for name, value in function_environment(templates, REPLAY_DESCRIPTION).items()
    }
    environment.update(local)
    # The template names the deployed writer's chain; this run's trail is the local writer's.
    environment["AUDIT_WRITERS"] = LOCAL_WRITER
    replay = build_replay(ReplaySettings.from_env(environment)).replayer
    end = datetime.now(UTC)
    request = {
        "start": format_timestamp(end - timedelta(hours=1)),
        "end": format_timestamp(end),
        "topics": ["child-safety.#"],
    }
    dry = replay.run(parse_request({**request, "dry_run": True}))
    print(f"   replay dry run: {dry.would_replay} message(s) would be replayed; nothing published")
    done = replay.run(parse_request({**request, "replay_id": dry.replay_id}))
    problems = done.missing_body + done.corrupt + done.unreadable + done.failed
    print(
        f"   replay {done.replay_id}: trail {'verified' if not done.trail_problems else 'NOT'}"
        f" verified first; {done.replayed} replayed (same message ids, stored bytes as they"
        f" are), {problems} problem(s), stopped: {done.stopped}"
    )
    for problem in done.trail_problems:
        print(f"   trail problem: {problem}")
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            5672,
            LOCAL_VHOST,
            pika.PlainCredentials(PLATFORM_USER, passwords[PLATFORM_USER]),
        )
    )
    channel, copies = connection.channel(), 0
    for group in STAKEHOLDERS:
        for emergency in (False, True):
            while True:
                method, properties, _ = channel.basic_get(
                    queue_name(group, emergency=emergency), auto_ack=True
                )
                if method is None:
                    break
                copies += (properties.headers or {}).get(REPLAY_HEADER) == done.replay_id
    connection.close()
    print(f"   {copies} copies in the stakeholder queues carry {REPLAY_HEADER}: {done.replay_id}")
    return (
        done.stopped == "done"
        and not problems
        and done.replayed == dry.would_replay > 0
        and copies >= done.replayed
    )


def audit_act(
    templates: dict[str, dict[str, Any]],
    physical: dict[str, str],
    passwords: dict[str, str],
    replay: Callable[[], bool],
) -> bool:
    """Write the run's audit batches into the audit bucket, run ``replay`` on the archive they
    made and write its records too, seal, read back, verify, report."""
    print("== audit trail (audit queue -> audit writer -> Object Lock bucket, verified)")
    import boto3

    from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
    from fabric.adapters.kms_signer import KmsSigner
    from fabric.audit_chain import verify_trail
    from fabric.audit_writer import AuditWriter

    stateful = templates["Stateful"]["Resources"]

    def local(kind: str, test: Callable[[dict[str, Any]], bool]) -> str:
        return next(
            physical[logical_id]
            for logical_id, resource in stateful.items()
            if resource["Type"] == kind and test(resource.get("Properties", {}))
        )

    bucket = local("AWS::S3::Bucket", lambda p: bool(p.get("ObjectLockEnabled")))
    key = local("AWS::KMS::Key", lambda p: p.get("KeyUsage") == "SIGN_VERIFY")
    table = local("AWS::DynamoDB::Table", lambda _p: True)
    s3, kms, dynamodb = boto3.client("s3"), boto3.client("kms"), boto3.client("dynamodb")
    signer = KmsSigner(key, lambda: kms)
    store = S3ObjectStore(bucket, lambda: s3)
    writer = AuditWriter(
        LOCAL_WRITER,
        chains=DynamoDbChainStore(table, lambda: dynamodb),
        objects=store,
        signer=signer,
    )
    from_rabbitmq = _write_from_rabbitmq(writer, passwords)
    from_sqs = _write_from_sqs(writer)
    replayed = replay()
    from_rabbitmq += _write_from_rabbitmq(writer, passwords)  # the replay's records
    checkpoint = writer.checkpoint()
    objects = {k: store.get(k) for k in store.keys(f"audit/{LOCAL_WRITER}/")}
    checkpoints = [
        (k, json.loads(store.get(k))) for k in store.keys(f"checkpoints/{LOCAL_WRITER}/")
    ]
    result = verify_trail(
        objects=objects, checkpoints=checkpoints, signer=signer, writer=LOCAL_WRITER
    )
    events = {event: len(ids) for event, ids in sorted(result.message_ids.items())}
    print(f"   {result.records} records in {result.objects} objects of s3://{bucket}/audit/")
    print(
        f"   audit batches: {from_rabbitmq} from the RabbitMQ audit queue, {from_sqs} from the"
        " SQS audit queue (sent during the outage)"
    )
    print(f"   message ids per event: {events}")
    print(f"   sealed by {checkpoint} (ECDSA P-256 signature by the signing key)")
    verdict = "verified" if result.ok else f"FAILED at {result.problem}"
    print(f"   verifier: {verdict}")
    reported = write_report(templates, physical, writer=LOCAL_WRITER)
    return result.ok and reported and replayed


REPORT_DESCRIPTION = "reports a period of the audit trail"


def write_report(
    templates: dict[str, dict[str, Any]], physical: dict[str, str], *, writer: str
) -> bool:
    """The compliance report of the run's trail, by the report function's handler in-process:
    the reports bucket and the compliance topic created in moto as the dev template declares
    them, the function's environment from the template (only the chain's name replaced by the
    local writer's), the three files read back from the reports bucket into build/reports.
    True when the report says the trail verifies."""
    import contextlib
    import io

    import boto3

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    inbox = _report_resources(templates, physical)
    resolver = Resolver(templates, physical)
    environment = {
        name: resolver.resolve(value)
        for name, value in function_environment(templates, REPORT_DESCRIPTION).items()
    }
    print(f"   compliance report function (template: AUDIT_WRITERS={environment['AUDIT_WRITERS']},")
    print(f"   here the local chain: AUDIT_WRITERS={writer})")
    environment["AUDIT_WRITERS"] = writer
    handler = _report_handler(environment)
    # The day up to this minute (the run's records are from its last minutes).
    end = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    period = {"start": (end - timedelta(days=1)).isoformat(), "end": end.isoformat()}
    metrics = io.StringIO()
    with contextlib.redirect_stdout(metrics):  # the function's EMF line, shown below
        summary = handler.handler(period, None)
    if "error" in summary:
        print(f"   compliance report refused: {summary['error']}")
        return False

    folder = ROOT / "build" / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    files = summary["report"]
    for kind in ("json", "csv", "html"):
        data = s3.get_object(Bucket=files["bucket"], Key=files[kind])["Body"].read()
        (folder / f"compliance-dev.{kind}").write_bytes(data)
    latency = summary["emergency_latency_p99_ms"]
    received = sqs.receive_message(QueueUrl=inbox, MaxNumberOfMessages=1).get("Messages", [])
    subject = json.loads(received[0]["Body"])["Subject"] if received else "nothing received"
    print(
        f"   compliance report: {'verified' if summary['verified'] else 'NOT VERIFIED'},"
        f" {summary['accepted']} accepted, emergency p99"
        f" {'not recorded' if latency is None else f'{latency:.1f} ms'},"
        f" {summary['objects']} objects read back locked"
        f" ({summary['unlocked_objects']} unlocked)"
    )
    print(f"   written to s3://{files['bucket']}/{files['html']} (and .json, .csv)")
    print(f"   the compliance topic says: {subject}")
    for line in metrics.getvalue().splitlines():
        counts = {k: v for k, v in json.loads(line).items() if isinstance(v, int)}
        print(f"   metrics (CloudWatch EMF line on stdout): {counts}")
    print(f"   compliance report: {folder / 'compliance-dev.html'} (and .json, .csv beside it)")
    return bool(summary["verified"])


def _report_resources(templates: dict[str, dict[str, Any]], physical: dict[str, str]) -> str:
    """The audit key, the reports bucket (versioned, SSE-KMS with that key) and the compliance
    topic in moto, added to ``physical``; the URL of a queue subscribed to the topic."""
    import boto3

    stateful, services = templates["Stateful"], templates["Services"]
    s3, kms, sns, sqs = (boto3.client(name) for name in ("s3", "kms", "sns", "sqs"))
    (audit_key,) = [
        logical_id
        for logical_id, r in stateful["Resources"].items()
        if r["Type"] == "AWS::KMS::Key"
        and "compliance reports" in r["Properties"].get("Description", "")
    ]
    description = stateful["Resources"][audit_key]["Properties"]["Description"]
    physical[audit_key] = kms.create_key(Description=description)["KeyMetadata"]["Arn"]
    reports_id = stateful["Outputs"]["ReportsBucketName"]["Value"]["Ref"]
    reports = physical[reports_id] = f"fabric-dev-local-{reports_id.lower()}"
    s3.create_bucket(Bucket=reports, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=reports, VersioningConfiguration={"Status": "Enabled"})
    default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": physical[audit_key]}
    s3.put_bucket_encryption(
        Bucket=reports,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": True}]
        },
    )
    ((topic_id, topic),) = [
        (logical_id, resource)
        for logical_id, resource in services["Resources"].items()
        if resource["Type"] == "AWS::SNS::Topic"
        and str(resource["Properties"].get("TopicName")).endswith("-compliance")
    ]
    arn = physical[topic_id] = sns.create_topic(Name=topic["Properties"]["TopicName"])["TopicArn"]
    # A compliance officer's subscription, to show what the topic delivers.
    inbox = sqs.create_queue(QueueName="fabric-dev-local-compliance-officer")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=inbox_arn["Attributes"]["QueueArn"])
    return str(inbox)


def _report_handler(environment: dict[str, str]) -> Any:
    """``lambdas/compliance_report/handler.py`` imported as Lambda would, with ``environment``
    as its variables (the handler builds its reporter at import; the variables are restored)."""
    import importlib.util

    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        path = ROOT / "lambdas" / "compliance_report" / "handler.py"
        spec = importlib.util.spec_from_file_location("compliance_report_handler", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        handler = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return handler


def main(argv: list[str]) -> int:
    """Run the local fabric once and print the report; exit 1 if anything was lost."""
    assembly = Path(next((a for a in argv[1:] if not a.startswith("--")), "cdk.out"))
    templates = dev_templates(assembly)
    server = start_moto()
    document: dict[str, Any] | None = None
    try:
        physical, passwords = create_aws_resources(templates)
        document = apply_local_topology(passwords)
        raw_environment = function_environment(templates)
        resolver = Resolver(templates, physical)
        environment = {name: resolver.resolve(value) for name, value in raw_environment.items()}
        local = {
            "RABBITMQ_HOST": "127.0.0.1",
            "RABBITMQ_PORT": "5672",
            "RABBITMQ_TLS": "false",
            "RABBITMQ_VHOST": LOCAL_VHOST,
        }
        print("== local fabric (dev template, local RabbitMQ, embedded moto)")
        for name, value in sorted(environment.items()):
            shown = local.get(name, value)
            note = f"   (template: {value})" if name in local else ""
            print(f"   {name}={shown}{note}")
        environment.update(local)

        from fabric.bootstrap import router_runtime
        from fabric.protection import encryption_context, open_payload

        drain_environment = {
            name: resolver.resolve(value)
            for name, value in function_environment(templates, DRAIN_DESCRIPTION).items()
        }
        drain_environment.update(local)
        runtime = router_runtime(environment)
        function_arn = f"arn:aws:lambda:{REGION}:000000000000:function:fabric-dev-router"
        print("== scenario")
        with Consumers(passwords) as consumers:
            sent, copies, rejected = play(runtime, function_arn)
            consumers.wait_for_copies(copies, timeout=10)
            arrived = {queue: list(items) for queue, items in consumers.arrived.items()}
            report(arrived, sent, copies, rejected)

            cipher = runtime.router._cipher
            for _, message, _ in arrived.get("fabric.government.emergency", [])[:1]:
                context = encryption_context(
                    message_id=message["message_id"], source=message["source"], environment="dev"
                )
                payload = json.loads(open_payload(cipher, message["payload"], context))
                print(f"   government decrypts the emergency alert: summary={payload['summary']!r}")
            refused = access_refused(passwords)
            print(f"   media user reading the government queue is refused: {refused}")

            lost = missing_copies(copies, consumers)
        print("== poison-message act (retry tiers, dead letter, redrive, processed once)")
        poisoned = poison_act(
            runtime,
            function_arn=function_arn,
            passwords=passwords,
            templates=templates,
            resolver=resolver,
            local=local,
        )
        with Consumers(passwords) as consumers:
            print("== failover act (the broker becomes unreachable mid-scenario)")
            lost |= failover(environment, drain_environment, function_arn, consumers)
        verified = audit_act(
            templates,
            physical,
            passwords,
            replay=lambda: replay_act(templates, resolver, local, passwords),
        )
        print(f"== {'NOTHING LOST' if not lost else f'LOST {len(lost)} message(s)'}")
        return 1 if lost or not refused or not poisoned or not verified else 0
    finally:
        if document is not None and "--keep" not in argv:
            drop_local_topology(document)
        server.stop()


def missing_copies(copies: dict[str, set[str]], consumers: Consumers) -> set[str]:
    """Print how many of the routed copies arrived; the ids of messages with a copy missing."""
    missing = {(m, q) for m, queues in copies.items() for q in queues} - consumers.copies()
    routed = sum(len(queues) for queues in copies.values())
    print(
        f"== accepted {len(copies)}: {routed} copies routed to stakeholder queues,"
        f" {routed - len(missing)} delivered, lost {len(missing)}"
    )
    return {mid for mid, _ in missing}


def report(
    arrived: dict[str, list[tuple[str, dict[str, Any], float]]],
    sent: dict[str, float],
    copies: dict[str, set[str]],
    rejected: list[tuple[str, str, str]],
) -> None:
    """Print per queue what arrived (by topic) against what the routing table sent there, with
    latency from router call to consumer."""
    print("== delivered, per stakeholder queue (consumed as that stakeholder's broker user)")
    print("   arrived/routed there; latency: router call to consumer; the first message of the run")
    print("   also pays the cold start (broker connection, KMS data key, Encryption SDK import)")
    routed = Counter(queue for queues in copies.values() for queue in queues)
    for queue in sorted(set(arrived) | set(routed)):
        messages = arrived.get(queue, [])
        topics = Counter(message["topic"] for _, message, _ in messages)
        latencies = [(at - sent[mid]) * 1000 for mid, _, at in messages if mid in sent]
        encrypted = sum(
            isinstance(m["payload"], dict) and "encrypted" in m["payload"] for _, m, _ in messages
        )
        summary = ", ".join(f"{topic} x{count}" for topic, count in sorted(topics.items()))
        lat = (
            f"latency p50 {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms"
            if latencies
            else ""
        )
        count = f"{len(messages)}/{routed[queue]}"
        print(f"   {queue:32s} {count:>9s}  {summary}  [{lat}; encrypted {encrypted}]")
    print("== rejected (reason, detail)")
    for label, reason, detail in rejected:
        print(f"   {label:20s} {reason:24s} {detail}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
