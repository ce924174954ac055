"""The redrive function: on demand, dead letters go back to where they came from."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aws_cdk import Duration, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric.adapters.dynamodb_ledger import LEDGER_PREFIX
from fabric.naming import redrive_function_name
from stacks.constructs.audit_queue import audit_environment
from stacks.constructs.function import FabricFunction, FunctionPlatform
from stacks.constructs.queues import QueueAddress, address
from stacks.constructs.router import broker_environment

# One redrive at a time per environment. A run holds the letters it looked at (unacknowledged
# in RabbitMQ, invisible in SQS) until it ends, and asks the ledger before it moves a letter; a
# second run at the same time would see only what the first left, race it between the ledger
# check and the move, and compete with live traffic for the broker. A second invoke is throttled,
# which the runbook reports.
_CONCURRENCY = 1
# Lambda's longest timeout; REDRIVE_MAX_SECONDS stops a run a minute before it.
_TIMEOUT = Duration.minutes(15)
_MAX_SECONDS = "840"

# What the redrive does on a dead-letter queue (fabric.adapters.sqs_dlq): read and hold letters,
# remove the ones it put back, give back the rest. It moves letters itself, one by one, to filter
# and audit each: no SQS message-move task, so none of its actions.
_READ_DEAD_LETTERS = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
]
# The ledger adapter's batches (fabric.adapters.dynamodb_ledger), on ``redrive#`` items only:
# the table also holds the audit chain's state and the consumers' idempotency records, which a
# redrive (it handles untrusted dead letters) must not touch. No Scan, Query or administration.
_LEDGER = ["dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"]
_LEDGER_ITEMS = {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"{LEDGER_PREFIX}*"]}}


@dataclass(frozen=True)
class DeadLetterPair:
    """An SQS queue and its dead-letter queue ``<name>-dlq``, both with literal names."""

    source: sqs.IQueue
    dead_letter_queue: sqs.IQueue


class Redrive(Construct):
    """``lambdas/redrive``, invoked on demand only (``python scripts/runbook.py redrive``).

    No schedule: moving dead letters back is an operator's decision, taken once the cause is
    fixed. It reads every RabbitMQ DLQ and the overflow queue as its own broker user,
    ``fabric-redrive`` (AMQP; its secret is the only one it may read; the router's user reads no
    queue), and on each SQS dead-letter queue of ``pairs`` it may read, hold and remove, sending
    only to that queue's source. It sends its audit batches (the ``redriven`` records) to the
    SQS audit queue while the broker cannot take them (granted on its own, whether or not the
    audit queue is also one of ``pairs``). It reads and writes ledger
    items of the idempotency table. The queues key and the table's key only through SQS and
    DynamoDB.
    Asynchronous invocations are not retried: a failed run is the operator's to look at (its
    event lands in the function's alarmed async DLQ), and a re-run is safe.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        broker_host: str,
        broker_secret: secretsmanager.ISecret,
        secrets_key: kms.IKey,
        pairs: list[DeadLetterPair],
        queues_key: kms.IKey,
        table: dynamodb.ITable,
        table_key: kms.IKey,
        audit_queue: QueueAddress,
    ) -> None:
        super().__init__(scope, construct_id)
        addressed = sorted(
            ((address(self, p.source), address(self, p.dead_letter_queue)) for p in pairs),
            key=lambda pair: pair[0].name,
        )
        for source, dlq in addressed:
            # The function derives each DLQ from its source's name (fabric.settings).
            if dlq.name != f"{source.name}-dlq":
                raise ValueError(f"{dlq.name} is not named {source.name}-dlq")
        # Names only, and the prefixes that make them URLs and ARNs: the same values as
        # address() builds, and far inside Lambda's 4 KB of environment.
        stack = Stack.of(self)
        url_prefix = f"https://sqs.{stack.region}.{stack.url_suffix}/{stack.account}/"
        arn_prefix = f"arn:{stack.partition}:sqs:{stack.region}:{stack.account}:"
        self.function = FabricFunction(
            self,
            "Redrive",
            platform=platform,
            code_dir="lambdas/redrive",
            # Named, so the runbook finds it: `python scripts/runbook.py redrive --env <env>`.
            function_name=redrive_function_name(env_name),
            # Named like the function: the audit queue's policy admits it as a sender.
            role_name=redrive_function_name(env_name),
            description=(
                f"Messaging Fabric {env_name}: redrives dead letters to where they came from"
            ),
            environment={
                **broker_environment(env_name, broker_host, broker_secret),
                "IDEMPOTENCY_TABLE": table.table_name,
                "SQS_REDRIVE_SOURCES": json.dumps([source.name for source, _ in addressed]),
                "SQS_URL_PREFIX": url_prefix,
                "SQS_ARN_PREFIX": arn_prefix,
                "REDRIVE_MAX_SECONDS": _MAX_SECONDS,
                **audit_environment(audit_queue),
            },
            reserved_concurrency=_CONCURRENCY,
            timeout=_TIMEOUT,
            memory_size=512,
        )
        function = self.function.function
        function.configure_async_invoke(retry_attempts=0)
        self.function.allow_secret_read(broker_secret, secrets_key)
        self.function.allow_send(audit_queue, sid="AuditBatches")

        dead_letter_arns = [dlq.arn for _, dlq in addressed]
        region = stack.region
        role = self.function.role
        for sid, actions, resources, conditions in (
            ("ReadDeadLetters", _READ_DEAD_LETTERS, dead_letter_arns, None),
            ("PutBackAtSource", ["sqs:SendMessage"], [s.arn for s, _ in addressed], None),
            ("Ledger", _LEDGER, [table.table_arn], _LEDGER_ITEMS),
        ):
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid=sid, actions=actions, resources=resources, conditions=conditions
                )
            )
        # SQS SSE-KMS: receiving decrypts, sending generates a data key. DynamoDB decrypts its
        # table key with the caller's permission. Identity statements (the keys live in the
        # stateful stack), usable only through the service that holds the data.
        # DynamoDB names the table in its encryption context: the ledger's only.
        for sid, key, actions, service, context in (
            ("QueuesKeyThroughSqs", queues_key, ["kms:Decrypt", "kms:GenerateDataKey"], "sqs", {}),
            (
                "TableKeyThroughDynamoDb",
                table_key,
                ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                "dynamodb",
                {"kms:EncryptionContext:aws:dynamodb:tableName": table.table_name},
            ),
        ):
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid=sid,
                    actions=actions,
                    resources=[key.key_arn],
                    conditions={
                        "StringEquals": {
                            "kms:ViaService": f"{service}.{region}.amazonaws.com",
                            **context,
                        }
                    },
                )
            )
