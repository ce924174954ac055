"""The local fabric: the dev router in-process on the real local RabbitMQ and an embedded moto.

What it does, in order:

1. takes the local fabric's lock (the broker's `fabric-*` users are broker-wide, so two runs at
   once would change each other's passwords: a second run fails at once and says so);
2. starts moto's server on a free loopback port (the AWS emulator) and points boto3 at it;
3. reads the synthesized dev templates and creates in moto what the functions need from them:
   the keys, one Secrets Manager secret per broker user, the fallback topics and queues, the
   audit bucket and the idempotency table (which also holds the audit chain's state);
4. applies the topology generated from the routing table to the local RabbitMQ, in its own
   vhost, with those users' passwords, through the management API (as the custom resource does);
5. builds the router from the environment variables the dev template gives the router function,
   with only the broker's address replaced by the local one (printed); every other reference
   must resolve to what step 3 created;
6. plays a scenario through the three entry points, consumes every stakeholder queue as that
   stakeholder's own broker user, and prints what arrived where, with latencies, and every
   rejection with its reason;
7. plays the poison-message act: a consumer (the consumer toolkit, as a stakeholder's broker
   user, idempotent on DynamoDB) fails on a message, which is retried in growing delay tiers,
   dead-lettered after the attempt limit, measured there by the broker metrics function's
   handler (the EMF depth lines the dead-letter alarms read), redriven by the redrive
   function's code after the "fix", measured again (empty), and processed exactly once;
8. plays the failover act: the broker becomes unreachable (a fault-injecting loopback proxy
   turns into a silent black hole), messages are accepted through the SNS/SQS fallback, the
   broker returns, the drain function's code moves them back, and the summary shows counts per
   transport;
9. writes the audit trail: every audit batch the run's components put on the audit queues goes
   through the audit writer function's code, in events shaped and sized as its event sources
   hand them over, into the Object Lock audit bucket (as the dev template declares it), sealed
   by a checkpoint signed with the signing key; the replay function's code re-publishes the
   last hour's child-safety messages from the archive those batches made (a dry run first), and
   its records are written and sealed too; the trail is read back and verified; then the
   compliance report function's handler reports the run's day into the reports bucket and the
   compliance topic (both in moto) and the report is copied to
   build/reports/compliance-dev.{html,json,csv}.

Every act checks what it did, and a failed check prints a ``FAIL:`` line: a routed copy that
never arrived, a copy in a queue the routing table does not send it to, a copy that arrived
twice (only a message accepted through the fallback may, see ``failover``), a rejection with
another reason or HTTP status than the scenario states, a broker metrics depth other than the
one the poison act left, a replay that is not exactly the child-safety messages in exactly
their queues, an audit trail that does not verify or lacks a message id of an event the acts
caused. The last line is ``== PASS`` (exit 0) or ``== FAIL`` (exit 1). The vhost and the users
are removed at the end, also after an error, Ctrl-C or SIGTERM.

Usage: python scripts/local_fabric.py [cdk.out] [--keep]   (--keep leaves the vhost for a look)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pika
import pika.exceptions

from fabric.audit import AuditEvent

ROOT = Path(__file__).resolve().parent.parent
REGION = "ap-southeast-3"
LOCAL_VHOST = "fabric-dev-local"
MANAGEMENT_URL = "http://127.0.0.1:15672"
# The broker is machine-wide, so is the lock of the run that uses its vhost and fabric-* users.
LOCK_FILE = Path(tempfile.gettempdir()) / "fabric-local-fabric.lock"
ROUTER_DESCRIPTION = "validates, protects and routes messages"
DRAIN_DESCRIPTION = "drains the fallback queues into RabbitMQ"
REDRIVE_DESCRIPTION = "redrives dead letters to where they came from"
REPLAY_DESCRIPTION = "replays archived messages of a period"
AUDIT_WRITER_DESCRIPTION = "writes audit batches to the Object Lock bucket"
REPORT_DESCRIPTION = "reports a period of the audit trail"
BROKER_METRICS_DESCRIPTION = "publishes the depth of the broker's dead-letter queues"
MOTO_ACCOUNT = "123456789012"  # the account moto's server answers for
FUNCTION_ARN = f"arn:aws:lambda:{REGION}:{MOTO_ACCOUNT}:function:fabric-dev-router"
# The functions that reach the broker reach the local one: the only values not from the template.
LOCAL_BROKER = {
    "RABBITMQ_HOST": "127.0.0.1",
    "RABBITMQ_PORT": "5672",
    "RABBITMQ_TLS": "false",
    "RABBITMQ_VHOST": LOCAL_VHOST,
}
# The broker metrics function reads the local management API instead; its MONITOR_SECRET_ARN
# resolves, like every secret, to the moto secret of that user (fabric-monitor).
LOCAL_MANAGEMENT = {"MANAGEMENT_URL": MANAGEMENT_URL, "RABBITMQ_VHOST": LOCAL_VHOST}


class Checks:
    """The run's verdict: one line per failed check."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, failure: str) -> bool:
        """Record (and print) ``failure`` unless ``ok``; ``ok``."""
        if not ok:
            self.failures.append(failure)
            print(f"   FAIL: {failure}")
        return ok


class Ledger:
    """What the acts did: each accepted message's topic and the stakeholder queues the routing
    table sends it to, and per audit event the message ids the trail must hold for it."""

    def __init__(self) -> None:
        self.queues: dict[str, set[str]] = {}
        self.topics: dict[str, str] = {}
        self.events: defaultdict[str, set[str]] = defaultdict(set)

    def accepted(self, message: dict[str, Any], source: str, transport: str) -> None:
        """``message`` was accepted from ``source`` through ``transport``."""
        message_id = message["message_id"]
        self.queues[message_id] = routed_queues(message, source)
        self.topics[message_id] = message["topic"]
        self.events[AuditEvent.ACCEPTED].add(message_id)
        # Every consumer of the run settles through the consumer toolkit, which records it.
        self.events[AuditEvent.DELIVERED].add(message_id)
        if transport == "rabbitmq":
            self.events[AuditEvent.ROUTED].add(message_id)
        else:  # the failover act drains every message the fallback took
            self.events[AuditEvent.FALLBACK].add(message_id)
            self.events[AuditEvent.DRAINED].add(message_id)

    def copies(self, message_ids: Iterable[str]) -> dict[str, set[str]]:
        """Message id -> routed queues, for ``message_ids``."""
        return {message_id: self.queues[message_id] for message_id in message_ids}


