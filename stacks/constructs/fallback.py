"""The SNS/SQS fallback path that takes messages when RabbitMQ cannot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric.drain import FALLBACK_MAX_RECEIVES
from fabric.naming import FALLBACK_FLOWS, fallback_queue_name, redrive_function_name
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from stacks.constructs.function import role_arn, router_role_name
from stacks.constructs.queues import address, deny_other_senders, encrypted_queue, queue_with_dlq
from stacks.nag import acknowledge

# Longer than the drain function's per-message confirm wait, so a message being drained is not
# handed to a second drainer.
_VISIBILITY_TIMEOUT = Duration.seconds(120)
# SNS subscription filter attribute carrying the groups that the routing table resolved.
AUDIENCE_ATTRIBUTE = "audience"
# Every action SNS documents as valid in a topic policy ("Amazon SNS API permissions: Actions
# and resources reference"); it refuses a topic policy naming any other action ("Policy
# statement action out of service scope").
TOPIC_POLICY_ACTIONS = (
    "sns:AddPermission",
    "sns:DeleteTopic",
    "sns:GetDataProtectionPolicy",
    "sns:GetTopicAttributes",
    "sns:ListSubscriptionsByTopic",
    "sns:ListTagsForResource",
    "sns:Publish",
    "sns:PutDataProtectionPolicy",
    "sns:RemovePermission",
    "sns:SetTopicAttributes",
    "sns:Subscribe",
)


def deny_without_tls(topic: sns.Topic) -> None:
    """Refuse every request on ``topic`` that is not over TLS.

    CDK's ``enforce_ssl`` denies only ``sns:Publish``; a subscription, a read of the topic's
    attributes or subscriptions, or a change of its policy over plain HTTP would still pass.
    """
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="DenyWithoutTls",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=list(TOPIC_POLICY_ACTIONS),
            resources=[topic.topic_arn],
            conditions={"Bool": {"aws:SecureTransport": "false"}},
        )
    )


def deny_other_publishers(topic: sns.Topic, *, roles: Sequence[str]) -> None:
    """Refuse ``sns:Publish`` on ``topic`` to every principal but ``roles`` (IAM role ARNs,
    matched as ``aws:PrincipalArn``): what the topic delivers, its queues take as the groups'
    traffic, so the queues' own sender rules would be bypassed through an open topic."""
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="DenyPublishExceptNamedPublishers",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            conditions={"ArnNotEquals": {"aws:PrincipalArn": list(roles)}},
        )
    )


def deny_other_subscriptions(topic: sns.Topic, *, queues: Sequence[str]) -> None:
    """Refuse ``sns:Subscribe`` on ``topic`` to everyone (CloudFormation's deploying role too)
    but for an SQS subscription of one of ``queues`` (queue ARNs): a subscription of any other
    endpoint would receive every group's fallback traffic.

    Two statements, as a deny applies only when all its conditions hold: one refuses every
    protocol but ``sqs``, the other every endpoint but these queues. The ARNs are literal,
    built from the queues' names (``address``), so the policy names exactly the endpoints the
    stack's own subscriptions give.
    """
    for sid, key, allowed in (
        ("DenySubscribeExceptSqs", "sns:Protocol", ["sqs"]),
        ("DenySubscribeExceptOwnQueues", "sns:Endpoint", list(queues)),
    ):
        topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid=sid,
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sns:Subscribe"],
                resources=[topic.topic_arn],
                conditions={"StringNotEquals": {key: allowed}},
            )
        )


@dataclass(frozen=True)
class FallbackQueues:
    """The queues of one stakeholder group on one fallback topic."""

    queue: sqs.Queue
    dead_letter_queue: sqs.Queue
    subscription_dead_letter_queue: sqs.Queue


