"""The audit writer: its three triggers, write-only access to the trail, and what no role may do.

The Object Lock mode and period of the audit bucket per environment (prod: COMPLIANCE, 7 years,
as cdk.json says) are asserted in tests/infra/test_audit_storage.py.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any

import pytest

from fabric.naming import audit_queue_name
from fabric.topology import AUDIT_QUEUE
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import PSEUDO, Unresolved
from tests.infra.test_functions import fabric_functions, of_type, services
from tests.infra.test_redrive import listed, statements

# What no role may do to the trail: shorten or lift a version's retention, take it off Object
# Lock's protection, delete versions, change the bucket's lock; and retire the signing key.
FORBIDDEN_ON_THE_BUCKET = (
    "s3:PutObjectRetention",
    "s3:BypassGovernanceRetention",
    "s3:DeleteObjectVersion",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutObjectLegalHold",
)
FORBIDDEN_ON_THE_SIGNING_KEY = ("kms:ScheduleKeyDeletion", "kms:DisableKey")
# AWS managed policies a role may carry: CloudWatch Logs only (CDK's custom-resource providers).
AWS_MANAGED_POLICIES = {"arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"}

# Stand-ins for the two resources, so that any rendered ARN pattern can be matched against them.
BUCKET = "the-audit-bucket"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
SIGNING_KEY = "the-signing-key"


def writer(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((item),) = (
        (k, v)
        for k, v in fabric_functions(template).items()
        if "writes audit batches" in v["Properties"]["Description"]
    )
    return item


class Trail:
    """Renders the templates' values as strings, the audit bucket and the signing key (and the
    other stateful resources a test names) as recognisable stand-ins."""

    def __init__(self, env: Synthesized, assembly: Assembly) -> None:
        self.env = env
        self.services = services(env, assembly)
        self.stateful = env.json
        self.region = env.region
        self.account = env.stage.stateful.account
        resources = self.stateful["Resources"]
        (self.bucket_id,) = [
            k
            for k, v in resources.items()
            if v["Type"] == "AWS::S3::Bucket" and v["Properties"].get("ObjectLockEnabled")
        ]
        (self.signing_key_id,) = [
            k
            for k, v in resources.items()
            if v["Type"] == "AWS::KMS::Key" and v["Properties"].get("KeyUsage") == "SIGN_VERIFY"
        ]
        self.signing_key_arn = f"arn:aws:kms:{self.region}:{self.account}:key/{SIGNING_KEY}"
        self.stand_ins = {
            (self.bucket_id, "Ref"): BUCKET,
            (self.bucket_id, "Arn"): BUCKET_ARN,
            (self.signing_key_id, "Ref"): SIGNING_KEY,
            (self.signing_key_id, "Arn"): self.signing_key_arn,
        }

    def render(self, value: Any, *, stateful: bool = False) -> str:
        """``value`` as a string: pseudo parameters resolved, the bucket and the signing key as
        stand-ins, any other resource as ``<stack>:<logical id>.<attribute>``.

        Raises:
            Unresolved: an intrinsic this does not know (look at it before allowing it).
        """
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and len(value) == 1:
            ((function, argument),) = value.items()
            if function == "Ref":
                return self._resource(argument, "Ref", stateful=stateful)
            if function == "Fn::GetAtt":
                return self._resource(argument[0], argument[1], stateful=stateful)
            if function == "Fn::Join":
                separator, parts = argument
                return str(separator).join(self.render(p, stateful=stateful) for p in parts)
            if function == "Fn::Sub" and isinstance(argument, str):
                for name, pseudo in self._pseudo().items():
                    argument = argument.replace("${" + name + "}", pseudo)
                if "${" not in argument:
                    return argument
            if function == "Fn::GetStackOutput" and not stateful:
                output = self.stateful["Outputs"][argument["OutputName"]]
                return self.render(output["Value"], stateful=True)
        raise Unresolved(value)

    def _pseudo(self) -> dict[str, str]:
        return {**PSEUDO, "AWS::Region": self.region, "AWS::AccountId": self.account}

    def _resource(self, logical_id: str, attribute: str, *, stateful: bool) -> str:
        if attribute == "Ref" and logical_id in self._pseudo():
            return self._pseudo()[logical_id]
        if stateful and (logical_id, attribute) in self.stand_ins:
            return self.stand_ins[logical_id, attribute]
        return f"{'stateful' if stateful else 'services'}:{logical_id}.{attribute}"

    def stateful_resource(self, value: Any) -> tuple[str, str]:
        """The stateful resource a services value names through a cross-stack output."""
        output = self.stateful["Outputs"][value["Fn::GetStackOutput"]["OutputName"]]["Value"]
        if "Ref" in output:
            return output["Ref"], "Ref"
        logical_id, attribute = output["Fn::GetAtt"]
        return logical_id, attribute


@pytest.fixture
def trail(env: Synthesized, assembly: Assembly) -> Trail:
    return Trail(env, assembly)


def _policy_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every identity policy in ``template``, with where it is."""
    found = []
    for logical_id, resource in template["Resources"].items():
        kind, props = resource["Type"], resource.get("Properties", {})
        assert kind not in ("AWS::IAM::User", "AWS::IAM::Group"), logical_id
        documents = []
        if kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            documents.append(props["PolicyDocument"])
        if kind == "AWS::IAM::Role":
            documents += [policy["PolicyDocument"] for policy in props.get("Policies", [])]
        for document in documents:
            found += [(logical_id, statement) for statement in document["Statement"]]
    return found


