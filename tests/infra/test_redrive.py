"""The redrive function: on demand only, one at a time, reaching exactly the queues it redrives."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import aws_sqs as sqs

from fabric.adapters.sqs_dlq import DEFAULT_HOLD_SECONDS
from fabric.naming import audit_queue_name, fallback_queue_names
from fabric.stakeholders import STAKEHOLDERS
from stacks.constructs.queues import address
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import LAMBDA_ENVIRONMENT_LIMIT, render, sized
from tests.infra.test_functions import fabric_functions, of_type, services

BROKER_VARIABLES = {
    "FABRIC_ENV",
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_TLS",
    "RABBITMQ_VHOST",
    "RABBITMQ_SECRET_ARN",
}


def redrive(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((item),) = (
        (k, v)
        for k, v in fabric_functions(template).items()
        if "redrives dead letters" in v["Properties"]["Description"]
    )
    return item


def statements(template: dict[str, Any], function: dict[str, Any]) -> list[dict[str, Any]]:
    role = function["Properties"]["Role"]["Fn::GetAtt"][0]
    return [
        statement
        for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")
        for policy in of_type(template, kind).values()
        if {"Ref": role} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def redrive_sources(env: Synthesized, assembly: Assembly) -> tuple[list[str], str, str]:
    """``SQS_REDRIVE_SOURCES`` (the source queues' names), and the URL and ARN prefixes."""
    _, function = redrive(services(env, assembly))
    variables = function["Properties"]["Environment"]["Variables"]
    names = json.loads(render(variables["SQS_REDRIVE_SOURCES"]))
    assert isinstance(names, list), names
    assert all(isinstance(n, str) for n in names), names
    return names, render(variables["SQS_URL_PREFIX"]), render(variables["SQS_ARN_PREFIX"])


def redriven_queues(env: Synthesized) -> list[sqs.IQueue]:
    """The 16 sources and their 16 DLQs, as constructs of the stateful stack."""
    stateful = env.stage.stateful
    queues: list[sqs.IQueue] = []
    for fallback in stateful.fallback.queues.values():
        queues += [fallback.queue, fallback.dead_letter_queue]
    for group in STAKEHOLDERS:
        queues += [stateful.ingest.queues[group], stateful.ingest.dead_letter_queues[group]]
    queues += [stateful.audit_queue.queue, stateful.audit_queue.dead_letter_queue]
    return queues


def test_the_redrive_is_named_bounded_and_runs_one_at_a_time(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    logical_id, function = redrive(template)
    props = function["Properties"]
    name = env.stage.stage_name
    # The runbook invokes it by this name (scripts/runbook.py redrive --env <env>).
    assert props["FunctionName"] == f"fabric-{name}-redrive"
    assert props["ReservedConcurrentExecutions"] == 1
    assert props["Timeout"] == 900
    # Letters an SQS run looked at stay hidden for longer than the run can last: back in view
    # mid-run, they made it end "empty" with matching letters left.
    assert props["Timeout"] < DEFAULT_HOLD_SECONDS
    assert props["MemorySize"] == 512
    (config,) = [
        c
        for c in of_type(template, "AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": logical_id}
    ]
    assert config["Properties"]["MaximumRetryAttempts"] == 0


def test_the_redrive_is_deployed_after_the_topology_and_the_audit_writer(
    env: Synthesized, assembly: Assembly
) -> None:
    # Its user exists once the topology is applied, and the writer that trusts that user's
    # audit batches is updated first (and rolled back last).
    template = services(env, assembly)
    _, function = redrive(template)
    (topology,) = of_type(template, "Custom::FabricTopology")
    (writer,) = [
        k
        for k, f in of_type(template, "AWS::Lambda::Function").items()
        if f["Properties"].get("FunctionName") == f"fabric-{env.stage.stage_name}-audit-writer"
    ]
    assert {topology, writer} <= set(function["DependsOn"])


def test_the_redrive_gets_exactly_the_variables_its_settings_read(
    env: Synthesized, assembly: Assembly
) -> None:
    _, function = redrive(services(env, assembly))
    variables = function["Properties"]["Environment"]["Variables"]
    assert set(variables) == {
        *BROKER_VARIABLES,
        "IDEMPOTENCY_TABLE",
        "SQS_REDRIVE_SOURCES",
        "SQS_URL_PREFIX",
        "SQS_ARN_PREFIX",
        "REDRIVE_MAX_SECONDS",
        "AUDIT_QUEUE_URL",
    }
    assert variables["FABRIC_ENV"] == env.stage.stage_name
    assert (variables["RABBITMQ_PORT"], variables["RABBITMQ_TLS"]) == ("5671", "true")
    assert variables["RABBITMQ_VHOST"] == "/"
    assert "BrokerUsersfabricredrive" in json.dumps(variables["RABBITMQ_SECRET_ARN"])
    assert "IdempotencyTable" in json.dumps(variables["IDEMPOTENCY_TABLE"])
    # A minute inside the 15-minute timeout.
    assert variables["REDRIVE_MAX_SECONDS"] == "840"
    assert "password" not in json.dumps(variables).lower()


def test_every_sqs_dead_letter_queue_is_listed_by_its_source(
    env: Synthesized, assembly: Assembly
) -> None:
    name = env.stage.stage_name
    names, _, _ = redrive_sources(env, assembly)
    expected = [n for _, _, n in fallback_queue_names(name)]
    expected += [f"fabric-{name}-ingest-{group.value}" for group in STAKEHOLDERS]
    expected += [audit_queue_name(name)]
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names)) == 16

    queues = {
        q["Properties"]["QueueName"]: (logical_id, q["Properties"])
        for logical_id, q in env.resources("AWS::SQS::Queue").items()
    }
    for source in names:
        # The library reads `<name>-dlq` as the source's DLQ: it exists, and the source really
        # dead-letters into it.
        dlq = f"{source}-dlq"
        assert dlq in queues, dlq
        dlq_id, _ = queues[dlq]
        _, source_props = queues[source]
        assert source_props["RedrivePolicy"]["deadLetterTargetArn"] == {
            "Fn::GetAtt": [dlq_id, "Arn"]
        }