def compare_copies(
    label: str,
    expected: dict[str, set[str]],
    arrived: Counter[tuple[str, str]],
    checks: Checks,
    *,
    may_repeat: frozenset[str] = frozenset(),
) -> None:
    """Print and check ``arrived`` ((message id, queue) -> copies) against ``expected`` (message
    id -> the queues it was routed to): every routed copy exactly once, nothing elsewhere; a
    message in ``may_repeat`` may arrive more than once (counted and printed apart)."""
    routed = {(message_id, queue) for message_id, queues in expected.items() for queue in queues}
    missing = routed - set(arrived)
    misrouted = set(arrived) - routed
    repeated = {pair: n - 1 for pair, n in arrived.items() if n > 1}
    allowed = sum(n for (message_id, _), n in repeated.items() if message_id in may_repeat)
    print(
        f"   {label}: {len(expected)} messages; {len(routed)} copies routed,"
        f" {len(routed) - len(missing)} delivered, lost {len(missing)}, misrouted {len(misrouted)},"
        f" duplicate copies {sum(repeated.values())}"
        + (f" ({allowed} of messages the fallback took, at-least-once)" if may_repeat else "")
    )
    checks.expect(not missing, f"{label}: {len(missing)} routed copies lost: {sorted(missing)[:3]}")
    checks.expect(
        not misrouted,
        f"{label}: {len(misrouted)} copies in a queue they were not routed to:"
        f" {sorted(misrouted)[:3]}",
    )
    duplicated = sorted(pair for pair in repeated if pair[0] not in may_repeat)
    checks.expect(
        not duplicated,
        f"{label}: {len(duplicated)} copies arrived more than once: {duplicated[:3]}",
    )


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


PSEUDO_PARAMETERS = {
    "AWS::Region": REGION,
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::AccountId": MOTO_ACCOUNT,
    "AWS::Partition": "aws",
}


class Resolver:
    """Resolves the intrinsics of a function's environment against the local stand-ins.

    Raises:
        LookupError: a reference has no local stand-in (``physical`` holds ``Ref`` values by
            logical id and ``Fn::GetAtt`` values as ``<logical id>.<attribute>``).
    """

    def __init__(self, templates: dict[str, dict[str, Any]], physical: dict[str, str]) -> None:
        self._templates = templates
        self.physical = physical

    def resolve(self, value: Any) -> str:
        if isinstance(value, str | int | float):
            return str(value)
        (function, argument), *_ = value.items()
        if function == "Ref":
            return self._known(argument, PSEUDO_PARAMETERS | self.physical)
        if function == "Fn::GetAtt":
            return self._known(f"{argument[0]}.{argument[1]}", self.physical)
        if function == "Fn::Join":
            return str(argument[0]).join(self.resolve(part) for part in argument[1])
        if function == "Fn::GetStackOutput":
            output = self._templates["Stateful"]["Outputs"][argument["OutputName"]]
            return self.resolve(output["Value"])
        raise LookupError(f"cannot resolve {function} locally")

    @staticmethod
    def _known(name: str, values: dict[str, str]) -> str:
        if name not in values:
            raise LookupError(f"{name} has no local stand-in")
        return values[name]


def function_environment(
    templates: dict[str, dict[str, Any]], description: str = ROUTER_DESCRIPTION
) -> dict[str, Any]:
    """The raw ``Environment.Variables`` of the function in the Services template whose
    description contains ``description`` (the router's by default)."""
    return dict(_function(templates, description)[1]["Environment"]["Variables"])