def _allows(
    statement: dict[str, Any], action: str, resources: list[str], trail: Trail, *, stateful: bool
) -> bool:
    """Whether an Allow ``statement`` lets ``action`` act on any of ``resources`` (wildcards in
    the statement's actions and resources match as IAM matches them, conditions ignored)."""
    if statement["Effect"] != "Allow":
        return False

    def matches(pattern: str, value: str) -> bool:
        return fnmatchcase(value.lower(), pattern.lower())

    if "NotAction" in statement:
        acts = not any(matches(a, action) for a in listed(statement["NotAction"]))
    else:
        acts = any(matches(a, action) for a in listed(statement["Action"]))
    rendered = [trail.render(r, stateful=stateful) for r in listed(statement.get("Resource", []))]
    if "NotResource" in statement:
        excluded = [trail.render(r, stateful=stateful) for r in listed(statement["NotResource"])]
        on = any(not any(fnmatchcase(res, p) for p in excluded) for res in resources)
    else:
        on = any(fnmatchcase(res, pattern) for pattern in rendered for res in resources)
    return acts and on


def test_no_role_may_shorten_lift_or_delete_the_trail_or_retire_its_signing_key(
    trail: Trail,
) -> None:
    bucket_resources = [BUCKET_ARN, f"{BUCKET_ARN}/audit/any", f"{BUCKET_ARN}/checkpoints/any"]
    scanned = 0
    for stateful, template in ((False, trail.services), (True, trail.stateful)):
        for where, statement in _policy_statements(template):
            scanned += 1
            for action in FORBIDDEN_ON_THE_BUCKET:
                assert not _allows(statement, action, bucket_resources, trail, stateful=stateful), (
                    where,
                    action,
                    statement,
                )
            for action in FORBIDDEN_ON_THE_SIGNING_KEY:
                assert not _allows(
                    statement, action, [trail.signing_key_arn], trail, stateful=stateful
                ), (where, action, statement)
        for logical_id, role in of_type(template, "AWS::IAM::Role").items():
            for arn in role["Properties"].get("ManagedPolicyArns", []):
                rendered = trail.render(arn, stateful=stateful)
                # An AWS managed policy from the allowed list, or one of the templates' own,
                # which the scan above read.
                assert rendered in AWS_MANAGED_POLICIES or rendered.startswith(
                    ("services:", "stateful:")
                ), (logical_id, rendered)
    assert scanned > 50
    # Nor does the bucket's own policy allow any of it, to anyone.
    for policy in of_type(trail.stateful, "AWS::S3::BucketPolicy").values():
        if policy["Properties"]["Bucket"] == {"Ref": trail.bucket_id}:
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                for action in FORBIDDEN_ON_THE_BUCKET:
                    assert not _allows(statement, action, bucket_resources, trail, stateful=True)


