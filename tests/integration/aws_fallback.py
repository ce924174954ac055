"""The fallback path of the stateful stack, created in moto (tests and benchmarks share it)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import boto3

from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import sns_filter_policy

REGION = "ap-southeast-3"
# The drain's receive wait in tests (``SqsFallbackSource(long_poll_s=...)``; deployed: 1 s,
# tests/unit/test_sqs_fallback_source.py). Moto's short poll answers every message a queue
# holds, and its long poll only waits out the second on each empty queue: twenty a run.
MOTO_POLL_S = 0


def create_fallback_path(prefix: str) -> dict[str, Any]:
    """Topics ``<prefix>-fallback``/``-emergency`` and, per group, a queue subscribed to each with
    raw delivery, the group's filter policy and a subscription DLQ (``<queue>-sub-dlq``). Call
    inside ``mock_aws``.

    Returns ``{"topics": {flow: arn}, "queues": {(flow, group): url}, "sqs": client}``.
    """
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topics, queues = {}, {}
    for flow in ("fallback", "emergency"):
        topics[flow] = sns.create_topic(Name=f"{prefix}-{flow}")["TopicArn"]
        for group in STAKEHOLDERS:
            url = sqs.create_queue(QueueName=f"{prefix}-{flow}-{group.value}")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            # What SNS cannot deliver to the queue goes to the subscription's own DLQ.
            sub_dlq = sqs.create_queue(QueueName=f"{prefix}-{flow}-{group.value}-sub-dlq")
            sub_dlq_arn = sqs.get_queue_attributes(
                QueueUrl=sub_dlq["QueueUrl"], AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
            sns.subscribe(
                TopicArn=topics[flow],
                Protocol="sqs",
                Endpoint=arn,
                Attributes={
                    "RawMessageDelivery": "true",
                    "FilterPolicy": json.dumps(sns_filter_policy(group)),
                    "RedrivePolicy": json.dumps({"deadLetterTargetArn": sub_dlq_arn}),
                },
            )
            queues[(flow, group)] = url
    return {"topics": topics, "queues": queues, "sqs": sqs}


def bootstrapped_router(
    aws: dict[str, Any], *, port: int, audit_queue_url: str | None = None
) -> Any:
    """The router exactly as ``fabric.bootstrap`` wires it, for a broker on loopback ``port``,
    with a messages key and a platform secret in moto and ``aws``'s fallback topics."""
    from fabric.bootstrap import build_router_runtime
    from fabric.settings import RouterSettings

    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=f"platform-{uuid.uuid4().hex[:8]}",
        SecretString=json.dumps({"username": "u", "password": "p"}),
    )["ARN"]
    settings = RouterSettings(
        environment="test",
        rabbitmq_host="127.0.0.1",
        rabbitmq_port=port,
        rabbitmq_tls=False,
        rabbitmq_vhost="/",
        rabbitmq_secret_arn=secret,
        messages_key_arn=boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"],
        identity_claim="fabric:group",
        ingest_queue_prefix="fabric-test-ingest-",
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        audit_queue_url=audit_queue_url,
    )
    return build_router_runtime(settings).router