def _function(templates: dict[str, dict[str, Any]], description: str) -> tuple[str, dict[str, Any]]:
    """(logical id, properties) of the function whose description contains ``description``."""
    for logical_id, resource in templates["Services"]["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Lambda::Function" and description in str(
            props.get("Description")
        ):
            return logical_id, props
    raise LookupError(f"no function that {description} in the dev Services template")


def local_environment(
    templates: dict[str, dict[str, Any]],
    resolver: Resolver,
    description: str,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """The function's environment from the template, resolved against the local stand-ins,
    except the variables in ``overrides``, which take the local value instead.

    Raises:
        LookupError: an override names a variable the template does not set, or a reference
            of another variable has no local stand-in.
    """
    raw = function_environment(templates, description)
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(raw))
    if unknown:
        raise LookupError(f"local overrides of variables the template does not set: {unknown}")
    return {
        name: overrides[name] if name in overrides else resolver.resolve(value)
        for name, value in raw.items()
    }


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
    """Create in moto what the functions use: the keys, the broker users' secrets, the fallback
    topics with their filtered group queues, the audit bucket, the idempotency table (the audit
    chain's state too). (``Ref`` or
    ``<logical id>.Arn`` -> local value, user -> password)."""
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
            physical[f"{logical_id}.Arn"] = kms.create_key(Description=props["Description"])[
                "KeyMetadata"
            ]["Arn"]
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
            physical[f"{logical_id}.Arn"] = kms.create_key(
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


def take_lock() -> IO[str] | None:
    """The local fabric's lock, held until the returned file is closed (or the process ends);
    None when another run holds it."""
    handle = LOCK_FILE.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        print(
            f"== FAIL: another local fabric run (pid {handle.read().strip() or '?'}) holds"
            f" {LOCK_FILE}: it uses the broker's vhost {LOCAL_VHOST} and the broker-wide"
            " fabric-* users; run one at a time"
        )
        handle.close()
        return None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def local_topology() -> dict[str, Any]:
    """The routing table's topology for LOCAL_VHOST."""
    from fabric.routing import default_routing_table
    from fabric.topology import definitions

    return definitions(default_routing_table(), vhost=LOCAL_VHOST)


def apply_local_topology(passwords: dict[str, str]) -> None:
    """Apply the routing table's topology to LOCAL_VHOST on the local broker (fresh each run)."""
    from fabric.adapters.management import ManagementClient
    from fabric.topology_apply import apply_topology

    client = ManagementClient(MANAGEMENT_URL, "guest", "guest")
    client.delete_vhost(LOCAL_VHOST)
    document = local_topology()
    known = {user["name"] for user in document["users"]}
    apply_topology(
        client,
        document,
        passwords={name: pwd for name, pwd in passwords.items() if name in known},
        vhost=LOCAL_VHOST,
    )


def drop_local_topology() -> None:
    """Remove the local vhost and the topology's users (also those of an interrupted apply)."""
    from fabric.adapters.management import ManagementClient

    client = ManagementClient(MANAGEMENT_URL, "guest", "guest")
    client.delete_vhost(LOCAL_VHOST)
    for user in local_topology()["users"]:
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
    arn = f"arn:aws:sqs:{REGION}:{MOTO_ACCOUNT}:{prefix}{group}"
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


ACCEPTED = "accepted"


def play(
    runtime: Any, ledger: Ledger, checks: Checks
) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Run the scenario, checking every message's outcome (accepted, or the reason code it must
    be rejected with) and every HTTP status against what the scenario states; (message id ->
    time it was handed to the router, rejections)."""
    from fabric.entrypoints import dispatch
    from fabric.envelope import Reason

    sent: dict[str, float] = {}
    rejected: list[tuple[str, str, str]] = []
    now = datetime.now(UTC)

    def route(
        label: str, event: dict[str, Any], items: list[dict[str, Any]], expected: list[str]
    ) -> Any:
        """Dispatch ``event`` (``label``: entry point/group) and check each result against
        ``expected`` (ACCEPTED or a reason code); the dispatch's answer."""
        entry, group = label.split("/", 1)
        started = time.monotonic()
        answer = dispatch(
            event, FUNCTION_ARN if entry != "direct" else f"{FUNCTION_ARN}:{group}", runtime
        )
        results = json.loads(answer["body"])["results"] if entry == "https" else answer["results"]
        checks.expect(
            len(results) == len(items), f"{label}: {len(results)} results for {len(items)} messages"
        )
        for index, (item, want, result) in enumerate(zip(items, expected, results, strict=False)):
            got = ACCEPTED if result["status"] == ACCEPTED else result.get("reason")
            checks.expect(
                got == want,
                f"{label} message {index} ({item.get('topic')}): {got}, expected {want}",
            )
            if got == ACCEPTED:
                sent[result["message_id"]] = started
                ledger.accepted(item, group, result["transport"])
            else:
                rejected.append((label, str(got), str(result.get("detail", ""))[:70]))
                if result.get("message_id"):
                    ledger.events[AuditEvent.REJECTED].add(result["message_id"])
        return answer

    def expect_status(label: str, response: dict[str, Any], status: int) -> None:
        checks.expect(
            response["statusCode"] == status,
            f"{label}: HTTP {response['statusCode']}, expected {status}",
        )

    # 1. An emergency: a child reported missing, from a community worker's app over HTTPS.
    alert = envelope(
        "child-safety.incident.reported",
        {"summary": "child reported missing near SDN 05 school", "child_name": "Siti R.", "age": 9},
        priority="emergency",
        classification="restricted",
        occurred_at=now.isoformat(),
    )
    response = route("https/community", http_event(alert, "community"), [alert], [ACCEPTED])
    print(f"  emergency alert over HTTPS: HTTP {response['statusCode']}")
    expect_status("emergency alert over HTTPS", response, 202)

    # 2. A restricted case update from the government case system, by direct invoke (its alias).
    update = envelope(
        "case.assessment.updated",
        {"case": "C-2026-0001", "risk": "high", "social_worker": "W-118"},
        classification="restricted",
    )
    result = route("direct/government", {"messages": [update]}, [update], [ACCEPTED])
    print(f"  restricted case update by direct invoke: {result['accepted']} accepted")

    # 3. A bulk volunteer campaign from business partners over SQS ingest, 300 messages.
    ingest_campaign(runtime, sent, ledger, checks)

    # 4. A media story under embargo, from the government press office.
    story = envelope(
        "media.story.published",
        {"headline": "New child-protection hotline for Jakarta"},
        classification="public",
        embargo_until=(now + timedelta(hours=6)).isoformat(),
    )
    route("direct/government", {"messages": [story]}, [story], [ACCEPTED])

    # 5. A second emergency, now that connections and data keys are warm: a public alert to all.
    public_alert = envelope(
        "child-safety.alert.public",
        {"message": "AMBER alert lifted: the child has been found safe"},
        priority="emergency",
        classification="public",
    )
    route("direct/government", {"messages": [public_alert]}, [public_alert], [ACCEPTED])

    # 6. What producers get wrong, each with the reason code it must be rejected with.
    duplicate = envelope("donation.received", {"amount_idr": 250000})
    invalid = [
        (
            envelope("donation.received", {"amount_idr": 100000}, priority="urgent"),
            Reason.INVALID_PRIORITY,
        ),
        ({"topic": "Donation Received", "payload": {}}, Reason.INVALID_TOPIC),
        (
            envelope("case.assessment.updated", {"case": "C-1"}, classification="restricted"),
            Reason.SOURCE_NOT_ALLOWED,  # community may not publish case updates
        ),
        (envelope("research.dataset.synced", {"blob": "x" * 270_000}), Reason.TOO_LARGE),
        (duplicate, ACCEPTED),
        (duplicate, Reason.DUPLICATE_MESSAGE_ID),
    ]
    items = [item for item, _ in invalid]
    response = route(
        "https/community",
        http_event({"messages": items}, "community"),
        items,
        [str(w) for _, w in invalid],
    )
    expect_status("invalid messages over HTTPS", response, 207)  # some accepted, some rejected
    malformed = route(
        "https/business", http_event("{not json", "business"), [{}], [Reason.MALFORMED_JSON]
    )
    print(
        f"  invalid messages over HTTPS: HTTP {response['statusCode']} for the batch,"
        f" HTTP {malformed['statusCode']} for the malformed body"
    )
    expect_status("malformed body over HTTPS", malformed, 400)
    return sent, rejected


def ingest_campaign(
    runtime: Any, sent: dict[str, float], ledger: Ledger, checks: Checks, count: int = 300
) -> None:
    """A bulk volunteer campaign from business partners over SQS ingest, in the event source's
    batches of 10; none may fail."""
    from fabric.entrypoints import dispatch

    campaign = [
        envelope(
            "volunteer.opportunity.posted", {"role": "reading buddy", "slot": i}, priority="bulk"
        )
        for i in range(count)
    ]
    prefix = runtime.settings.ingest_queue_prefix
    failed = 0
    for start in range(0, len(campaign), 10):
        batch = campaign[start : start + 10]
        started = time.monotonic()
        answer = dispatch(
            sqs_event([json.dumps(m) for m in batch], "business", prefix), FUNCTION_ARN, runtime
        )
        failures = {item["itemIdentifier"] for item in answer["batchItemFailures"]}
        failed += len(failures)
        for index, item in enumerate(batch):
            if f"sqs-{index}" not in failures:
                sent[item["message_id"]] = started
                # SQS ingest answers only with failures; the broker is healthy here, so the
                # router stores on RabbitMQ (the audit trail's `routed` records confirm it).
                ledger.accepted(item, "business", "rabbitmq")
    print(f"  bulk volunteer campaign over SQS ingest: {len(campaign)} messages, {failed} failed")
    checks.expect(failed == 0, f"SQS ingest: {failed} of {len(campaign)} campaign messages failed")


class Consumers:
    """One consumer thread per stakeholder queue, as the group's own broker user, recording each
    message once it is settled and acked (with when it arrived, for end-to-end latency from the
    router call). A group's emergency queue has a consumer of its own, as the fabric's consumers
    do, so an alert never waits behind the bulk deliveries of the same group."""

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
        try:
            self._ready.wait(timeout=10)
        except threading.BrokenBarrierError:
            self.__exit__()
            raise RuntimeError("a stakeholder consumer could not start consuming") from None
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def settle(self, copies: dict[str, set[str]], timeout: float, quiet: float = 0.5) -> None:
        """Until every message has arrived in every queue it was routed to (or ``timeout``),
        then until nothing more arrives for ``quiet`` seconds (a misrouted or repeated copy)."""
        expected = {(mid, queue) for mid, queues in copies.items() for queue in queues}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not expected <= set(self.copies()):
            time.sleep(0.05)
        count, still = sum(self.copies().values()), time.monotonic()
        while time.monotonic() - still < quiet:
            time.sleep(0.05)
            if (now := sum(self.copies().values())) != count:
                count, still = now, time.monotonic()

    def copies(self) -> Counter[tuple[str, str]]:
        """(message id, queue) -> how many copies of it arrived so far."""
        return Counter(
            (mid, queue) for queue, items in list(self.arrived.items()) for mid, _, _ in items
        )

    def _run(self, group: Any, emergency: bool, passwords: dict[str, str]) -> None:
        from fabric.adapters.rabbitmq import RabbitSettings
        from fabric.adapters.rabbitmq_consumer import consumer_settler
        from fabric.consumer import Decision, Verdict, rabbitmq_delivery
        from fabric.topology import queue_name, user_name

        user = user_name(group)
        queue = queue_name(group, emergency=emergency)
        try:
            connection = pika.BlockingConnection(
                pika.ConnectionParameters(
                    "127.0.0.1", 5672, LOCAL_VHOST, pika.PlainCredentials(user, passwords[user])
                )
            )
        except Exception:
            self._ready.abort()  # nobody waits for this consumer any longer
            raise
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
            at = time.monotonic()
            delivery = rabbitmq_delivery(
                queue,
                message_id=properties.message_id,
                topic=properties.type,
                body=body,
                headers=properties.headers,
            )
            settler.settle([(delivery, Decision(Verdict.DONE))])
            ch.basic_ack(method.delivery_tag)
            self.arrived[queue].append((properties.message_id, json.loads(body), at))

        try:
            connection.channel().basic_consume(queue, on_message)
            self._ready.wait(timeout=10)
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.02)
        except threading.BrokenBarrierError:
            pass  # __enter__ says so
        finally:
            if connection.is_open:
                connection.close()