def test_the_scan_sees_a_wildcard_grant(trail: Trail) -> None:
    """The matcher itself: ``*`` and ``s3:*`` count, and so does a bucket wildcard."""
    for action, resource in (
        ("*", "*"),
        ("s3:*", f"{BUCKET_ARN}/*"),
        ("s3:Put*", "arn:aws:s3:::*"),
    ):
        statement = {"Effect": "Allow", "Action": action, "Resource": resource}
        assert _allows(
            statement, "s3:PutObjectRetention", [f"{BUCKET_ARN}/audit/x"], trail, stateful=True
        )
    other = {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::another-bucket/*"}
    assert not _allows(other, "s3:DeleteObjectVersion", [f"{BUCKET_ARN}/x"], trail, stateful=True)
    statement = {
        "Effect": "Allow",
        "Action": "kms:*",
        "Resource": {"Fn::GetAtt": [trail.signing_key_id, "Arn"]},
    }
    assert _allows(
        statement, "kms:ScheduleKeyDeletion", [trail.signing_key_arn], trail, stateful=True
    )


def test_the_writer_is_named_sized_and_runs_one_at_a_time(trail: Trail) -> None:
    _, function = writer(trail.services)
    props = function["Properties"]
    name = trail.env.stage.stage_name
    assert props["FunctionName"] == f"fabric-{name}-audit-writer"
    assert (props["Timeout"], props["MemorySize"]) == (300, 1024)
    # One writer per chain: its state is advanced by a conditional write.
    assert props["ReservedConcurrentExecutions"] == 1


def test_the_writer_gets_exactly_the_variables_its_settings_read(trail: Trail) -> None:
    _, function = writer(trail.services)
    variables = function["Properties"]["Environment"]["Variables"]
    name = trail.env.stage.stage_name
    assert set(variables) == {
        "FABRIC_ENV",
        "AUDIT_BUCKET",
        "IDEMPOTENCY_TABLE",
        "SIGNING_KEY_ARN",
        "AUDIT_WRITER_NAME",
    }
    assert variables["FABRIC_ENV"] == name
    assert variables["AUDIT_WRITER_NAME"] == f"fabric-{name}-audit-writer"
    assert trail.render(variables["AUDIT_BUCKET"]) == BUCKET
    assert trail.render(variables["SIGNING_KEY_ARN"]) == trail.signing_key_arn
    table_id, attribute = trail.stateful_resource(variables["IDEMPOTENCY_TABLE"])
    table = trail.stateful["Resources"][table_id]
    assert (table["Type"], attribute) == ("AWS::DynamoDB::Table", "Ref")
    assert table["Properties"]["TableName"] == f"fabric-{name}-idempotency"


def test_the_writer_may_put_and_head_objects_only_under_audit_archive_and_checkpoints(
    trail: Trail,
) -> None:
    _, function = writer(trail.services)
    granted = statements(trail.services, function)
    s3 = [s for s in granted if any(a.startswith("s3:") for a in listed(s["Action"]))]
    # PutObject, and GetObject for HeadObject's checksum of a key a conditional write found
    # taken: nothing else of S3.
    assert sorted(a for s in s3 for a in listed(s["Action"])) == ["s3:GetObject", "s3:PutObject"]
    for statement in s3:
        assert "Condition" not in statement
        assert sorted(trail.render(r) for r in listed(statement["Resource"])) == [
            f"{BUCKET_ARN}/archive/*",
            f"{BUCKET_ARN}/audit/*",
            f"{BUCKET_ARN}/checkpoints/*",
        ]


def test_the_writer_uses_each_key_only_as_it_must(trail: Trail) -> None:
    _, function = writer(trail.services)
    granted = statements(trail.services, function)
    region = trail.region
    by_sid = {s.get("Sid"): s for s in granted}

    audit_key = by_sid["AuditKeyThroughS3"]
    assert sorted(listed(audit_key["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    key_id, _ = trail.stateful_resource(audit_key["Resource"])
    assert key_id.startswith("KeysAudit")
    condition = audit_key["Condition"]["StringEquals"]
    assert condition["kms:ViaService"] == f"s3.{region}.amazonaws.com"
    # For the audit bucket only (bucket keys: the bucket's ARN is the encryption context), not
    # the reports bucket under the same key.
    assert trail.render(condition["kms:EncryptionContext:aws:s3:arn"]) == BUCKET_ARN

    sign = by_sid["SignCheckpoints"]
    assert sorted(listed(sign["Action"])) == ["kms:Sign", "kms:Verify"]
    assert trail.render(sign["Resource"]) == trail.signing_key_arn
    assert sign["Condition"] == {"StringEquals": {"kms:SigningAlgorithm": "ECDSA_SHA_256"}}

    # Through DynamoDB, for the writer's table only (its name is DynamoDB's encryption context).
    table_key = by_sid["TableKeyThroughDynamoDb"]
    condition = table_key["Condition"]["StringEquals"]
    assert condition["kms:ViaService"] == f"dynamodb.{region}.amazonaws.com"
    _, function = writer(trail.services)
    table = function["Properties"]["Environment"]["Variables"]["IDEMPOTENCY_TABLE"]
    assert condition["kms:EncryptionContext:aws:dynamodb:tableName"] == table
    # Nothing else on the signing key, and no KMS action on every key.
    for statement in granted:
        actions = listed(statement["Action"])
        if statement is not sign:
            assert trail.signing_key_arn not in [
                trail.render(r) for r in listed(statement["Resource"])
            ]
        if any(a.startswith("kms:") for a in actions):
            assert statement["Resource"] != "*", statement


def test_the_writer_reads_and_writes_only_its_chain_and_the_batch_marks(trail: Trail) -> None:
    _, function = writer(trail.services)
    granted = statements(trail.services, function)
    name = trail.env.stage.stage_name
    (items,) = [s for s in granted if any(a.startswith("dynamodb:") for a in listed(s["Action"]))]
    # TransactWriteItems is authorised per action: its Puts as dynamodb:PutItem (the writer has
    # no ConditionCheck action, which would need dynamodb:ConditionCheckItem).
    assert sorted(listed(items["Action"])) == [
        "dynamodb:BatchGetItem",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
    ]
    table_id, _ = trail.stateful_resource(items["Resource"])
    assert table_id.startswith("IdempotencyTable")
    assert items["Condition"] == {
        "ForAllValues:StringLike": {
            "dynamodb:LeadingKeys": [f"audit-chain#fabric-{name}-audit-writer", "audit-batch#*"]
        }
    }


def test_the_writer_reads_fabric_audit_on_the_broker_as_the_audit_reader(trail: Trail) -> None:
    template = trail.services
    writer_id, function = writer(template)
    (mapping_id, mapping), *others = [
        (k, m)
        for k, m in of_type(template, "AWS::Lambda::EventSourceMapping").items()
        if m["Properties"]["FunctionName"] == {"Ref": writer_id} and "Queues" in m["Properties"]
    ]
    assert not others
    props = mapping["Properties"]
    assert props["Queues"] == [AUDIT_QUEUE] == ["fabric.audit"]
    broker_id, attribute = trail.stateful_resource(props["EventSourceArn"])
    assert trail.stateful["Resources"][broker_id]["Type"] == "AWS::AmazonMQ::Broker"
    assert attribute == "Arn"
    access = {c["Type"]: c["URI"] for c in props["SourceAccessConfigurations"]}
    assert set(access) == {"BASIC_AUTH", "VIRTUAL_HOST"}
    assert access["VIRTUAL_HOST"] == "/"
    secret_id, _ = trail.stateful_resource(access["BASIC_AUTH"])
    assert secret_id.startswith("BrokerUsersfabricauditreader")
    # The writer's one DynamoDB transaction holds its chain and a mark per batch: 100 actions.
    assert props["BatchSize"] == 99
    assert 1 <= props["MaximumBatchingWindowInSeconds"] <= 10

    granted = statements(template, function)
    # What Lambda's pollers do as the role: describe the broker, read the audit reader's
    # secret (and its key through Secrets Manager), and read the broker's network.
    (describe,) = [s for s in granted if "mq:DescribeBroker" in listed(s["Action"])]
    assert listed(describe["Action"]) == ["mq:DescribeBroker"]
    assert trail.stateful_resource(describe["Resource"]) == (broker_id, "Arn")
    assert not [
        a for s in granted for a in listed(s["Action"]) if a.startswith("mq:") and s is not describe
    ]
    (secret,) = [s for s in granted if "secretsmanager:GetSecretValue" in listed(s["Action"])]
    assert trail.stateful_resource(secret["Resource"])[0] == secret_id
    (secrets_key,) = [
        s
        for s in granted
        if "kms:ViaService" in json.dumps(s.get("Condition"))
        and "secretsmanager" in json.dumps(s["Condition"])
    ]
    assert listed(secrets_key["Action"]) == ["kms:Decrypt"]
    assert trail.stateful_resource(secrets_key["Resource"])[0].startswith("KeysSecrets")
    ec2 = {a for s in granted for a in listed(s["Action"]) if a.startswith("ec2:")}
    assert {
        "ec2:CreateNetworkInterface",
        "ec2:DeleteNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeSubnets",
        "ec2:DescribeVpcs",
    } <= ec2
    assert all(
        a.startswith(("ec2:Describe", "ec2:Create", "ec2:Delete", "ec2:Assign", "ec2:Unassign"))
        for a in ec2
    )
    for statement in granted:
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in listed(statement["Action"]))
    # Lambda checks those permissions when it creates the mapping.
    depends = mapping.get("DependsOn", [])
    policies = [
        k
        for k, p in of_type(template, "AWS::IAM::ManagedPolicy").items()
        if "mq:DescribeBroker" in json.dumps(p["Properties"]["PolicyDocument"])
    ]
    assert policies
    assert set(policies) <= set(depends), (mapping_id, depends)
    # And the topology (the queue and the user) is applied before the writer exists.
    topology = next(iter(of_type(template, "Custom::FabricTopology")))
    assert topology in function["DependsOn"]


def test_the_writer_consumes_the_sqs_audit_queue_with_partial_batch_failures(
    trail: Trail,
) -> None:
    template = trail.services
    writer_id, function = writer(template)
    name = audit_queue_name(trail.env.stage.stage_name)
    arn = f"arn:aws:sqs:{trail.region}:{trail.account}:{name}"
    (mapping,) = [
        m
        for m in of_type(template, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": writer_id} and "Queues" not in m["Properties"]
    ]
    props = mapping["Properties"]
    assert props["EventSourceArn"] == arn
    assert props["BatchSize"] == 10
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    # At most two batches in flight (the lowest Lambda accepts) for the one writer instance,
    # not the five or more its pollers would receive, all but one throttled.
    assert props["ScalingConfig"] == {"MaximumConcurrency": 2}
    assert function["Properties"]["ReservedConcurrentExecutions"] == 1
    on_queue = [s for s in statements(template, function) if arn in listed(s["Resource"])]
    assert {a for s in on_queue for a in listed(s["Action"])} == {
        "sqs:ReceiveMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueUrl",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
    }
    # Lambda refuses an SQS event source whose queue hides a message for less than the
    # function's timeout; AWS advises six times it.
    (queue,) = [
        q
        for q in of_type(trail.stateful, "AWS::SQS::Queue").values()
        if q["Properties"]["QueueName"] == name
    ]
    assert queue["Properties"]["VisibilityTimeout"] >= 6 * function["Properties"]["Timeout"]


def test_an_hourly_rule_asks_for_a_checkpoint(trail: Trail) -> None:
    template = trail.services
    writer_id, function = writer(template)
    name = trail.env.stage.stage_name
    (rule_id, rule), *others = [
        (k, r)
        for k, r in of_type(template, "AWS::Events::Rule").items()
        if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [writer_id, "Arn"]}
    ]
    assert not others
    props = rule["Properties"]
    assert props["Name"] == f"fabric-{name}-audit-checkpoint"
    assert props["ScheduleExpression"] == "rate(1 hour)"
    (target,) = props["Targets"]
    assert json.loads(target["Input"]) == {"checkpoint": True}
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2
    # Undeliverable events go to the writer's own async DLQ (alarmed by FunctionDlqDepth)...
    dlq = function["Properties"]["DeadLetterConfig"]["TargetArn"]
    assert target["DeadLetterConfig"]["Arn"] == dlq
    (permission,) = [
        p
        for p in of_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"].get("SourceArn") == {"Fn::GetAtt": [rule_id, "Arn"]}
    ]
    assert permission["Properties"]["Principal"] == "events.amazonaws.com"
    # ... which is SSE-KMS: the queues key lets EventBridge use it for this one rule.
    rule_arn = f"arn:aws:events:{trail.region}:{trail.account}:rule/{props['Name']}"
    (queues_key,) = [
        k
        for logical_id, k in of_type(trail.stateful, "AWS::KMS::Key").items()
        if logical_id.startswith("KeysQueues")
    ]
    (grant,) = [
        s
        for s in queues_key["Properties"]["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "events.amazonaws.com"}
    ]
    assert sorted(grant["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert trail.render(grant["Condition"]["ArnEquals"]["aws:SourceArn"], stateful=True) == rule_arn


def test_writer_errors_page_on_the_alarms_topic(trail: Trail) -> None:
    template = trail.services
    writer_id, _ = writer(template)
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{trail.env.stage.stage_name}-alarms"
    ]
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("AuditWriterErrors")
    ]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "Errors")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": writer_id}}]
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Sum", 300, 1)
    assert alarm["Threshold"] == 1
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic_id}]


def test_refused_audit_batches_page_on_the_alarms_topic(trail: Trail) -> None:
    # A refused batch was confirmed by the broker, so its consumer counted it stored: the
    # writer's metric and this alarm are the only ones to say its records are not in the trail.
    template = trail.services
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{trail.env.stage.stage_name}-alarms"
    ]
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("AuditWriterBatchesRefused")
    ]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("MessagingFabric", "AuditBatchesRefused")
    assert alarm["Dimensions"] == [{"Name": "Environment", "Value": trail.env.stage.stage_name}]
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Sum", 300, 1)
    assert alarm["Threshold"] == 1
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic_id}]


def test_the_writers_async_dlq_is_watched_by_function_dlq_depth(trail: Trail) -> None:
    template = trail.services
    _, function = writer(template)
    dlq_id = function["Properties"]["DeadLetterConfig"]["TargetArn"]["Fn::GetAtt"][0]
    watched = [
        query["MetricStat"]["Metric"]
        for logical_id, alarm in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("DeadLetterAlarmsFunctionDlqDepth")
        for query in alarm["Properties"]["Metrics"]
        if "MetricStat" in query
    ]
    queues = [d["Value"] for m in watched for d in m["Dimensions"] if d["Name"] == "QueueName"]
    assert {"Fn::GetAtt": [dlq_id, "QueueName"]} in queues
