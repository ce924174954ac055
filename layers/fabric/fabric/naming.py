"""Deterministic AWS resource names, shared by the CDK constructs and the runbook."""

from __future__ import annotations

from fabric.stakeholders import STAKEHOLDERS, Stakeholder

FALLBACK_FLOWS = ("fallback", "emergency")
"""The two SNS topics of the fallback path; each has one SQS queue per stakeholder group."""


def fallback_queue_name(env_name: str, flow: str, group: Stakeholder) -> str:
    """``fabric-<env>-<flow>-<group>``: the SQS queue of ``group`` on fallback topic ``flow``."""
    return f"fabric-{env_name}-{flow}-{group.value}"


def fallback_queue_names(env_name: str) -> list[tuple[str, Stakeholder, str]]:
    """Every fallback queue of an environment as ``(flow, group, name)``, emergencies first."""
    return [
        (flow, group, fallback_queue_name(env_name, flow, group))
        for flow in sorted(FALLBACK_FLOWS, key=lambda f: f != "emergency")
        for group in STAKEHOLDERS
    ]


def subscription_dead_letter_queue_name(queue_name: str) -> str:
    """``<queue>-sub-dlq``: the dead-letter queue of the SNS subscription of fallback queue
    ``queue_name``, where SNS puts what it could not deliver there."""
    return f"{queue_name}-sub-dlq"


def drained_queue_names(env_name: str) -> list[tuple[str, Stakeholder, bool]]:
    """Every queue the drain empties, as ``(name, group, emergency)``, emergencies first: each
    fallback queue and its subscription's dead-letter queue (what SNS could not deliver to
    the queue was accepted all the same, so it goes to the group's work queue too)."""
    return [
        (name, group, flow == "emergency")
        for flow, group, queue in fallback_queue_names(env_name)
        for name in (queue, subscription_dead_letter_queue_name(queue))
    ]


def drain_function_name(env_name: str) -> str:
    """``fabric-<env>-drain``: the drain function, which the runbook invokes on demand."""
    return f"fabric-{env_name}-drain"


def redrive_function_name(env_name: str) -> str:
    """``fabric-<env>-redrive``: the redrive function, which the runbook invokes on demand."""
    return f"fabric-{env_name}-redrive"


def replay_function_name(env_name: str) -> str:
    """``fabric-<env>-replay``: the replay function, which the runbook invokes on demand."""
    return f"fabric-{env_name}-replay"


def topology_function_name(env_name: str) -> str:
    """``fabric-<env>-topology``: the topology function (the custom resource's), which the
    runbook invokes for ``topology diff`` and ``topology apply``."""
    return f"fabric-{env_name}-topology"


def idempotency_table_name(env_name: str) -> str:
    """``fabric-<env>-idempotency``: the DynamoDB table of consumer idempotency records and
    the redrive ledger (partition key ``id``, expiry attribute ``expiration``)."""
    return f"fabric-{env_name}-idempotency"


def audit_queue_name(env_name: str) -> str:
    """``fabric-<env>-audit``: the SQS queue that takes audit batches while RabbitMQ cannot
    (the audit writer reads it and the RabbitMQ audit queue)."""
    return f"fabric-{env_name}-audit"


def is_ingest_queue(queue: str) -> bool:
    """Whether ``queue`` (a name or a URL) is an ingest queue, ``fabric-<env>-ingest-<group>``:
    its messages are producers' input, which the fabric has not stored (a restricted payload
    still in plaintext), so no audit record may hold a hash of one."""
    prefix, separator, group = queue.rpartition("/")[2].rpartition("-ingest-")
    return bool(separator) and prefix.startswith("fabric-") and group in _GROUP_NAMES


_GROUP_NAMES = frozenset(group.value for group in STAKEHOLDERS)