def drill_alert() -> dict[str, Any]:
    return envelope(
        "child-safety.incident.reported",
        {"summary": "drill"},
        priority="emergency",
        classification="restricted",
    )


def donations(count: int) -> list[dict[str, Any]]:
    return [envelope("donation.pledge.received", {"amount_idr": 50000 + i}) for i in range(count)]


def failover(
    router_env: dict[str, str],
    drain_env: dict[str, str],
    consumers: Consumers,
    ledger: Ledger,
    checks: Checks,
) -> None:
    """The failover act.

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
    accepted: list[str] = []
    refused: list[dict[str, Any]] = []

    def send(group: str, messages: list[dict[str, Any]]) -> float:
        """Route through the group's alias; the call's duration in ms."""
        started = time.monotonic()
        result = dispatch({"messages": messages}, f"{FUNCTION_ARN}:{group}", runtime)
        elapsed_ms = (time.monotonic() - started) * 1000
        for message, item in zip(messages, result["results"], strict=True):
            if item["status"] == ACCEPTED:
                ledger.accepted(message, group, item["transport"])
                accepted.append(item["message_id"])
                by_transport[item["transport"]] += 1
            else:
                refused.append(item)
                ledger.events[AuditEvent.REJECTED].add(item["message_id"])
        return elapsed_ms

    try:
        send("community", [drill_alert()])
        send("business", donations(100))
        print(f"  broker healthy: {dict(by_transport)}")
        proxy.blackhole()
        first_accept_ms = send("community", [drill_alert()])
        for _ in range(4):
            send("community", [drill_alert()])
            send("business", donations(30))
        print(
            "  broker unreachable (silent black hole): first emergency accepted through the"
            f" fallback after {first_accept_ms:.0f} ms; so far {dict(by_transport)}\n"
            f"  metric {ACCEPTED_BY_FALLBACK} = {metrics.totals[ACCEPTED_BY_FALLBACK]}"
            " (the FallbackActive alarm fires at 1)"
        )
        proxy.reset()
        proxy.restore()
        time.sleep(5.2)  # the router's circuit breaker probes the broker after 5 s open
        send("community", [drill_alert()])
        send("business", donations(50))
        print(f"  broker back, breaker closed after its probe: {dict(by_transport)}")
        report = drainer.drain(max_seconds=120)
        print(
            f"  drain: {report.total} copies moved into RabbitMQ, deleted from SQS after confirm"
            f" (stopped: {report.stopped}; metric {DRAINED} = {metrics.totals[DRAINED]})"
        )
        consumers.settle(ledger.copies(accepted), timeout=20)
    finally:
        proxy.close()
    tally(accepted, by_transport, refused, consumers=consumers, ledger=ledger, checks=checks)


def tally(
    accepted: list[str],
    by_transport: Counter[str],
    refused: list[dict[str, Any]],
    *,
    consumers: Consumers,
    ledger: Ledger,
    checks: Checks,
) -> None:
    """Print and check the failover act's counts."""
    transports = ", ".join(f"{name} {n}" for name, n in sorted(by_transport.items()))
    print(f"  accepted {len(accepted)} ({transports}), refused {len(refused)}")
    checks.expect(not refused, f"failover: {len(refused)} message(s) refused: {refused[:3]}")
    fallback = frozenset(ledger.events[AuditEvent.FALLBACK] & set(accepted))
    checks.expect(
        bool(fallback), "failover: the fallback took no message while the broker was away"
    )
    # At-least-once: a publish that reached the broker just as the proxy went silent is stored
    # there, but its confirm never comes back, so the router stores it in the fallback as well
    # and the drain delivers it a second time (consumers are idempotent on the message id).
    # Only a message the fallback took may arrive twice; one stored by RabbitMQ alone may not.
    compare_copies(
        "failover", ledger.copies(accepted), consumers.copies(), checks, may_repeat=fallback
    )


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
        return bool(exc.reply_code == 403)
    finally:
        if connection.is_open:
            connection.close()
    return False


