"""The broker is private, logged, upgraded in a window, clustered in prod, and keyless in text."""

from __future__ import annotations

import json

from tests.infra.conftest import Assembly, Synthesized

EXPECTED_MODE = {"dev": "SINGLE_INSTANCE", "staging": "SINGLE_INSTANCE", "prod": "CLUSTER_MULTI_AZ"}


def _broker(env: Synthesized) -> dict:
    (broker,) = env.resources("AWS::AmazonMQ::Broker").values()
    return broker["Properties"]


def test_broker_is_never_publicly_accessible(env: Synthesized) -> None:
    assert _broker(env)["PubliclyAccessible"] is False


def test_prod_runs_a_multi_az_cluster_across_three_subnets(assembly: Assembly) -> None:
    for name, env in assembly.envs.items():
        broker = _broker(env)
        assert broker["DeploymentMode"] == EXPECTED_MODE[name]
        expected_subnets = 3 if name == "prod" else 1
        assert len(broker["SubnetIds"]) == expected_subnets, name


def test_broker_engine_is_rabbitmq_313_or_newer(env: Synthesized) -> None:
    broker = _broker(env)
    assert broker["EngineType"] == "RABBITMQ"
    major, minor = (int(part) for part in broker["EngineVersion"].split(".")[:2])
    assert (major, minor) >= (3, 13)


def test_general_logs_on_and_retention_set_on_their_log_group(env: Synthesized) -> None:
    assert _broker(env)["Logs"] == {"General": True}
    (retention,) = env.resources("Custom::LogRetention").values()
    log_group_name = json.dumps(retention["Properties"]["LogGroupName"])
    assert "/aws/amazonmq/broker/" in log_group_name
    assert "/general" in log_group_name
    expected_days = {"dev": 30, "staging": 90, "prod": 2557}[env.stage.stage_name]
    assert retention["Properties"]["RetentionInDays"] == expected_days


def test_minor_versions_upgrade_automatically_in_the_maintenance_window(env: Synthesized) -> None:
    broker = _broker(env)
    assert broker["AutoMinorVersionUpgrade"] is True
    window = broker["MaintenanceWindowStartTime"]
    assert set(window) == {"DayOfWeek", "TimeOfDay", "TimeZone"}


def test_admin_password_reaches_cloudformation_only_as_a_dynamic_reference(
    env: Synthesized,
) -> None:
    (user,) = _broker(env)["Users"]
    rendered = json.dumps(user["Password"])
    assert "{{resolve:secretsmanager:" in rendered
    assert ":SecretString:password" in rendered
    secret_id = user["Password"]["Fn::Join"][1][1]["Ref"]
    secret = env.resources("AWS::SecretsManager::Secret")[secret_id]
    assert "GenerateSecretString" in secret["Properties"]
    assert "SecretString" not in secret["Properties"]
    assert "KmsKeyId" in secret["Properties"]


def test_broker_accepts_traffic_only_from_the_fabric_functions_and_its_pollers(
    env: Synthesized,
) -> None:
    """The functions' group: AMQPS and the management API. The broker's own group: AMQPS only,
    for Lambda's Amazon MQ event source, whose pollers' ENIs use the broker's security group."""
    broker_sg = _broker(env)["SecurityGroups"][0]["Fn::GetAtt"][0]
    groups = env.resources("AWS::EC2::SecurityGroup")
    assert "SecurityGroupIngress" not in groups[broker_sg]["Properties"]
    ingress = [
        rule["Properties"]
        for rule in env.resources("AWS::EC2::SecurityGroupIngress").values()
        if rule["Properties"]["GroupId"] == {"Fn::GetAtt": [broker_sg, "GroupId"]}
    ]
    for rule in ingress:
        assert "CidrIp" not in rule
        assert "SourceSecurityGroupId" in rule
    sources = sorted(
        (rule["FromPort"], rule["SourceSecurityGroupId"]["Fn::GetAtt"][0] == broker_sg)
        for rule in ingress
    )
    assert sources == [(443, False), (5671, False), (5671, True)]
    # Out: AMQPS to itself and HTTPS to the interface endpoints (Lambda, STS, Secrets Manager),
    # nothing else: no inline rule (CDK drops its "disallow all" placeholder once a rule exists,
    # and CloudFormation strips the default allow-all rule when a group gets its first one).
    assert groups[broker_sg]["Properties"].get("SecurityGroupEgress", []) == []
    egress = [
        rule["Properties"]
        for rule in env.resources("AWS::EC2::SecurityGroupEgress").values()
        if rule["Properties"]["GroupId"] == {"Fn::GetAtt": [broker_sg, "GroupId"]}
    ]
    endpoint_groups = {
        sg["Fn::GetAtt"][0]
        for endpoint in env.resources("AWS::EC2::VPCEndpoint").values()
        for sg in endpoint["Properties"].get("SecurityGroupIds", [])
    }
    assert sorted(
        (
            rule["FromPort"],
            rule["ToPort"],
            rule["DestinationSecurityGroupId"]["Fn::GetAtt"][0] in {broker_sg, *endpoint_groups},
        )
        for rule in egress
    ) == [(443, 443, True), (5671, 5671, True)]
