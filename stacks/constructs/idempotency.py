"""The idempotency table: consumers' processed-message records and the redrive ledger."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_kms as kms
from constructs import Construct

from fabric.naming import idempotency_table_name
from stacks.nag import acknowledge

# The schema of AWS Lambda Powertools' DynamoDBPersistenceLayer with its defaults (3.37.0):
# partition key `id` (string), record expiry `expiration` (epoch seconds, the TTL attribute).
PARTITION_KEY = "id"
TTL_ATTRIBUTE = "expiration"

_NO_BACKUP_PLAN = (
    "Point-in-time recovery restores any second of the last 35 days, which covers the consumer "
    "records and the audit writer's batch marks (14 days, TTL). The redrive ledger (400 days) "
    "only prevents a second move, which consumers deduplicate anyway; the audit chain's state "
    "(no expiry) is the position the Object Lock trail itself records (its last checkpoint and "
    "the objects after it), so the 7-year record of truth is the bucket, not this table."
)


class IdempotencyTable(Construct):
    """DynamoDB table ``fabric-<env>-idempotency``, in the schema Powertools' idempotency uses.

    On-demand billing; encrypted with the ``tables`` customer key; point-in-time recovery on;
    TTL on ``expiration`` so records delete themselves. Where the environment retains its data,
    the table is also deletion-protected, so neither a stack deletion nor an API call can drop
    it. Consumers write one record per message id; the redrive writes one ledger entry per
    message it put back, so a re-run never moves a letter twice.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.key = key
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=idempotency_table_name(env_name),
            partition_key=dynamodb.Attribute(
                name=PARTITION_KEY, type=dynamodb.AttributeType.STRING
            ),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=key,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            time_to_live_attribute=TTL_ATTRIBUTE,
            deletion_protection=removal_policy == RemovalPolicy.RETAIN,
            removal_policy=removal_policy,
        )
        for rule in ("HIPAA.Security-DynamoDBInBackupPlan", "NIST.800.53.R5-DynamoDBInBackupPlan"):
            acknowledge(self.table, rule, _NO_BACKUP_PLAN)