def test_the_prefixes_make_the_queues_own_urls_and_arns(
    env: Synthesized, assembly: Assembly
) -> None:
    account = env.stage.stateful.account
    region = env.region
    names, url_prefix, arn_prefix = redrive_sources(env, assembly)
    assert url_prefix == f"https://sqs.{region}.amazonaws.com/{account}/"
    assert arn_prefix == f"arn:aws:sqs:{region}:{account}:"

    # What the function derives (fabric.settings.RedriveSettings) is what address() builds for
    # the same queue, in either stack.
    services_stack = env.stage.services
    derived = {n for source in names for n in (source, f"{source}-dlq")}
    built = {}
    for queue in redriven_queues(env):
        for stack in (services_stack, env.stage.stateful):
            where = address(stack, queue)
            url, arn = render(stack.resolve(where.url)), render(stack.resolve(where.arn))
            assert url == f"{url_prefix}{where.name}", url
            assert arn == f"{arn_prefix}{where.name}", arn
        built[where.name] = arn
    assert set(built) == derived

    # And the stateful stack's own ARN of each source (in its DLQ's redrive-allow policy).
    queues = {q["Properties"]["QueueName"]: q for q in env.resources("AWS::SQS::Queue").values()}
    for source in names:
        allowed = queues[f"{source}-dlq"]["Properties"]["RedriveAllowPolicy"]
        assert [render(a) for a in allowed["sourceQueueArns"]] == [f"{arn_prefix}{source}"]


def test_nothing_invokes_the_redrive_but_an_operator(env: Synthesized, assembly: Assembly) -> None:
    template = services(env, assembly)
    logical_id, _ = redrive(template)
    for kind in ("AWS::Events::Rule", "AWS::Scheduler::Schedule", "AWS::Lambda::Permission"):
        for resource in of_type(template, kind).values():
            assert logical_id not in json.dumps(resource), (kind, resource)
    for mapping in of_type(template, "AWS::Lambda::EventSourceMapping").values():
        assert mapping["Properties"]["FunctionName"] != {"Ref": logical_id}


def test_the_redrive_holds_no_wildcard_and_no_scan(env: Synthesized, assembly: Assembly) -> None:
    template = services(env, assembly)
    _, function = redrive(template)
    for statement in statements(template, function):
        actions = listed(statement["Action"])
        assert statement["Effect"] == "Allow"
        assert not any(a == "*" or a.endswith(":*") for a in actions), statement
        assert not any(a in ("dynamodb:Scan", "dynamodb:Query") for a in actions), statement
        assert not any(a.startswith("dynamodb:") and "Table" in a for a in actions), statement
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in actions), statement