def poison_act(
    runtime: Any,
    *,
    passwords: dict[str, str],
    redrive_env: dict[str, str],
    measure: Callable[[dict[str, int]], None],
    ledger: Ledger,
    checks: Checks,
) -> None:
    """A community consumer cannot process an emergency alert until it is "fixed"; checks that
    the alert was retried, dead-lettered (and measured there by ``measure``, the broker metrics
    function), redriven (and measured gone) and then processed exactly once."""
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
    result = dispatch({"messages": [alert]}, f"{FUNCTION_ARN}:government", runtime)["results"][0]
    print(f"   government publishes an emergency alert to community: {result}")
    if not checks.expect(result["status"] == ACCEPTED, f"poison act: the alert was {result}"):
        return
    ledger.accepted(alert, "government", result["transport"])
    for event in (AuditEvent.RETRIED, AuditEvent.DEAD_LETTERED, AuditEvent.REDRIVEN):
        ledger.events[event].add(alert["message_id"])
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
    print(f"   attempts at {spacing} after publish: {dict(counts)}; dead-letter queue {dlq}")
    measure({dlq: 1})
    runtime_redrive = build_redrive(RedriveSettings.from_env(redrive_env))
    dry = runtime_redrive.redriver.run(
        runtime_redrive.queue("rabbitmq", dlq),
        parse_request({"source": "rabbitmq", "queue": dlq, "dry_run": True}).plan,
    )
    for item in dry.listed:
        print(f"   dry run lists {item.message_id} ({item.topic}, reason {item.reason})")
    checks.expect(
        [item.message_id for item in dry.listed] == [alert["message_id"]],
        f"poison act: the redrive dry run listed {len(dry.listed)} letter(s), stopped:"
        f" {dry.stopped}; expected the alert alone",
    )
    fixed = True
    print("   the community team ships a fix; the operator redrives the DLQ")
    report = runtime_redrive.redriver.run(
        runtime_redrive.queue("rabbitmq", dlq),
        parse_request({"source": "rabbitmq", "queue": dlq}).plan,
    )
    print(f"   redrive: moved {report.moved}, stopped: {report.stopped}")
    checks.expect(
        report.moved == 1 and report.stopped == "empty",
        f"poison act: the redrive moved {report.moved}, stopped: {report.stopped}",
    )
    again = runtime_redrive.redriver.run(runtime_redrive.queue("rabbitmq", dlq))
    print(f"   a second redrive finds {again.scanned} letters, stopped: {again.stopped}")
    checks.expect(
        again.scanned == 0 and again.stopped == "empty",
        f"poison act: a second redrive scanned {again.scanned}, stopped: {again.stopped}",
    )
    measure({dlq: 0})
    counts = consumer.run(max_messages=1, idle_timeout_s=10)
    print(f"   after the redrive: {dict(counts)}; processed {len(processed)} time(s)")
    checks.expect(
        len(attempts) == 4 and processed == [alert["message_id"]],
        f"poison act: {len(attempts)} attempts (expected 3 failing, then 1 after the redrive),"
        f" processed {len(processed)} time(s) (expected once)",
    )


def broker_metrics(environment: dict[str, str], checks: Checks) -> Callable[[dict[str, int]], None]:
    """The broker metrics function's handler with ``environment``, imported once like a warm
    function's; each call of the result is a run of it checked by ``measure_depths`` (queue ->
    messages the act left there) against the queues the environment names."""
    from fabric.settings import BrokerMetricsSettings
    from fabric.topology import AUDIT_QUEUE

    handler = _lambda_handler("broker_metrics", environment)
    # fabric.audit holds the acts' audit batches until the audit act writes them: the function
    # measures it for the audit backlog alarm, and its depth here is no dead letter's.
    queues = [q for q in BrokerMetricsSettings.from_env(environment).queues if q != AUDIT_QUEUE]
    return lambda left: measure_depths(handler, queues, left, checks)


