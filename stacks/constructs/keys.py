"""Customer-managed KMS keys, one per purpose, and the asymmetric audit signing key."""

from __future__ import annotations

from typing import Any

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from stacks.constructs.audit_writer import audit_writer_name, checkpoint_rule_name
from stacks.constructs.function import role_arn
from stacks.constructs.key_state import key_state_rule_arn
from stacks.nag import acknowledge


def alarms_of_this_account(stack: Stack) -> dict[str, Any]:
    """Policy conditions that admit ``cloudwatch.amazonaws.com`` only for this account's
    alarms (confused-deputy protection)."""
    return {
        "StringEquals": {"aws:SourceAccount": stack.account},
        "ArnLike": {"aws:SourceArn": _every(stack, "cloudwatch", "alarm")},
    }


# What the topics and queues keys deny outside their service: every cryptographic operation,
# never key administration (the account root keeps kms:PutKeyPolicy, kms:ScheduleKeyDeletion...).
CRYPTO_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"]


def only_through(key: kms.Key, *, sid: str, service: str, direct_callers: list[str]) -> None:
    """Deny ``key``'s cryptographic operations to every caller who neither comes through
    ``service`` (``kms:ViaService``) nor is one of the service principals ``direct_callers``
    (``aws:PrincipalServiceName``), which call KMS in their own name.

    Both keys are negated, and a negated operator counts a key the request lacks as differing,
    so the deny needs both to miss: an IAM role calling KMS itself has neither key (denied);
    a role's request that SQS or SNS makes for it carries ``kms:ViaService`` (admitted); a
    service principal has no ``kms:ViaService`` but its own name (admitted if named, and then
    still only as far as its allow statement in the key's policy goes). Only an explicit deny
    stops the account's IAM policies, which the default statement lets use the key.
    """
    stack = Stack.of(key)
    key.add_to_resource_policy(
        iam.PolicyStatement(
            sid=sid,
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=CRYPTO_ACTIONS,
            resources=["*"],
            conditions={
                "StringNotEquals": {
                    "kms:ViaService": f"{service}.{stack.region}.amazonaws.com",
                    "aws:PrincipalServiceName": direct_callers,
                }
            },
        )
    )


def _every(stack: Stack, service: str, resource: str) -> str:
    """The ARN pattern of every ``resource`` of ``service`` in this account and region."""
    return stack.format_arn(
        service=service,
        resource=resource,
        resource_name="*",
        arn_format=ArnFormat.COLON_RESOURCE_NAME,
    )