def test_dead_letter_reads_are_scoped_to_the_dead_letter_queues(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, function = redrive(template)
    names, _, arn_prefix = redrive_sources(env, assembly)
    dlq_arns = {f"{arn_prefix}{name}-dlq" for name in names}
    source_arns = {f"{arn_prefix}{name}" for name in names}
    assert len(dlq_arns) == len(source_arns) == 16
    granted = statements(template, function)

    def resources_of(action: str) -> set[str]:
        found: set[str] = set()
        for statement in granted:
            if action in listed(statement["Action"]):
                # The queues' ARNs are literal; the function's own async DLQ is a GetAtt.
                found.update(r for r in listed(statement["Resource"]) if isinstance(r, str))
        return found

    for action in (
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
    ):
        assert resources_of(action) == dlq_arns, action
    # Back to the sources only (besides Lambda's write of a failed event to its own async DLQ).
    assert resources_of("sqs:SendMessage") == source_arns
    (own_dlq,) = [
        s
        for s in granted
        if listed(s["Action"]) == ["sqs:SendMessage"] and isinstance(s["Resource"], dict)
    ]
    assert "RedriveAsyncDlq" in json.dumps(own_dlq["Resource"])
    # The redrive moves letters itself, to filter and audit each (fabric.adapters.sqs_dlq): SQS's
    # message-move tasks, which move a whole DLQ unaudited, are not granted.
    moves = [a for s in granted for a in listed(s["Action"]) if "MessageMoveTask" in a]
    assert moves == []


def test_the_redrive_reads_and_writes_ledger_items_only(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, function = redrive(template)
    granted = statements(template, function)
    (ledger,) = [s for s in granted if any(a.startswith("dynamodb:") for a in listed(s["Action"]))]
    # The ledger adapter's batches, on the ledger's own items: never the audit chain's state
    # or the consumers' idempotency records that share the table.
    assert sorted(listed(ledger["Action"])) == ["dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"]
    assert "IdempotencyTable" in json.dumps(ledger["Resource"])
    assert ledger["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["redrive#*"]}
    }
    keys = [s for s in granted if any(a.startswith("kms:") for a in listed(s["Action"]))]
    vias = {
        json.dumps(s["Resource"]): s.get("Condition", {})
        .get("StringEquals", {})
        .get("kms:ViaService")
        for s in keys
    }
    region = env.region
    assert {via for resource, via in vias.items() if "KeysTables" in resource} == {
        f"dynamodb.{region}.amazonaws.com"
    }
    # The table key for the ledger's table only (DynamoDB's encryption context names it).
    table = function["Properties"]["Environment"]["Variables"]["IDEMPOTENCY_TABLE"]
    assert [
        s["Condition"]["StringEquals"]["kms:EncryptionContext:aws:dynamodb:tableName"]
        for s in keys
        if "KeysTables" in json.dumps(s["Resource"])
    ] == [table]
    assert {via for resource, via in vias.items() if "KeysQueues" in resource} == {
        f"sqs.{region}.amazonaws.com"
    }
    assert {via for resource, via in vias.items() if "KeysSecrets" in resource} == {
        f"secretsmanager.{region}.amazonaws.com"
    }
    secret_reads = [s for s in granted if "secretsmanager:GetSecretValue" in listed(s["Action"])]
    assert len(secret_reads) == 1
    assert "BrokerUsersfabricredrive" in json.dumps(secret_reads[0]["Resource"])


def _environment_size(function: dict[str, Any]) -> int:
    variables = function["Properties"].get("Environment", {}).get("Variables", {})
    return sum(len(key) + sized(value) for key, value in variables.items())


def test_the_other_functions_environments_fit_lambdas_4_kb_limit(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    redrive_id, _ = redrive(template)
    for logical_id, function in fabric_functions(template).items():
        if logical_id != redrive_id:
            assert _environment_size(function) <= LAMBDA_ENVIRONMENT_LIMIT, logical_id


def test_the_redrive_environment_fits_lambdas_4_kb_limit(
    env: Synthesized, assembly: Assembly
) -> None:
    _, function = redrive(services(env, assembly))
    assert _environment_size(function) <= LAMBDA_ENVIRONMENT_LIMIT
