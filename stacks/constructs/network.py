"""Private network for the broker and functions: isolated subnets, VPC endpoints, flow logs."""

from __future__ import annotations

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from stacks.nag import acknowledge, ignore_cfn_lint

AMQPS_PORT = 5671
HTTPS_PORT = 443

# Interface endpoints the fabric's functions need with no route to the internet: the fallback
# path (SNS, SQS), message encryption (KMS), credentials (Secrets Manager, STS) and logs; and
# Lambda, which the Amazon MQ event source's pollers invoke the audit writer through from the
# broker's subnets (they also use the STS and Secrets Manager endpoints).
_INTERFACE_ENDPOINTS = {
    "Sqs": ec2.InterfaceVpcEndpointAwsService.SQS,
    "Sns": ec2.InterfaceVpcEndpointAwsService.SNS,
    "Kms": ec2.InterfaceVpcEndpointAwsService.KMS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "Lambda": ec2.InterfaceVpcEndpointAwsService.LAMBDA_,
}


class FabricNetwork(Construct):
    """VPC with isolated private subnets only (no internet gateway, no NAT).

    Functions reach AWS through the endpoints, and the broker only on the port they use, by the
    one security group each carries: ``functions_security_group`` for AMQPS (the router, the
    drain, the redrive, the replay, and consumers in other stacks), ``broker_admin_security_group``
    for the management API (the topology and the rotation), ``no_broker_security_group`` for
    none (the audit writer, the compliance report). The broker accepts AMQPS from the first, the
    management API from the second, and AMQPS from its own group, which Lambda's Amazon MQ
    event source pollers use in the broker's subnets (they also reach the Lambda, STS and
    Secrets Manager endpoints).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        max_azs: int,
        logs_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)

        flow_log_group = logs.LogGroup(
            self,
            "FlowLogs",
            encryption_key=logs_key,
            retention=log_retention,
            removal_policy=removal_policy,
        )
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.40.0.0/16"),
            max_azs=max_azs,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=20
                )
            ],
            flow_logs={
                "all": ec2.FlowLogOptions(
                    destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_log_group),
                    traffic_type=ec2.FlowLogTrafficType.ALL,
                )
            },
            restrict_default_security_group=True,
        )
        flow_log_role = self.vpc.node.find_child("all").node.find_child("IAMRole")
        for rule in ("HIPAA.Security-IAMNoInlinePolicy", "NIST.800.53.R5-IAMNoInlinePolicy"):
            acknowledge(
                flow_log_role,
                rule,
                "CDK's flow log role is assumed only by the VPC Flow Logs service; its one inline "
                "policy allows writing to this VPC's flow log group and nothing else.",
            )
        # restrict_default_security_group uses a CDK custom-resource provider whose handler has a
        # DependsOn on its role next to a GetAtt of it; cfn-lint calls that redundant.
        provider = Stack.of(self).node.find_child(
            "Custom::VpcRestrictDefaultSGCustomResourceProvider"
        )
        ignore_cfn_lint(provider.node.find_child("Handler"), "W3005")
        self.subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)

        # The description of a security group cannot change without replacing it, and a group
        # that Lambda's ENIs hold is slow to replace: "Functions" keeps its first one.
        self.functions_security_group = ec2.SecurityGroup(
            self,
            "Functions",
            vpc=self.vpc,
            description="Messaging Fabric functions",
            allow_all_outbound=False,
        )
        self.broker_admin_security_group = ec2.SecurityGroup(
            self,
            "BrokerAdmin",
            vpc=self.vpc,
            description="Messaging Fabric broker administration: the RabbitMQ management API",
            allow_all_outbound=False,
        )
        self.no_broker_security_group = ec2.SecurityGroup(
            self,
            "NoBroker",
            vpc=self.vpc,
            description="Messaging Fabric functions that never connect to the broker",
            allow_all_outbound=False,
        )
        self.broker_security_group = ec2.SecurityGroup(
            self,
            "Broker",
            vpc=self.vpc,
            description="Amazon MQ broker: AMQPS and management API from fabric functions only",
            allow_all_outbound=False,
        )
        endpoint_security_group = ec2.SecurityGroup(
            self,
            "Endpoints",
            vpc=self.vpc,
            description="Interface VPC endpoints: HTTPS from fabric functions only",
            allow_all_outbound=False,
        )

        # Each client group reaches the broker on its one port only: a function that handles
        # producers' messages or dead letters never reaches the management API, and one that
        # writes or reports the audit trail reaches neither.
        for clients, port, what in (
            (self.functions_security_group, AMQPS_PORT, "AMQP over TLS"),
            (self.broker_admin_security_group, HTTPS_PORT, "RabbitMQ management API"),
        ):
            self.broker_security_group.add_ingress_rule(
                clients, ec2.Port.tcp(port), f"{what} from fabric functions"
            )
            clients.add_egress_rule(
                self.broker_security_group, ec2.Port.tcp(port), f"{what} to the broker"
            )
        # Lambda's Amazon MQ event source (the audit writer's) places its pollers' ENIs in the
        # broker's subnets with the broker's security group: they reach the broker over AMQPS
        # from that group itself, and Lambda, STS and Secrets Manager through the endpoints.
        self.broker_security_group.add_ingress_rule(
            self.broker_security_group,
            ec2.Port.tcp(AMQPS_PORT),
            "AMQP over TLS from Lambda's event source pollers",
        )
        self.broker_security_group.add_egress_rule(
            self.broker_security_group,
            ec2.Port.tcp(AMQPS_PORT),
            "AMQP over TLS from Lambda's event source pollers to the broker",
        )
        self.broker_security_group.add_egress_rule(
            endpoint_security_group,
            ec2.Port.tcp(HTTPS_PORT),
            "Lambda, STS and Secrets Manager endpoints for the event source pollers",
        )
        endpoint_security_group.add_ingress_rule(
            self.broker_security_group,
            ec2.Port.tcp(HTTPS_PORT),
            "AWS APIs from Lambda's event source pollers in the broker's subnets",
        )
        # The S3 and DynamoDB gateway endpoints are reached through AWS-managed prefix lists whose
        # ids differ per region and cannot be read in a template; the VPC has no internet route, so
        # HTTPS egress to any address reaches only the endpoints and nothing outside AWS.
        for clients in (
            self.functions_security_group,
            self.broker_admin_security_group,
            self.no_broker_security_group,
        ):
            endpoint_security_group.add_ingress_rule(
                clients, ec2.Port.tcp(HTTPS_PORT), "AWS APIs from fabric functions"
            )
            clients.add_egress_rule(
                ec2.Peer.any_ipv4(),
                ec2.Port.tcp(HTTPS_PORT),
                "HTTPS to VPC endpoints (the VPC has no route to the internet)",
            )

        for name, service in _INTERFACE_ENDPOINTS.items():
            self.vpc.add_interface_endpoint(
                name,
                service=service,
                subnets=self.subnets,
                security_groups=[endpoint_security_group],
                private_dns_enabled=True,
                open=False,
            )
        self.vpc.add_gateway_endpoint(
            "S3", service=ec2.GatewayVpcEndpointAwsService.S3, subnets=[self.subnets]
        )
        self.vpc.add_gateway_endpoint(
            "DynamoDb", service=ec2.GatewayVpcEndpointAwsService.DYNAMODB, subnets=[self.subnets]
        )