class FallbackPath(Construct):
    """SNS topics ``fallback`` and ``emergency``, and per stakeholder group one queue on each.

    Every queue has a dead-letter queue whose redrive-allow policy admits only its own source
    queue; every subscription has its own dead-letter queue for messages SNS cannot deliver.
    Subscriptions filter on the ``audience`` message attribute, so SNS delivers exactly the groups
    the routing table computed, as RabbitMQ would have. Raw delivery keeps the envelope as the
    SQS body and the SNS message attributes as SQS message attributes, for the drain.

    Topics refuse every action without TLS, a publisher other than the router's role and a
    subscription other than their own groups' queues (over SQS); a queue accepts messages only
    from its topic and the redrive, a subscription's DLQ only from its topic
    (``deny_other_senders``).

    Queue names are deterministic (``fabric-<env>-<flow>-<group>[-dlq|-sub-dlq]``): the runbook
    finds them by name, and a queue's DLQ can name its source in its redrive-allow policy without a
    dependency cycle.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        topics_key: kms.IKey,
        queues_key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.topics: dict[str, sns.Topic] = {}
        self.queues: dict[tuple[str, Stakeholder], FallbackQueues] = {}

        for flow in FALLBACK_FLOWS:
            topic = sns.Topic(
                self,
                f"{flow.capitalize()}Topic",
                topic_name=f"fabric-{env_name}-{flow}",
                display_name=f"Messaging Fabric {env_name} {flow} path",
                master_key=topics_key,
            )
            deny_without_tls(topic)
            deny_other_publishers(topic, roles=[role_arn(self, router_role_name(env_name))])
            topic.apply_removal_policy(removal_policy)
            self.topics[flow] = topic
            for group in STAKEHOLDERS:
                self.queues[(flow, group)] = self._subscribe(
                    topic,
                    name=fallback_queue_name(env_name, flow, group),
                    construct_id=f"{flow.capitalize()}{group.value.capitalize()}",
                    group=group,
                    key=queues_key,
                    removal_policy=removal_policy,
                    redrive_role=role_arn(self, redrive_function_name(env_name)),
                )
            deny_other_subscriptions(
                topic,
                queues=[address(self, self.queues[(flow, g)].queue).arn for g in STAKEHOLDERS],
            )

    def _subscribe(
        self,
        topic: sns.Topic,
        *,
        name: str,
        construct_id: str,
        group: Stakeholder,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
        redrive_role: str,
    ) -> FallbackQueues:
        queue, dead_letter_queue = queue_with_dlq(
            self,
            construct_id,
            name=name,
            key=key,
            removal_policy=removal_policy,
            max_receive_count=FALLBACK_MAX_RECEIVES,
            visibility_timeout=_VISIBILITY_TIMEOUT,
        )
        # Only the topic's deliveries and the redrive (which puts dead letters back) may send:
        # the drain hands whatever is here to RabbitMQ as the group's traffic.
        deny_other_senders(queue, roles=[redrive_role], topics=[topic.topic_arn])
        subscription_dead_letter_queue = encrypted_queue(
            self,
            f"{construct_id}SubscriptionDlq",
            name=f"{name}-sub-dlq",
            key=key,
            removal_policy=removal_policy,
            # The drain reads it as it reads the queue: a message it takes stays hidden as long.
            visibility_timeout=_VISIBILITY_TIMEOUT,
            # Only SNS writes here; no SQS queue may use it as its dead-letter queue.
            redrive_allow_policy=sqs.RedriveAllowPolicy(
                redrive_permission=sqs.RedrivePermission.DENY_ALL
            ),
        )
        # Only SNS's dead letters of this topic; the drain takes them to the work queue.
        deny_other_senders(subscription_dead_letter_queue, roles=[], topics=[topic.topic_arn])
        acknowledge(
            subscription_dead_letter_queue,
            "AwsSolutions-SQS3",
            (
                f"This queue is the dead-letter queue of the SNS subscription of {name}; SNS "
                "references it in the subscription's RedrivePolicy, which cdk-nag does not see."
            ),
        )
        subscription = topic.add_subscription(
            subscriptions.SqsSubscription(
                queue,
                raw_message_delivery=True,
                dead_letter_queue=subscription_dead_letter_queue,
                filter_policy={
                    AUDIENCE_ATTRIBUTE: sns.SubscriptionFilter.string_filter(
                        allowlist=[group.value]
                    )
                },
            )
        )
        # After the topic's policy (which admits only its own queues' subscriptions): made at
        # once, a new queue's subscription could meet the policy before it named that queue.
        policy = topic.node.try_find_child("Policy")  # CDK's TopicPolicy, made by the TLS deny
        if policy is not None:
            subscription.node.add_dependency(policy)
        return FallbackQueues(queue, dead_letter_queue, subscription_dead_letter_queue)
