"""The broker is private, logged, upgraded in a window, clustered in prod, and keyless in text."""

from __future__ import annotations

import copy
import json

import pytest
from aws_cdk import App
from aws_cdk.assertions import Template

from app import build_app
from stacks.config import ConfigError, load_app_config, read_cdk_context
from tests.conftest import ROOT
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
    """The functions' group: AMQPS; the broker administration's group: the management API. The
    broker's own group: AMQPS only, for Lambda's Amazon MQ event source, whose pollers' ENIs use
    the broker's security group."""
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
    described = {
        logical_id: sg["Properties"]["GroupDescription"] for logical_id, sg in groups.items()
    }
    sources = sorted(
        (rule["FromPort"], described[rule["SourceSecurityGroupId"]["Fn::GetAtt"][0]])
        for rule in ingress
    )
    assert sources == [
        (443, "Messaging Fabric broker administration: the RabbitMQ management API"),
        (5671, described[broker_sg]),
        (5671, "Messaging Fabric functions"),
    ]
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


# What each fabric function (by its description) does on the broker: AMQPS to publish and read
# queues, the management API to apply the topology and rotate passwords, or nothing.
BROKER_PORTS_BY_FUNCTION = {
    "validates, protects and routes messages": {5671},
    "drains the fallback queues into RabbitMQ": {5671},
    "redrives dead letters to where they came from": {5671},
    "replays archived messages of a period": {5671},
    "applies the RabbitMQ topology": {443},
    "rotates the RabbitMQ users' passwords": {443},
    "publishes the depth of the broker's dead-letter queues": {443},
    "writes audit batches to the Object Lock bucket": set(),
    "reports a period of the audit trail for compliance": set(),
}


def test_each_function_reaches_only_the_broker_port_it_uses(
    env: Synthesized, assembly: Assembly
) -> None:
    """A function that routes producers' messages or handles dead letters cannot reach the
    management API, and the audit writer and the compliance report cannot reach the broker at
    all: the broker's ingress admits each security group on one port only."""
    stateful = env.json
    services_path = assembly.outdir / env.stage.artifact_id / env.stage.services.template_file
    services = json.loads(services_path.read_text())
    broker_sg = _broker(env)["SecurityGroups"][0]["Fn::GetAtt"][0]
    admitted: dict[str, set[int]] = {}
    for rule in env.resources("AWS::EC2::SecurityGroupIngress").values():
        props = rule["Properties"]
        if props["GroupId"] == {"Fn::GetAtt": [broker_sg, "GroupId"]}:
            source = props["SourceSecurityGroupId"]["Fn::GetAtt"][0]
            admitted.setdefault(source, set()).update(range(props["FromPort"], props["ToPort"] + 1))
    reached = {}
    for function in services["Resources"].values():
        props = function["Properties"]
        if function["Type"] != "AWS::Lambda::Function" or "Messaging Fabric" not in props.get(
            "Description", ""
        ):
            continue
        (what,) = [d for d in BROKER_PORTS_BY_FUNCTION if d in props["Description"]]
        ports: set[int] = set()
        for group in props["VpcConfig"]["SecurityGroupIds"]:
            output = group["Fn::GetStackOutput"]["OutputName"]
            source = stateful["Outputs"][output]["Value"]["Fn::GetAtt"][0]
            ports |= admitted.get(source, set())
        reached[what] = ports
    assert reached == BROKER_PORTS_BY_FUNCTION


def _prod_broker(**broker: str) -> None:
    """Load the repository's cdk.json with prod's broker settings changed to ``broker``."""
    context = copy.deepcopy(read_cdk_context(ROOT))
    context["environments"]["prod"]["broker"].update(broker)
    load_app_config(context)


@pytest.mark.parametrize("engine_version", ["3.13", "4.2"])
def test_both_rabbitmq_versions_amazon_mq_offers_synthesize_with_the_same_alarms(
    engine_version: str,
) -> None:
    """The broker dead-letter alarms read the fabric's own depth metrics on every version, so a
    4.2 broker (no per-queue metrics from Amazon MQ) is watched exactly as a 3.13 one."""
    context = copy.deepcopy(read_cdk_context(ROOT))
    context["env"] = "prod"
    context["environments"]["prod"]["broker"].update(
        engine_version=engine_version, instance_type="mq.m7g.large"
    )
    app = App(context=context)
    (stage,) = build_app(app)
    broker = Template.from_stack(stage.stateful).find_resources("AWS::AmazonMQ::Broker")
    ((_, resource),) = broker.items()
    assert resource["Properties"]["EngineVersion"] == engine_version
    assert resource["Properties"]["HostInstanceType"] == "mq.m7g.large"
    alarms = Template.from_stack(stage.services).find_resources("AWS::CloudWatch::Alarm")
    watched = json.dumps([a for k, a in alarms.items() if k.startswith("DeadLetterAlarmsBroker")])
    # The ten DLQs, fabric.overflow and fabric.unrouted, on either engine version.
    assert watched.count('"MetricName": "QueueDepth"') == 12
    assert "AWS/AmazonMQ" not in watched


@pytest.mark.parametrize("instance_type", ["mq.m5.large", "mq.m5.4xlarge", "mq.t3.micro"])
def test_rabbitmq_4_is_refused_on_anything_but_m7g(instance_type: str) -> None:
    deployment = "SINGLE_INSTANCE" if "t3" in instance_type else "CLUSTER_MULTI_AZ"
    with pytest.raises(
        ConfigError, match=rf"prod\.broker: .*mq\.m7g\.\* only, not on {instance_type}"
    ):
        _prod_broker(engine_version="4.2", instance_type=instance_type, deployment_mode=deployment)


@pytest.mark.parametrize("engine_version", ["4.0", "4.1", "4.3", "3.14", "5.0"])
def test_a_rabbitmq_version_amazon_mq_does_not_offer_is_refused(engine_version: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"engine_version: .*on RabbitMQ 3\.13 or 4\.2, not {engine_version}"
    ):
        _prod_broker(engine_version=engine_version, instance_type="mq.m7g.large")


def test_a_patch_of_rabbitmq_4_is_refused_with_the_version_to_use() -> None:
    with pytest.raises(ConfigError, match=r"engine_version: .*use 4\.2, not 4\.2\.1"):
        _prod_broker(engine_version="4.2.1", instance_type="mq.m7g.large")


def test_a_patch_engine_version_is_refused_with_the_version_to_use() -> None:
    with pytest.raises(ConfigError, match=r"engine_version: .*use 3\.13, not 3\.13\.7"):
        _prod_broker(engine_version="3.13.7")


@pytest.mark.parametrize("instance_type", ["mq.m4.large", "mq.r5.large", "mq.t3.small"])
def test_an_instance_type_amazon_mq_does_not_offer_for_rabbitmq_is_refused(
    instance_type: str,
) -> None:
    with pytest.raises(ConfigError, match=rf"instance_type: .*not run RabbitMQ on {instance_type}"):
        _prod_broker(instance_type=instance_type)


@pytest.mark.parametrize("instance_type", ["mq.m5.large", "mq.m7g.large", "mq.m7g.4xlarge"])
def test_the_instance_types_amazon_mq_offers_for_rabbitmq_313_are_accepted(
    instance_type: str,
) -> None:
    _prod_broker(engine_version="3.13", instance_type=instance_type)
