"""The stateful stack: network, keys, audit storage and queue, broker, queues, idempotency table."""

from __future__ import annotations

from aws_cdk import CfnOutput, Environment, Fn, RemovalPolicy, Stack
from aws_cdk import aws_logs as logs
from constructs import Construct

from stacks.config import LOG_RETENTION_DAYS, EnvironmentConfig
from stacks.constructs.audit_queue import AuditQueue
from stacks.constructs.audit_storage import AuditStorage
from stacks.constructs.broker import Broker, BrokerUsers
from stacks.constructs.fallback import FallbackPath
from stacks.constructs.idempotency import IdempotencyTable
from stacks.constructs.ingest import IngestQueues
from stacks.constructs.keys import FabricKeys
from stacks.constructs.network import FabricNetwork


class StatefulStack(Stack):
    """Everything that holds data or identity and must outlive a redeploy of the functions.

    Stateless resources (functions, APIs, alarms) live in their own stacks and receive these
    resources as typed props; this stack only composes constructs and exports what the runbook
    and the local tooling read (``CfnOutput`` values, listed in docs/infrastructure.md).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: EnvironmentConfig,
        broker_usernames: tuple[str, ...],
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=Environment(account=config.account, region=config.region),
            description=f"Messaging Fabric {config.name}: stateful resources",
            termination_protection=config.termination_protection,
        )
        removal = (
            RemovalPolicy.DESTROY
            if config.removal_policy.value == "destroy"
            else RemovalPolicy.RETAIN
        )
        log_retention = _retention(config.log_retention_days)
        self.removal = removal
        self.log_retention = log_retention

        self.keys = FabricKeys(
            self,
            "Keys",
            env_name=config.name,
            removal_policy=removal,
            signing_keys=config.audit.signing_keys,
        )
        self.network = FabricNetwork(
            self,
            "Network",
            max_azs=config.max_azs,
            logs_key=self.keys.logs,
            log_retention=log_retention,
            removal_policy=removal,
        )
        self.audit = AuditStorage(
            self, "AuditStorage", config=config.audit, key=self.keys.audit, removal_policy=removal
        )
        self.audit_queue = AuditQueue(
            self, "AuditQueue", env_name=config.name, key=self.keys.queues, removal_policy=removal
        )
        self.broker = Broker(
            self,
            "Broker",
            env_name=config.name,
            config=config.broker,
            vpc=self.network.vpc,
            subnets=self.network.subnets,
            security_group=self.network.broker_security_group,
            secrets_key=self.keys.secrets,
            log_retention=log_retention,
            removal_policy=removal,
        )
        self.broker_users = BrokerUsers(
            self,
            "BrokerUsers",
            env_name=config.name,
            usernames=list(broker_usernames),
            secrets_key=self.keys.secrets,
            removal_policy=removal,
        )
        self.ingest = IngestQueues(
            self,
            "Ingest",
            env_name=config.name,
            key=self.keys.queues,
            removal_policy=removal,
            producers=config.producers,
        )
        self.fallback = FallbackPath(
            self,
            "Fallback",
            env_name=config.name,
            topics_key=self.keys.topics,
            queues_key=self.keys.queues,
            removal_policy=removal,
        )
        self.idempotency = IdempotencyTable(
            self,
            "Idempotency",
            env_name=config.name,
            key=self.keys.tables,
            removal_policy=removal,
        )
        self._outputs()

    def output(self, name: str) -> str:
        """This stack's output ``name`` as another stack of its environment reads it
        (``Fn::GetStackOutput``, the same as CDK's own cross-stack references, but explicit, so
        the value is known while constructing: a wildcard ARN built on it can be acknowledged).

        Raises:
            KeyError: this stack has no such output.
        """
        if not isinstance(self.node.try_find_child(name), CfnOutput):
            raise KeyError(f"{self.stack_name} has no output {name}")
        return Fn.get_stack_output(self.stack_name, name, self.region)

    def _outputs(self) -> None:
        outputs: dict[str, str] = {
            "BrokerId": self.broker.broker_id,
            "BrokerArn": self.broker.broker_arn,
            "BrokerAmqpEndpoint": self.broker.amqp_endpoint,
            "BrokerManagementUrl": self.broker.management_url,
            "BrokerAdminSecretArn": self.broker.admin_secret.secret_arn,
            "AuditBucketName": self.audit.audit_bucket.bucket_name,
            "ReportsBucketName": self.audit.reports_bucket.bucket_name,
            "AuditQueueUrl": self.audit_queue.queue.queue_url,
            "AuditDlqUrl": self.audit_queue.dead_letter_queue.queue_url,
            "IdempotencyTableName": self.idempotency.table.table_name,
            "SigningKeyArn": self.keys.signing.key_arn,
            # Oldest first, the current key last: what every verifier trusts (the runbook).
            "TrustedSigningKeyArns": ",".join(key.key_arn for key in self.keys.signing_keys),
            "VpcId": self.network.vpc.vpc_id,
            "FunctionsSecurityGroupId": self.network.functions_security_group.security_group_id,
        }
        for purpose, key in self.keys.symmetric_keys.items():
            outputs[f"{purpose.capitalize()}KeyArn"] = key.key_arn
        for flow, topic in self.fallback.topics.items():
            outputs[f"{flow.capitalize()}TopicArn"] = topic.topic_arn
        for group, queue in self.ingest.queues.items():
            outputs[f"Ingest{group.value.capitalize()}QueueUrl"] = queue.queue_url
            dead_letter_queue = self.ingest.dead_letter_queues[group]
            outputs[f"Ingest{group.value.capitalize()}DlqUrl"] = dead_letter_queue.queue_url
        for username, secret in self.broker_users.secrets.items():
            name = "".join(part.capitalize() for part in username.split("-"))
            outputs[f"{name}SecretArn"] = secret.secret_arn
        for (flow, group), queues in self.fallback.queues.items():
            prefix = f"{flow.capitalize()}{group.value.capitalize()}"
            outputs[f"{prefix}QueueUrl"] = queues.queue.queue_url
            outputs[f"{prefix}DlqUrl"] = queues.dead_letter_queue.queue_url
        for name, value in outputs.items():
            CfnOutput(self, name, value=value)


_RETENTION_BY_DAYS = dict(zip(LOG_RETENTION_DAYS, logs.RetentionDays, strict=False))


def _retention(days: int) -> logs.RetentionDays:
    """The RetentionDays member for a number of days that config already validated."""
    return _RETENTION_BY_DAYS[days]