def measure_depths(
    handler: Any,
    queues: Iterable[str],
    left: dict[str, int],
    checks: Checks,
    *,
    patience: float = 30.0,
    interval: float = 1.0,
) -> None:
    """Invoke the broker metrics function's ``handler`` (a scheduled event) and check the depths
    in the EMF lines it writes: ``left`` (queue -> messages the act left there), every other of
    the measured ``queues`` empty, none unmeasured. The management API samples queue statistics
    every 5 s, so a run just after a dead-letter or a redrive may still read the depth before
    it: runs follow each other every ``interval`` seconds for up to ``patience`` seconds, the
    last one is the verdict."""
    import contextlib
    import io

    from fabric.topology import OVERFLOW_QUEUE

    expected = {queue: left.get(queue, 0) for queue in queues}
    # A queue the act used that the function does not measure is one its alarm cannot see.
    unwatched = sorted(set(left) - set(expected))
    checks.expect(not unwatched, f"broker metrics: the function does not measure {unwatched}")
    deadline = time.monotonic() + patience
    runs = 0
    while True:
        lines = io.StringIO()
        with contextlib.redirect_stdout(lines):  # the function's EMF lines
            handler.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None)
        runs += 1
        depths, unmeasured = emitted_depths(lines.getvalue())
        ok = {q: depths.get(q) for q in expected} == expected and unmeasured == 0
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    others = sum(depths.get(q, 0) for q in expected if q not in left and q != OVERFLOW_QUEUE)
    named = ", ".join(f"{q} {depths.get(q, '-')}" for q in left)
    print(
        f"   broker metrics (EMF lines of the last of {runs} run(s)): {named}, other DLQs {others},"
        f" {OVERFLOW_QUEUE} {depths.get(OVERFLOW_QUEUE, '-')}, unmeasured {unmeasured}"
    )
    wrong = {q: (depths.get(q), n) for q, n in expected.items() if depths.get(q) != n}
    checks.expect(
        ok,
        f"broker metrics: (measured, left by the act) {wrong}, {unmeasured} queue(s) unmeasured",
    )


def emitted_depths(lines: str) -> tuple[dict[str, int], int]:
    """(queue -> ``QueueDepth``, ``QueuesUnmeasured``) of the broker metrics' EMF ``lines``."""
    from fabric.broker_depth import QUEUE_DEPTH, QUEUE_DIMENSION, QUEUES_UNMEASURED

    depths: dict[str, int] = {}
    unmeasured = 0
    for line in lines.splitlines():
        document = json.loads(line)
        if QUEUE_DEPTH in document:
            depths[document[QUEUE_DIMENSION]] = document[QUEUE_DEPTH]
        unmeasured += document.get(QUEUES_UNMEASURED, 0)
    return depths, unmeasured


# -- the audit trail -----------------------------------------------------------------------------


def audit_batch_sizes(templates: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The ``BatchSize`` of the audit writer's event sources in the template, by event source
    (``aws:rmq``: the broker's audit queue, ``aws:sqs``: the SQS audit queue)."""
    writer, _ = _function(templates, AUDIT_WRITER_DESCRIPTION)
    return {
        "aws:rmq" if "Queues" in props else "aws:sqs": props["BatchSize"]
        for resource in templates["Services"]["Resources"].values()
        if resource["Type"] == "AWS::Lambda::EventSourceMapping"
        for props in [resource["Properties"]]
        if props["FunctionName"] == {"Ref": writer}
    }


def _write_from_rabbitmq(
    write: Callable[[dict[str, Any]], None], passwords: dict[str, str], batch_size: int
) -> int:
    """Every batch on the RabbitMQ audit queue through ``write`` (the audit writer),
    in Amazon MQ events of up to ``batch_size`` messages, acked once written; how many."""
    import base64

    from fabric.topology import AUDIT_QUEUE, AUDIT_READER_USER

    # As the deployed event source reads it: as the audit reader.
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            5672,
            LOCAL_VHOST,
            pika.PlainCredentials(AUDIT_READER_USER, passwords[AUDIT_READER_USER]),
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
        if batches and (method is None or len(batches) == batch_size):
            write({"eventSource": "aws:rmq", "rmqMessagesByQueue": {AUDIT_QUEUE: batches}})
            channel.basic_ack(last_tag, multiple=True)
            batches = []
        if method is None:
            break
    connection.close()
    return count


def _write_from_sqs(write: Callable[[dict[str, Any]], None], batch_size: int) -> int:
    """Every batch on the SQS audit queue through ``write`` (the audit writer), in
    SQS events of up to ``batch_size`` records, deleted once written; how many."""
    import boto3

    from fabric.naming import audit_queue_name

    # What the components sent while RabbitMQ could not take it (the failover act's outage).
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=audit_queue_name("dev"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    count = 0
    while received := sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=min(batch_size, 10), MessageAttributeNames=["All"]
    ).get("Messages", []):
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                # Lambda hands SQS message attributes over with lower-camel-case keys.
                "messageAttributes": {
                    name: {"stringValue": value.get("StringValue"), "dataType": value["DataType"]}
                    for name, value in m.get("MessageAttributes", {}).items()
                },
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": REGION,
            }
            for m in received
        ]
        write({"Records": records})
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)
            ],
        )
        count += len(received)
    return count


