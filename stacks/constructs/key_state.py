"""A notification to on-call when someone disables a fabric key, schedules its deletion or puts
a new policy on it: the fabric then stops encrypting with that key, and nothing else says so."""

from __future__ import annotations

import jsii
from aws_cdk import Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk.interfaces import aws_events as events_refs
from constructs import Construct

# The KMS calls that take a key away from the fabric: a disabled key and a key pending deletion
# refuse every cryptographic operation, and a new policy may no longer admit a service (SNS on
# the queues key, CloudWatch on the topics key) or a role. The calls that give a key back
# (EnableKey, CancelKeyDeletion) and rotation settings (DisableKeyRotation: a compliance
# finding, not an outage) are not here.
WATCHED_CALLS = ("DisableKey", "ScheduleKeyDeletion", "PutKeyPolicy")
RUNBOOK_SECTION = "When a fabric key changes"


def key_state_rule_name(env_name: str) -> str:
    """The name of the rule, which the topics key's policy names (``FabricKeys``)."""
    return f"fabric-{env_name}-key-state"


def key_state_rule_arn(scope: Construct, env_name: str) -> str:
    """The rule's ARN in ``scope``'s stack, by name: the stateful stack's key policy names it
    without a reference to the services stack, which deploys after it."""
    return Stack.of(scope).format_arn(
        service="events", resource="rule", resource_name=key_state_rule_name(env_name)
    )


class KeyStateAlarm(Construct):
    """An EventBridge rule on the KMS calls of ``WATCHED_CALLS`` that CloudTrail records for the
    fabric's own ``keys`` (by the key ARN KMS resolves, ``detail.resources[].ARN``, whatever id
    the caller gave), successful ones only, which publishes one message to the on-call
    ``topic``: the key, the call, who made it, and the runbook section.

    CloudTrail delivers these events to EventBridge only when the account has a trail that
    records management events. The topic is encrypted with the topics key, so a disabled topics
    key also stops this notification (docs/runbook.md).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        keys: list[kms.IKey],
        topic: sns.Topic,
    ) -> None:
        super().__init__(scope, construct_id)
        rule_arn = key_state_rule_arn(self, env_name)

        def field(path: str) -> str:
            return events.EventField.from_path(path)

        message = events.RuleTargetInput.from_text(
            f"Messaging Fabric {env_name}: {field('$.detail.eventName')} on the fabric KMS key "
            f"{field('$.detail.resources[0].ARN')} by {field('$.detail.userIdentity.arn')} "
            f"(from {field('$.detail.sourceIPAddress')}) at {field('$.detail.eventTime')}. "
            "While a fabric key is disabled, pending deletion or refused to a service by its "
            "policy, whatever the fabric encrypts with it fails: restricted messages, fallback "
            "messages and their dead letters, audit records, credentials, logs. Unless this is a "
            "planned deploy (from cloudformation.amazonaws.com), act now: docs/runbook.md, "
            f"'{RUNBOOK_SECTION}'."
        )
        self.rule = events.Rule(
            self,
            "Rule",
            rule_name=key_state_rule_name(env_name),
            description=(
                f"Messaging Fabric {env_name}: a fabric KMS key disabled, scheduled for deletion "
                "or given a new policy"
            ),
            event_pattern=events.EventPattern(
                source=["aws.kms"],
                detail_type=["AWS API Call via CloudTrail"],
                detail={
                    "eventSource": ["kms.amazonaws.com"],
                    "eventName": list(WATCHED_CALLS),
                    "resources": {"ARN": [key.key_arn for key in keys]},
                    # A refused call changed nothing.
                    "errorCode": [{"exists": False}],
                },
            ),
            targets=[_OnCallTopic(topic, message)],
        )
        # EventBridge publishes in its own name, which no IAM grant covers; the topics key's
        # policy lets it encrypt for this rule only (FabricKeys).
        topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowEventBridgeKeyStateNotification",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[topic.topic_arn],
                conditions={"ArnEquals": {"aws:SourceArn": rule_arn}},
            )
        )


@jsii.implements(events.IRuleTarget)
class _OnCallTopic:
    """The topic as a rule target, without the publish grant CDK's ``SnsTopic`` target adds to
    the topic's policy (``events.amazonaws.com`` from any rule, no condition): ``KeyStateAlarm``
    admits its own rule only."""

    def __init__(self, topic: sns.ITopic, message: events.RuleTargetInput) -> None:
        self._topic = topic
        self._message = message

    def bind(self, _rule: events_refs.IRuleRef, _id: str | None = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._topic.topic_arn, input=self._message)
