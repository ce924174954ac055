"""Private subnets only, the endpoints the fallback path needs, and flow logs."""

from __future__ import annotations

from tests.infra.conftest import Synthesized

# Lambda: the Amazon MQ event source's pollers invoke the audit writer through it.
INTERFACE_SERVICES = {"sqs", "sns", "kms", "secretsmanager", "logs", "sts", "lambda"}
GATEWAY_SERVICES = {"s3", "dynamodb"}


def _service_of(endpoint: dict) -> str:
    name = endpoint["Properties"]["ServiceName"]
    if isinstance(name, str):
        return name.rsplit(".", 1)[-1]
    parts = name["Fn::Join"][1]
    return str(parts[-1]).rsplit(".", 1)[-1]


def test_vpc_has_no_route_to_the_internet(env: Synthesized) -> None:
    assert env.resources("AWS::EC2::InternetGateway") == {}
    assert env.resources("AWS::EC2::NatGateway") == {}
    for subnet in env.resources("AWS::EC2::Subnet").values():
        assert subnet["Properties"]["MapPublicIpOnLaunch"] is False


def test_fallback_path_reaches_aws_through_vpc_endpoints(env: Synthesized) -> None:
    endpoints = env.resources("AWS::EC2::VPCEndpoint").values()
    interface = {
        _service_of(e) for e in endpoints if e["Properties"].get("VpcEndpointType") == "Interface"
    }
    gateway = {
        _service_of(e) for e in endpoints if e["Properties"].get("VpcEndpointType") != "Interface"
    }
    assert interface == INTERFACE_SERVICES
    assert gateway == GATEWAY_SERVICES
    for endpoint in endpoints:
        if endpoint["Properties"].get("VpcEndpointType") == "Interface":
            assert endpoint["Properties"]["PrivateDnsEnabled"] is True


def test_all_traffic_is_flow_logged_to_an_encrypted_log_group(env: Synthesized) -> None:
    (flow_log,) = env.resources("AWS::EC2::FlowLog").values()
    assert flow_log["Properties"]["TrafficType"] == "ALL"
    group_id = flow_log["Properties"]["LogGroupName"]["Ref"]
    group = env.resources("AWS::Logs::LogGroup")[group_id]["Properties"]
    assert "KmsKeyId" in group
    assert (
        group["RetentionInDays"] == {"dev": 30, "staging": 90, "prod": 2557}[env.stage.stage_name]
    )


def test_interface_endpoints_admit_only_the_fabric_functions_and_the_brokers_pollers(
    env: Synthesized,
) -> None:
    groups = {
        sg_id
        for e in env.resources("AWS::EC2::VPCEndpoint").values()
        for sg in e["Properties"].get("SecurityGroupIds", [])
        for sg_id in [sg["Fn::GetAtt"][0]]
    }
    (endpoint_sg,) = groups
    ingress = [
        r["Properties"]
        for r in env.resources("AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [endpoint_sg, "GroupId"]}
    ]
    groups_by_description = {
        sg["Properties"]["GroupDescription"].split(":")[0]: logical_id
        for logical_id, sg in env.resources("AWS::EC2::SecurityGroup").items()
    }
    # The three groups fabric functions carry (AMQPS, management API, no broker), and the
    # broker's: Lambda's Amazon MQ event source places its pollers' ENIs in it.
    sources = [
        groups_by_description[description]
        for description in (
            "Messaging Fabric functions",
            "Messaging Fabric broker administration",
            "Messaging Fabric functions that never connect to the broker",
            "Amazon MQ broker",
        )
    ]
    assert sorted(
        (r["FromPort"], r["ToPort"], r["SourceSecurityGroupId"]["Fn::GetAtt"][0]) for r in ingress
    ) == sorted((443, 443, source) for source in sources)