def replay_act(
    environment: dict[str, str],
    passwords: dict[str, str],
    ledger: Ledger,
    checks: Checks,
) -> None:
    """The replay function's code re-publishes the last hour's child-safety messages from the
    audit archive: a dry run, then the replay; checks that it replayed exactly the run's
    child-safety messages, each copy once, in exactly the queues the routing table sends it to,
    with the replay's header (and that nothing else waits in the stakeholder queues)."""
    print("   replay (the replay function's code): the last hour's child-safety messages, from the")
    print("   archive the writer just made")
    from fabric.bootstrap import build_replay
    from fabric.envelope import format_timestamp
    from fabric.replay import REPLAYED, parse_request
    from fabric.settings import ReplaySettings
    from fabric.stakeholders import STAKEHOLDERS
    from fabric.topology import REPLAY_HEADER, queue_name, user_name

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
    problems = done.finished - done.replayed + done.failed  # every outcome but replayed
    print(
        f"   replay {done.replay_id}: trail"
        f" {'verified' if not done.trail_problems else 'NOT verified'} first;"
        f" {done.replayed} replayed (same message ids, stored bytes as they are),"
        f" {problems} problem(s), stopped: {done.stopped}"
    )
    for problem in done.trail_problems:
        print(f"   trail problem: {problem}")
    checks.expect(
        done.stopped == "done" and not problems and not done.trail_problems,
        f"replay: stopped: {done.stopped}, {problems} problem(s),"
        f" trail problems {done.trail_problems}",
    )
    selected = {mid for mid, topic in ledger.topics.items() if topic.startswith("child-safety.")}
    replayed = {item.message_id for item in done.messages if item.outcome == REPLAYED}
    ledger.events[AuditEvent.REPLAYED] |= selected
    checks.expect(
        replayed == selected and dry.would_replay == len(selected),
        f"replay: {len(replayed)} replayed ({dry.would_replay} in the dry run) of the run's"
        f" {len(selected)} child-safety messages; not replayed {sorted(selected - replayed)[:3]},"
        f" not the run's {sorted(replayed - selected)[:3]}",
    )
    marked: Counter[tuple[str, str]] = Counter()
    unmarked: list[tuple[str, str]] = []
    for group in STAKEHOLDERS:
        # As the group: the platform user reads no queue.
        user = user_name(group)
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", 5672, LOCAL_VHOST, pika.PlainCredentials(user, passwords[user])
            )
        )
        channel = connection.channel()
        for emergency in (False, True):
            queue = queue_name(group, emergency=emergency)
            while True:
                method, properties, _ = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                if (properties.headers or {}).get(REPLAY_HEADER) == done.replay_id:
                    marked[(properties.message_id, queue)] += 1
                else:
                    unmarked.append((properties.message_id, queue))
        connection.close()
    print(f"   {marked.total()} copies in the stakeholder queues carry {REPLAY_HEADER}")
    checks.expect(
        not unmarked,
        f"replay: {len(unmarked)} copies without the replay's header in the stakeholder queues:"
        f" {unmarked[:3]}",
    )
    compare_copies("replay", ledger.copies(selected), marked, checks)


def audit_act(
    templates: dict[str, dict[str, Any]],
    resolver: Resolver,
    passwords: dict[str, str],
    ledger: Ledger,
    checks: Checks,
) -> None:
    """Write the run's audit batches into the audit bucket as the audit writer function does,
    run the replay act on the archive they made and write its records too, seal,
    read back, verify, check the trail holds every message id of every event the acts caused,
    report."""
    print("== audit trail (audit queues -> audit writer -> Object Lock bucket, verified)")
    import boto3

    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.adapters.kms_signer import kms_keyring
    from fabric.audit_chain import verify_trail
    from fabric.audit_writer import batches_from_event
    from fabric.bootstrap import build_audit_writer
    from fabric.settings import AuditWriterSettings

    settings = AuditWriterSettings.from_env(
        local_environment(templates, resolver, AUDIT_WRITER_DESCRIPTION)
    )
    clients = {name: boto3.client(name) for name in ("s3", "kms", "dynamodb")}
    # The function's writer, but with boto3's default timeouts instead of the function's 2 s
    # read timeout: moto copies the whole table for every DynamoDB transaction, so storing the
    # marks of 99 batches takes it seconds once the run's batches are in the table.
    writer = build_audit_writer(settings, client_factory=clients.__getitem__)
    sizes = audit_batch_sizes(templates)

    def write(event: dict[str, Any]) -> None:
        """What the audit writer function's handler does with an event source's event."""
        writer.write(
            batches_from_event(
                event, trusted=settings.trusted_publishers, environment=settings.environment
            )
        )

    from_rabbitmq = _write_from_rabbitmq(write, passwords, sizes["aws:rmq"])
    from_sqs = _write_from_sqs(write, sizes["aws:sqs"])
    # Sealed first, as the hourly checkpoint does: replay publishes only sealed acceptances.
    checkpoints_made = [writer.checkpoint()]
    replay_act(
        local_environment(templates, resolver, REPLAY_DESCRIPTION, LOCAL_BROKER),
        passwords,
        ledger,
        checks,
    )
    from_rabbitmq += _write_from_rabbitmq(write, passwords, sizes["aws:rmq"])  # the replay's
    checkpoints_made.append(writer.checkpoint())
    # The dev template names one signing key; the verifiers trust the keys a rotation retired too.
    keys = kms_keyring([settings.signing_key_arn], lambda: clients["kms"])
    store = S3ObjectStore(settings.bucket, lambda: clients["s3"])
    objects = {k: store.get(k) for k in store.keys(f"audit/{settings.writer}/")}
    checkpoints = [
        (k, json.loads(store.get(k))) for k in store.keys(f"checkpoints/{settings.writer}/")
    ]
    result = verify_trail(
        objects=objects, checkpoints=checkpoints, keys=keys, writer=settings.writer
    )
    print(
        f"   {result.records} records in {result.objects} objects of s3://{settings.bucket}/audit/"
    )
    print(
        f"   audit batches: {from_rabbitmq} from the RabbitMQ audit queue (events of up to"
        f" {sizes['aws:rmq']}), {from_sqs} from the SQS audit queue (sent during the outage;"
        f" events of up to {sizes['aws:sqs']})"
    )
    print(
        f"   sealed by {' and '.join(checkpoints_made)} (before and after the replay; ECDSA P-256"
        " signatures by the signing key)"
    )
    print(f"   verifier: {'verified' if result.ok else f'FAILED at {result.problem}'}")
    checks.expect(result.ok, f"audit trail: the verifier failed at {result.problem}")
    print("   message ids per event, in the trail / caused by the acts:")
    for event in sorted(set(result.message_ids) | set(ledger.events)):
        found, caused = result.message_ids.get(event, set()), ledger.events.get(event, set())
        print(f"     {event:14s} {len(found):5d} / {len(caused)}")
        checks.expect(
            found == caused,
            f"audit trail: {event}: {len(caused - found)} id(s) the acts caused are missing"
            f" {sorted(caused - found)[:3]}, {len(found - caused)} the acts did not cause"
            f" {sorted(found - caused)[:3]}",
        )
    checks.expect(write_report(templates, resolver), "compliance report: the trail does not verify")