class FabricKeys(Construct):
    """The fabric's KMS keys.

    Purposes are kept apart so that a grant on one never opens another:

    - ``messages``: Encryption SDK data keys for ``restricted`` payloads;
    - ``topics``: SNS topics of the fallback path;
    - ``queues``: SQS queues (a second key, because SNS must be granted use of the queue key in
      its key policy, and one key for both topic and queue makes a dependency cycle);
    - ``audit``: the audit and reports buckets (always retained: locked objects must stay
      readable for their whole retention, whatever the environment's removal policy);
    - ``secrets``: Secrets Manager secrets (broker and stakeholder credentials);
    - ``tables``: DynamoDB tables (consumer idempotency records and the redrive ledger);
    - ``logs``: CloudWatch Logs groups (flow logs, function logs);
    - ``signing``: asymmetric ECC_NIST_P256 key that signs audit checkpoints.

    KMS cannot rotate an asymmetric key, so ``signing_keys`` (the environment's
    ``audit.signing_keys``) says how many it has put in service: raising it by one adds a new
    key, which signs from then on (``signing``), and keeps the older ones (``retired_signing``)
    for the verifiers. The current key's policy denies ``kms:Sign`` to every principal but the
    audit writer's role (named); a retired key's policy denies it to every principal, except,
    for the key retired last, the audit writer's role, which signs with it until the services
    stack moves it to the new key.

    The key policies keep CDK's default (the account may delegate use through IAM); the service
    principals granted here, each under a condition, are CloudWatch Logs on the logs key
    (encryption context of this account's log groups), CloudWatch alarms of this account on the
    topics key, EventBridge on the topics key for the key-state rule only (its notification goes
    to the encrypted on-call topic, ``KeyStateAlarm``), and EventBridge on the queues key for the
    audit checkpoint rule only (its undeliverable events go to the audit writer's SSE-KMS DLQ);
    CDK adds SNS on the queues key for the fallback subscriptions. Everything else is granted by
    the stacks on the roles that use a key. The topics and queues keys also deny their
    cryptographic operations to any caller that comes neither through SNS (topics) or SQS
    (queues) nor as one of those service principals (``only_through``), whatever an IAM policy
    of the account allows.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        removal_policy: RemovalPolicy,
        signing_keys: int = 1,
    ) -> None:
        super().__init__(scope, construct_id)

        def symmetric(purpose: str, description: str, policy: RemovalPolicy) -> kms.Key:
            return kms.Key(
                self,
                purpose.capitalize(),
                alias=f"alias/fabric/{env_name}/{purpose}",
                description=f"Messaging Fabric {env_name}: {description}",
                enable_key_rotation=True,
                rotation_period=Duration.days(365),
                removal_policy=policy,
                pending_window=Duration.days(30),
            )

        self.messages = symmetric(
            "messages", "message-level encryption of restricted payloads", removal_policy
        )
        self.topics = symmetric("topics", "SNS fallback topics", removal_policy)
        self.queues = symmetric(
            "queues", "SQS fallback queues and dead-letter queues", removal_policy
        )
        self.audit = symmetric("audit", "audit trail and compliance reports", RemovalPolicy.RETAIN)
        self.secrets = symmetric("secrets", "broker and stakeholder credentials", removal_policy)
        self.tables = symmetric(
            "tables", "DynamoDB idempotency records and the redrive ledger", removal_policy
        )
        self.logs = symmetric("logs", "CloudWatch Logs log groups", removal_policy)

        stack = Stack.of(self)
        self.logs.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchLogsForThisAccount",
                principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": _every(stack, "logs", "log-group")
                    }
                },
            )
        )

        # CloudWatch alarms of this account publish to the encrypted on-call topic.
        self.topics.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchAlarmsOfThisAccount",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions=alarms_of_this_account(stack),
            )
        )
        # The key-state rule (KeyStateAlarm) publishes to the same topic: for that one named
        # rule only.
        self.topics.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowEventBridgeKeyStateNotification",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions={"ArnEquals": {"aws:SourceArn": key_state_rule_arn(self, env_name)}},
            )
        )

        # EventBridge writes an event it could not deliver to the audit writer's checkpoint
        # (after the target's retries) to the writer's SSE-KMS async DLQ, which needs the
        # queues key in EventBridge's own name: for that one named rule only.
        self.queues.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowEventBridgeDeadLettersOfTheAuditCheckpoint",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions={
                    "ArnEquals": {
                        "aws:SourceArn": stack.format_arn(
                            service="events",
                            resource="rule",
                            resource_name=checkpoint_rule_name(env_name),
                        )
                    }
                },
            )
        )

        # Used by roles only through SNS and SQS. The service principals that use them in their
        # own name are exactly those the allow statements above (and CDK's for the fallback
        # subscriptions) admit, each under its own condition.
        only_through(
            self.topics,
            sid="DenyUseExceptThroughSns",
            service="sns",
            direct_callers=["cloudwatch.amazonaws.com", "events.amazonaws.com"],
        )
        only_through(
            self.queues,
            sid="DenyUseExceptThroughSqs",
            service="sqs",
            direct_callers=["events.amazonaws.com", "sns.amazonaws.com"],
        )

        # Oldest first. The first keeps the construct id and alias it had before rotation
        # existed; each later one gets its own alias (an alias cannot move between keys in one
        # CloudFormation update without a name clash).
        self.signing_keys = [
            self._signing_key(env_name, generation) for generation in range(1, signing_keys + 1)
        ]
        self.signing = self.signing_keys[-1]
        self.retired_signing = self.signing_keys[:-1]
        writer = {"ArnNotEquals": {"aws:PrincipalArn": role_arn(self, audit_writer_name(env_name))}}
        # The current key signs for the audit writer's role and for nobody else, whatever an IAM
        # policy of the account allows: a signature is what makes a checkpoint trusted, so
        # anyone else who could sign (and write to the audit bucket) could forge a trail. Only
        # kms:Sign is denied: the account root keeps the key's administration, and the
        # verifiers' kms:Verify is untouched.
        self.signing.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheAuditWriterSigns",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["kms:Sign"],
                resources=["*"],
                conditions=writer,
            )
        )
        for retired in self.retired_signing:
            # The key retired last still signs for the audit writer until the services stack
            # (deployed after this one) moves the writer to its successor, and for nobody else;
            # the keys before it for nobody at all.
            last = retired is self.retired_signing[-1]
            retired.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="RetiredNeverSignsAgain",
                    effect=iam.Effect.DENY,
                    principals=[iam.AnyPrincipal()],
                    actions=["kms:Sign"],
                    resources=["*"],
                    conditions=writer if last else None,
                )
            )

    def _signing_key(self, env_name: str, generation: int) -> kms.Key:
        suffix = "" if generation == 1 else f"-{generation}"
        key = kms.Key(
            self,
            "Signing" if generation == 1 else f"Signing{generation}",
            alias=f"alias/fabric/{env_name}/audit-signing{suffix}",
            description=f"Messaging Fabric {env_name}: signs audit checkpoints"
            + ("" if generation == 1 else f" (key {generation})"),
            key_spec=kms.KeySpec.ECC_NIST_P256,
            key_usage=kms.KeyUsage.SIGN_VERIFY,
            removal_policy=RemovalPolicy.RETAIN,
            pending_window=Duration.days(30),
        )
        acknowledge(
            key,
            "NIST.800.53.R5-KMSBackingKeyRotationEnabled",
            (
                "KMS cannot rotate asymmetric keys automatically: the environment rotates the "
                "signing key by putting a new one in service (audit.signing_keys in cdk.json, "
                "docs/audit-trail.md), and the verifiers trust each checkpoint's own key among "
                "the current and retired ones. The key is retained on stack deletion."
            ),
        )
        return key

    @property
    def symmetric_keys(self) -> dict[str, kms.Key]:
        """The symmetric keys by purpose, for outputs and tests."""
        return {
            "messages": self.messages,
            "topics": self.topics,
            "queues": self.queues,
            "audit": self.audit,
            "secrets": self.secrets,
            "tables": self.tables,
            "logs": self.logs,
        }
