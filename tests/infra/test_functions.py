"""The functions' stack: Lambda defaults, the router's entry points, least privilege, topology."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.naming import fallback_queue_names, topology_function_name
from fabric.settings import DrainSettings
from tests.conftest import ROOT
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import render

CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]["environments"]
GROUPS = ("government", "business", "academic", "community", "media")


def services(env: Synthesized, assembly: Assembly) -> dict[str, Any]:
    stack = env.stage.services
    path = assembly.outdir / env.stage.artifact_id / stack.template_file
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == resource_type}


def router(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (item,) = (
        (k, v)
        for k, v in of_type(template, "AWS::Lambda::Function").items()
        if "routes messages" in v["Properties"].get("Description", "")
    )
    return item


def fabric_functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v
        for k, v in of_type(template, "AWS::Lambda::Function").items()
        if "Messaging Fabric" in v["Properties"].get("Description", "")
    }


def test_every_fabric_function_gets_the_platform_defaults(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    functions = fabric_functions(template)
    # router, topology, drain, redrive, audit writer, replay, compliance report, rotation,
    # broker metrics
    assert len(functions) == 9
    for logical_id, function in functions.items():
        props = function["Properties"]
        assert props["Runtime"] == "python3.14", logical_id
        assert props["Architectures"] == ["arm64"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert props["LoggingConfig"]["LogFormat"] == "JSON"
        assert len(props["Layers"]) == 2
        assert props["ReservedConcurrentExecutions"] >= 1
        assert "TargetArn" in props["DeadLetterConfig"]
        vpc = props["VpcConfig"]
        assert len(vpc["SecurityGroupIds"]) == 1
        assert len(vpc["SubnetIds"]) == CONTEXT[env.stage.stage_name]["max_azs"]
        group = template["Resources"][props["LoggingConfig"]["LogGroup"]["Ref"]]["Properties"]
        assert "KmsKeyId" in group
        assert group["RetentionInDays"] == CONTEXT[env.stage.stage_name]["log_retention_days"]
        # Created only once its role may manage network interfaces (Lambda checks, in a VPC).
        role = props["Role"]["Fn::GetAtt"][0]
        (basics,) = [
            k
            for k, p in of_type(template, "AWS::IAM::ManagedPolicy").items()
            if {"Ref": role} in p["Properties"]["Roles"]
            and "ec2:CreateNetworkInterface" in json.dumps(p["Properties"]["PolicyDocument"])
        ]
        assert basics in function["DependsOn"], logical_id


def test_the_router_is_configured_from_cdk_json_and_holds_no_secret(
    env: Synthesized, assembly: Assembly
) -> None:
    name = env.stage.stage_name
    _, function = router(services(env, assembly))
    props = function["Properties"]
    variables = props["Environment"]["Variables"]
    assert props["ReservedConcurrentExecutions"] == CONTEXT[name]["router"]["reserved_concurrency"]
    assert variables["FABRIC_ENV"] == name
    assert variables["RABBITMQ_PORT"] == "5671"
    assert variables["RABBITMQ_TLS"] == "true"
    assert variables["FABRIC_IDENTITY_CLAIM"] == CONTEXT[name]["api"]["identity_claim"]
    assert variables["FABRIC_INGEST_QUEUE_PREFIX"] == f"fabric-{name}-ingest-"
    assert "FallbackTopic" in json.dumps(variables["FALLBACK_TOPIC_ARN"])
    assert "EmergencyTopic" in json.dumps(variables["EMERGENCY_TOPIC_ARN"])
    assert ".mq." in json.dumps(variables["RABBITMQ_HOST"])
    assert "password" not in json.dumps(variables).lower()


def test_the_router_may_read_only_the_platform_users_secret(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    logical_id, function = router(template)
    role = function["Properties"]["Role"]["Fn::GetAtt"][0]
    statements = [
        statement
        for policy in of_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    secret_reads = [s for s in statements if "secretsmanager:GetSecretValue" in s["Action"]]
    assert len(secret_reads) == 1
    secret = json.dumps(secret_reads[0]["Resource"])
    assert "BrokerUsersfabricplatform" in secret
    # The secrets key only through Secrets Manager (the queues and topics keys through SQS and
    # SNS: tests/infra/test_queue_policies.py).
    secrets_key = [s for s in statements if "KeysSecrets" in json.dumps(s["Resource"])]
    assert secrets_key
    assert all("kms:ViaService" in json.dumps(s.get("Condition")) for s in secrets_key)
    generate = [s for s in statements if "KeysMessages" in json.dumps(s["Resource"])]
    assert [s["Action"] for s in generate] == ["kms:GenerateDataKey"]
    (publish,) = [s for s in statements if "sns:Publish" in json.dumps(s["Action"])]
    assert publish["Action"] == "sns:Publish"
    assert len(publish["Resource"]) == 2
    for statement in statements:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        assert "*" not in actions, (logical_id, statement)
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in actions), statement


def test_each_stakeholder_group_has_its_own_router_alias(
    env: Synthesized, assembly: Assembly
) -> None:
    aliases = of_type(services(env, assembly), "AWS::Lambda::Alias")
    assert sorted(a["Properties"]["Name"] for a in aliases.values()) == sorted(GROUPS)


def test_producers_find_the_https_url_and_their_groups_alias_in_the_outputs(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    outputs = {name: o["Value"] for name, o in template["Outputs"].items()}
    (api_id,) = of_type(template, "AWS::ApiGatewayV2::Api")
    assert outputs["MessagesApiUrl"] == {
        "Fn::Join": ["", [{"Fn::GetAtt": [api_id, "ApiEndpoint"]}, "/v1/messages"]]
    }
    alias_names = {
        logical_id: a["Properties"]["Name"]
        for logical_id, a in of_type(template, "AWS::Lambda::Alias").items()
    }
    for group in GROUPS:
        (ref,) = outputs[f"{group.capitalize()}RouterAliasArn"].values()
        assert alias_names[ref] == group


def test_sqs_ingest_reports_partial_batch_failures(env: Synthesized, assembly: Assembly) -> None:
    template = services(env, assembly)
    router_id, _ = router(template)
    mappings = [
        m
        for m in of_type(template, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": router_id}
    ]
    assert len(mappings) == len(GROUPS)
    for mapping in mappings:
        assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_https_needs_a_jwt_from_the_configured_issuer(env: Synthesized, assembly: Assembly) -> None:
    template = services(env, assembly)
    api = CONTEXT[env.stage.stage_name]["api"]
    (authorizer,) = of_type(template, "AWS::ApiGatewayV2::Authorizer").values()
    props = authorizer["Properties"]
    assert props["AuthorizerType"] == "JWT"
    assert props["JwtConfiguration"] == {
        "Issuer": api["jwt_issuer"],
        "Audience": api["jwt_audience"],
    }
    assert props["IdentitySource"] == ["$request.header.Authorization"]
    (route,) = of_type(template, "AWS::ApiGatewayV2::Route").values()
    assert route["Properties"]["RouteKey"] == "POST /v1/messages"
    assert route["Properties"]["AuthorizationType"] == "JWT"
    (stage,) = of_type(template, "AWS::ApiGatewayV2::Stage").values()
    settings = stage["Properties"]["DefaultRouteSettings"]
    assert settings["ThrottlingRateLimit"] == api["throttle_rate"]
    assert settings["ThrottlingBurstLimit"] == api["throttle_burst"]
    assert "DestinationArn" in stage["Properties"]["AccessLogSettings"]


def test_no_message_reaches_a_broker_before_its_topology_is_applied(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (resource_id, resource) = next(iter(of_type(template, "Custom::FabricTopology").items()))
    assert len(resource["Properties"]["TopologyDigest"]) == 64
    _, function = router(template)
    assert resource_id in function["DependsOn"]


def test_a_topology_apply_that_never_answers_fails_the_deploy_within_15_minutes(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (resource,) = of_type(template, "Custom::FabricTopology").values()
    # Not CloudFormation's default hour: the function's 5-minute timeout and one retry fit.
    assert int(resource["Properties"]["ServiceTimeout"]) == 900
    function_id = resource["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    assert template["Resources"][function_id]["Properties"]["Timeout"] == 300
    (config,) = [
        c
        for c in of_type(template, "AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    assert config["Properties"]["MaximumRetryAttempts"] == 1


def test_the_runbook_finds_the_topology_function_by_its_name(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (resource,) = of_type(template, "Custom::FabricTopology").values()
    function_id = resource["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    # scripts/runbook.py topology diff|apply --env <env> invokes it by this name.
    name = template["Resources"][function_id]["Properties"]["FunctionName"]
    assert name == topology_function_name(env.stage.stage_name)
    assert name == f"fabric-{env.stage.stage_name}-topology"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_the_functions_template_is_cfn_lint_clean(
    assembly_lint: dict[tuple[str, str], list[str]], name: str
) -> None:
    # The services template, linted for the environment's region once a session (conftest).
    assert assembly_lint[(name, "services")] == []


def test_the_drain_runs_every_minute_two_at_most_on_the_fallback_queues_only(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    ((drain_id, drain),) = [
        (k, v)
        for k, v in fabric_functions(template).items()
        if "drains the fallback" in v["Properties"]["Description"]
    ]
    assert drain["Properties"]["ReservedConcurrentExecutions"] == 2
    # The runbook invokes it by this name (scripts/runbook.py drain --env <env>).
    assert drain["Properties"]["FunctionName"] == f"fabric-{env.stage.stage_name}-drain"
    variables = drain["Properties"]["Environment"]["Variables"]
    (rule,) = [
        r
        for r in of_type(template, "AWS::Events::Rule").values()
        if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [drain_id, "Arn"]}
    ]
    assert rule["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    role = drain["Properties"]["Role"]["Fn::GetAtt"][0]
    consumed = [
        statement
        for policy in of_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if "sqs:DeleteMessage" in statement["Action"]
    ]
    (drained,) = consumed
    assert drained["Sid"] == "DrainFallbackQueues"
    assert sorted(drained["Action"]) == ["sqs:DeleteMessage", "sqs:ReceiveMessage"]
    account, stage = env.stage.services.account, env.stage.stage_name
    # The fallback queues and their subscriptions' DLQs (what SNS could not deliver there).
    assert {render(r) for r in drained["Resource"]} == {
        f"arn:aws:sqs:{env.region}:{account}:{name}{suffix}"
        for _, _, name in fallback_queue_names(stage)
        for suffix in ("", "-sub-dlq")
    }
    # It derives the same queues from its environment: names at the URL prefix.
    prefix = render(variables["SQS_URL_PREFIX"])
    assert prefix == f"https://sqs.{env.region}.amazonaws.com/{account}/"
    deployed = {k: v if isinstance(v, str) else "<deploy-time>" for k, v in variables.items()}
    drained = DrainSettings.from_env({**deployed, "SQS_URL_PREFIX": prefix}).queues
    assert {url for url, _, _ in drained} == {
        f"{prefix}{name}{suffix}"
        for _, _, name in fallback_queue_names(stage)
        for suffix in ("", "-sub-dlq")
    }


def test_every_function_may_write_its_failed_events_to_its_encrypted_dlq(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    for logical_id, function in fabric_functions(template).items():
        role = function["Properties"]["Role"]["Fn::GetAtt"][0]
        statements = [
            statement
            for policy in of_type(template, "AWS::IAM::ManagedPolicy").values()
            if {"Ref": role} in policy["Properties"]["Roles"]
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        ]
        (key,) = [s for s in statements if s.get("Sid") == "OwnDeadLetterQueueKey"]
        assert sorted(key["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"], logical_id
        assert "KeysQueues" in json.dumps(key["Resource"])
        assert key["Condition"] == {
            "StringEquals": {"kms:ViaService": f"sqs.{env.region}.amazonaws.com"}
        }
