"""The fallback path of the stateful stack, created in moto (tests and benchmarks share it)."""

from __future__ import annotations

import json
from typing import Any

import boto3

from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import sns_filter_policy

REGION = "ap-southeast-3"


def create_fallback_path(prefix: str) -> dict[str, Any]:
    """Topics ``<prefix>-fallback``/``-emergency`` and, per group, a queue subscribed to each with
    raw delivery and the group's filter policy. Call inside ``mock_aws``.

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
            sns.subscribe(
                TopicArn=topics[flow],
                Protocol="sqs",
                Endpoint=arn,
                Attributes={
                    "RawMessageDelivery": "true",
                    "FilterPolicy": json.dumps(sns_filter_policy(group)),
                },
            )
            queues[(flow, group)] = url
    return {"topics": topics, "queues": queues, "sqs": sqs}
