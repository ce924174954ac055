"""The topology custom resource: applies the broker's exchanges, queues and users at deploy time."""

from __future__ import annotations

import json

from aws_cdk import CustomResource, Duration
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from fabric.naming import topology_function_name
from stacks.constructs.function import FabricFunction, FunctionPlatform


class BrokerTopology(Construct):
    """A Lambda-backed custom resource running ``lambdas/topology``.

    On create and update it applies the topology generated from the routing table, with the
    users' passwords from their secrets, through the RabbitMQ management API (the only way
    Amazon MQ offers); on delete it removes users and permissions and leaves queues that still
    hold messages. CloudFormation re-applies it when ``topology_digest`` changes (whenever the
    generated topology does), and when the broker's management URL or a secret's ARN does (a
    replaced broker or secret). A password generated again at the same ARN changes none of them:
    the broker's secrets never change how they generate one (stacks/constructs/broker.py). The
    function is named ``fabric-<env>-topology``: the runbook invokes it too (``topology diff``,
    ``topology apply``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        management_url: str,
        admin_secret: secretsmanager.ISecret,
        user_secrets: dict[str, secretsmanager.ISecret],
        secrets_key: kms.IKey,
        topology_digest: str,
    ) -> None:
        super().__init__(scope, construct_id)
        # Where the topology goes and which secrets hold its users' passwords: the function reads
        # them from its environment; the custom resource carries them too (below).
        broker_settings = {
            "MANAGEMENT_URL": management_url,
            "ADMIN_SECRET_ARN": admin_secret.secret_arn,
            "USER_SECRET_ARNS": json.dumps(
                {name: secret.secret_arn for name, secret in sorted(user_secrets.items())}
            ),
        }
        self.function = FabricFunction(
            self,
            "Apply",
            platform=platform,
            code_dir="lambdas/topology",
            description=f"Messaging Fabric {env_name}: applies the RabbitMQ topology",
            environment={"FABRIC_ENV": env_name, **broker_settings},
            reserved_concurrency=1,
            timeout=Duration.minutes(5),
            memory_size=256,
            # The runbook invokes it by this name (`topology diff` and `topology apply`).
            function_name=topology_function_name(env_name),
        )
        function = self.function.function
        # CloudFormation invokes it asynchronously: one retry (Lambda's default is two). The
        # function answers FAILED about 40 s before its 5-minute timeout on its own; the retry
        # is the backstop for a run killed anyway, within the ServiceTimeout below.
        function.configure_async_invoke(retry_attempts=1)
        for secret in (admin_secret, *user_secrets.values()):
            self.function.allow_secret_read(secret, secrets_key)
        self.resource = CustomResource(
            self,
            "Topology",
            service_token=function.function_arn,
            resource_type="Custom::FabricTopology",
            # CloudFormation applies the topology again when one of these changes: the topology,
            # or its broker (a replaced broker has a new id, in its management URL) or a user's
            # secret (a replaced secret has a new ARN), which the function's new environment
            # names: CloudFormation updates the function before it sends the resource an Update.
            # The function reads its environment and ignores these properties.
            properties={
                "TopologyDigest": topology_digest,
                "ManagementUrl": broker_settings["MANAGEMENT_URL"],
                "AdminSecretArn": broker_settings["ADMIN_SECRET_ARN"],
                "UserSecretArns": broker_settings["USER_SECRET_ARNS"],
            },
            # A function that never answers all the same (killed at its 5-minute timeout, then its
            # one retry after about a minute) fails the deploy within 15 minutes, not
            # CloudFormation's default hour.
            service_timeout=Duration.minutes(15),
        )
