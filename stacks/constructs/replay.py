"""The replay function: on demand, archived messages of a period go back into the fabric."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from constructs import Construct

from fabric.naming import replay_function_name
from stacks.constructs.audit_queue import audit_environment
from stacks.constructs.audit_writer import SIGNING_ALGORITHM, signing_environment
from stacks.constructs.function import FabricFunction, FunctionPlatform
from stacks.constructs.queues import QueueAddress
from stacks.constructs.router import broker_environment
from stacks.nag import acknowledge, wildcard_resource_finding

# One replay at a time per environment: a replay re-publishes into the stakeholders' queues,
# where it competes with live traffic; two at once would double that, and two runs of one chunked
# replay must not overlap (each goes on from the cursor the previous one returned). A second
# invoke is throttled, which the runbook reports.
_CONCURRENCY = 1
# Lambda's longest timeout; REPLAY_MAX_SECONDS stops a run two minutes before it, the compliance
# report's ANSWER_MARGIN_S: what a step of the trail's reading begun in time may take more than
# its estimate (an interval of up to 1,000 objects), and the answer (fabric.replay._Steps).
_TIMEOUT = Duration.minutes(15)
_MAX_SECONDS = "780"
# A run holds one checkpoint interval's audit objects while it verifies them, a compact id of
# each matching message and the full acceptance of at most twice max_messages of them, and a
# few decoded archive objects (fabric.replay; docs/audit-trail.md, "Costs and limits").
_MEMORY_MB = 2048
# What the replay reads of each writer (fabric.replay): its records, its checkpoints (to verify
# the records) and the archived bodies.
READ_ROOTS = ("audit", "checkpoints", "archive")
# Where it looks for delete markers, which hide a locked record or checkpoint from a plain
# listing (fabric.replay._deleted): the trail, not the archive (a hidden body is missing-body).
TRAIL_ROOTS = ("audit", "checkpoints")


class Replay(Construct):
    """``lambdas/replay``, invoked on demand only (``python scripts/runbook.py replay``).

    No schedule: re-publishing archived messages is an operator's decision. It publishes to
    RabbitMQ as the platform user (its secret is the only one it may read), through the same
    exchanges as the router, and only there: no fallback topics (a replay stops while the
    broker cannot take messages, and resumes from its cursor). Read-only on the audit writers'
    trails: ``s3:ListBucket`` for keys under ``audit/<writer>/``, ``checkpoints/<writer>/`` and
    ``archive/<writer>/``, ``s3:ListBucketVersions`` (delete markers) under the first two only,
    and ``s3:GetObject`` on the objects there, nothing that writes,
    deletes, or touches retention; the audit key only to decrypt, through S3, for that bucket;
    ``kms:Verify`` on the signing key, to verify the trail before any of it is replayed. It
    sends its audit batches (the ``replayed`` records) to the SQS audit queue while the broker
    cannot take them. Errors alarm as ``ReplayErrors``; asynchronous invocations are not
    retried (a re-run from the cursor is the operator's).
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
        audit_queue: QueueAddress,
        bucket_name: str,
        bucket_key: kms.IKey,
        writers: Sequence[str],
        signing_keys: Sequence[kms.IKey],
        alarm_topic: sns.ITopic,
    ) -> None:
        """``signing_keys``: every key that has signed checkpoints, oldest first (the last
        signs now)."""
        super().__init__(scope, construct_id)
        # By name (an explicit Fn::GetStackOutput from the stateful stack), so the object ARNs
        # under the bucket are known here and their wildcard can be acknowledged exactly.
        bucket = s3.Bucket.from_bucket_name(self, "AuditBucket", bucket_name)
        self.function = FabricFunction(
            self,
            "Replay",
            platform=platform,
            code_dir="lambdas/replay",
            # Named, so the runbook finds it: `python scripts/runbook.py replay --env <env>`.
            function_name=replay_function_name(env_name),
            # Named like the function: the audit queue's policy admits it as a sender.
            role_name=replay_function_name(env_name),
            description=(
                f"Messaging Fabric {env_name}: replays archived messages of a period, marked "
                "as replays"
            ),
            environment={
                **broker_environment(env_name, broker_host, broker_secret),
                "AUDIT_BUCKET": bucket.bucket_name,
                "AUDIT_WRITERS": ",".join(writers),
                **signing_environment(signing_keys),
                "REPLAY_MAX_SECONDS": _MAX_SECONDS,
                **audit_environment(audit_queue),
            },
            reserved_concurrency=_CONCURRENCY,
            timeout=_TIMEOUT,
            memory_size=_MEMORY_MB,
        )
        function = self.function.function
        function.configure_async_invoke(retry_attempts=0)
        self.function.allow_secret_read(broker_secret, secrets_key)
        self.function.allow_send(audit_queue, sid="AuditBatches")
        self._read_trail(bucket, bucket_key, writers, signing_keys)

        self.errors_alarm = self.function.errors_alarm(
            self,
            alarm_topic,
            description=(
                "The replay function failed: the replay it was running stopped without a "
                "report. Read its logs, then resume with the runbook's --replay-id and --after "
                "(docs/runbook.md)."
            ),
        )

    def _read_trail(
        self,
        bucket: s3.IBucket,
        bucket_key: kms.IKey,
        writers: Sequence[str],
        signing_keys: Sequence[kms.IKey],
    ) -> None:
        """List and read the writers' records, checkpoints and archives; list the trail's
        delete markers; decrypt their data keys via S3; verify checkpoint signatures."""
        region = Stack.of(self).region
        prefixes = [f"{root}/{writer}/" for writer in writers for root in READ_ROOTS]
        trail = [f"{root}/{writer}/" for writer in writers for root in TRAIL_ROOTS]
        objects = [bucket.arn_for_objects(f"{prefix}*") for prefix in prefixes]
        self.function.allow(
            (
                # ListObjectsV2 is authorised on the bucket, narrowed to the prefixes it lists.
                (
                    "ListTheTrail",
                    ["s3:ListBucket"],
                    [bucket.bucket_arn],
                    {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in prefixes]}},
                ),
                # ListObjectVersions (ListBucketVersions) likewise, for the trail's prefixes.
                (
                    "ListTheTrailsVersions",
                    ["s3:ListBucketVersions"],
                    [bucket.bucket_arn],
                    {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in trail]}},
                ),
                ("ReadTheTrail", ["s3:GetObject"], objects, None),
                # SSE-KMS with a bucket key: reading decrypts the bucket key's data key in the
                # reader's name, with the bucket's ARN as encryption context; decrypt only, and not
                # for the reports bucket under the same key.
                (
                    "AuditKeyThroughS3",
                    ["kms:Decrypt"],
                    [bucket_key.key_arn],
                    {
                        "StringEquals": {
                            "kms:ViaService": f"s3.{region}.amazonaws.com",
                            "kms:EncryptionContext:aws:s3:arn": bucket.bucket_arn,
                        }
                    },
                ),
                (
                    "VerifyCheckpoints",
                    ["kms:Verify"],
                    [key.key_arn for key in signing_keys],
                    {"StringEquals": {"kms:SigningAlgorithm": SIGNING_ALGORITHM}},
                ),
            )
        )
        for resource in objects:
            acknowledge(
                self.function.role,
                wildcard_resource_finding(self, resource),
                "Audit objects, checkpoints and archive objects are named at write time by "
                "writer, date and sequence number, so a replay of a period cannot name them in "
                "advance; GetObject only, one prefix per writer and kind, nothing that writes.",
            )