def write_report(templates: dict[str, dict[str, Any]], resolver: Resolver) -> bool:
    """The compliance report of the run's trail, by the report function's handler in-process:
    the reports bucket and the compliance topic created in moto as the dev template declares
    them, the function's environment from the template, the three files read back from the
    reports bucket into build/reports. True when the report says the trail verifies."""
    import contextlib
    import io

    import boto3

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    inbox = _report_resources(templates, resolver)
    handler = _lambda_handler(
        "compliance_report", local_environment(templates, resolver, REPORT_DESCRIPTION)
    )
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


def _report_resources(templates: dict[str, dict[str, Any]], resolver: Resolver) -> str:
    """The audit key, the reports bucket (versioned, SSE-KMS with that key) and the compliance
    topic in moto, added to the resolver's stand-ins; the URL of a queue subscribed to the
    topic."""
    import boto3

    physical = resolver.physical
    stateful, services = templates["Stateful"], templates["Services"]
    s3, kms, sns, sqs = (boto3.client(name) for name in ("s3", "kms", "sns", "sqs"))
    (audit_key,) = [
        logical_id
        for logical_id, r in stateful["Resources"].items()
        if r["Type"] == "AWS::KMS::Key"
        and "compliance reports" in r["Properties"].get("Description", "")
    ]
    description = stateful["Resources"][audit_key]["Properties"]["Description"]
    key_arn = kms.create_key(Description=description)["KeyMetadata"]["Arn"]
    physical[f"{audit_key}.Arn"] = key_arn
    reports_id = stateful["Outputs"]["ReportsBucketName"]["Value"]["Ref"]
    reports = physical[reports_id] = f"fabric-dev-local-{reports_id.lower()}"
    s3.create_bucket(Bucket=reports, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=reports, VersioningConfiguration={"Status": "Enabled"})
    default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
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


def _lambda_handler(function: str, environment: dict[str, str]) -> Any:
    """``lambdas/<function>/handler.py`` imported as Lambda would, with ``environment`` as its
    variables (a handler builds its parts at import; the variables are restored)."""
    import importlib.util

    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        path = ROOT / "lambdas" / function / "handler.py"
        spec = importlib.util.spec_from_file_location(f"{function}_handler", path)
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


def run(templates: dict[str, dict[str, Any]], checks: Checks) -> None:
    """Create the stand-ins, apply the topology and play every act, recording in ``checks``."""
    from fabric.bootstrap import router_runtime
    from fabric.protection import open_envelope

    physical, passwords = create_aws_resources(templates)
    apply_local_topology(passwords)
    resolver = Resolver(templates, physical)
    environment = local_environment(templates, resolver, ROUTER_DESCRIPTION, LOCAL_BROKER)
    raw = function_environment(templates)
    print("== local fabric (dev template, local RabbitMQ, embedded moto)")
    for name, value in sorted(environment.items()):
        template = raw[name] if isinstance(raw[name], str) else "the broker's, at deploy time"
        print(f"   {name}={value}" + (f"   (template: {template})" if name in LOCAL_BROKER else ""))
    runtime = router_runtime(environment)
    ledger = Ledger()
    print("== scenario")
    with Consumers(passwords) as consumers:
        sent, rejected = play(runtime, ledger, checks)
        consumers.settle(ledger.queues, timeout=10)
        arrived = {queue: list(items) for queue, items in consumers.arrived.items()}
        report(arrived, sent, ledger.queues, rejected)
        compare_copies("scenario", ledger.queues, consumers.copies(), checks)

        cipher = runtime.router._cipher
        alerts = arrived.get("fabric.government.emergency", [])[:1]
        for _, message, _ in alerts:
            payload = json.loads(open_envelope(cipher, message, environment="dev"))
            print(f"   government decrypts the emergency alert: summary={payload['summary']!r}")
        checks.expect(bool(alerts), "no emergency alert reached government to decrypt")
        refused = access_refused(passwords)
        print(f"   media user reading the government queue is refused: {refused}")
        checks.expect(refused, "the media user was not refused the government queue")
    print("== poison-message act (retry tiers, dead letter, redrive, processed once)")
    poison_act(
        runtime,
        passwords=passwords,
        redrive_env=local_environment(templates, resolver, REDRIVE_DESCRIPTION, LOCAL_BROKER),
        measure=broker_metrics(
            local_environment(templates, resolver, BROKER_METRICS_DESCRIPTION, LOCAL_MANAGEMENT),
            checks,
        ),
        ledger=ledger,
        checks=checks,
    )
    with Consumers(passwords) as consumers:
        print("== failover act (the broker becomes unreachable mid-scenario)")
        failover(
            environment,
            local_environment(templates, resolver, DRAIN_DESCRIPTION, LOCAL_BROKER),
            consumers,
            ledger,
            checks,
        )
    audit_act(templates, resolver, passwords, ledger, checks)


def main(argv: list[str]) -> int:
    """Run the local fabric once and print the report; 0 when every check passed, else 1."""
    assembly = Path(next((a for a in argv[1:] if not a.startswith("--")), "cdk.out"))
    # `make` stopped, or a CI timeout: leave through the `finally` below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    lock = take_lock()
    if lock is None:
        return 1
    checks = Checks()
    templates = dev_templates(assembly)
    server = start_moto()
    try:
        run(templates, checks)
    except Exception as exc:  # the run cannot go on: that is its verdict, after the trace
        traceback.print_exc()
        checks.failures.append(f"the run stopped: {type(exc).__name__}: {exc}")
    except BaseException as exc:  # Ctrl-C, SIGTERM: clean up, then stop as asked
        print(f"== FAIL: interrupted ({type(exc).__name__})")
        raise
    finally:
        if "--keep" not in argv:
            drop_local_topology()
        server.stop()
        lock.close()
    if checks.failures:
        print(f"== FAIL: {len(checks.failures)} check(s) failed:")
        for failure in checks.failures:
            print(f"   {failure}")
        print("== FAIL")
        return 1
    print("== PASS: nothing lost, misrouted, duplicated or wrongly rejected; the trail is complete")
    return 0


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
    print("== rejected (reason, detail), each as the scenario states")
    for label, reason, detail in rejected:
        print(f"   {label:20s} {reason:24s} {detail}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
