"""The composition root: the only place where adapters are chosen and wired to the logic."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fabric import topology
from fabric.adapters.emf import EmfMetrics
from fabric.adapters.esdk import EsdkCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.secrets import SecretCredentials
from fabric.adapters.sns import SnsFallbackTransport
from fabric.adapters.sqs_audit import SqsAuditTransport
from fabric.audit_sink import TransportAuditSink
from fabric.breaker import BreakerTransport
from fabric.ports import DeadLetterQueue, MessageKind, Metrics, OutboundMessage, Transport
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.settings import (
    AuditWriterSettings,
    DrainSettings,
    RedriveSettings,
    ReplaySettings,
    RouterSettings,
)
from fabric.stakeholders import Stakeholder

if TYPE_CHECKING:  # imported where built: the router's cold start needs none of them
    from fabric.audit_writer import AuditWriter
    from fabric.drain import Drainer
    from fabric.redrive import Redriver
    from fabric.replay import Replayer


@dataclass(frozen=True)
class RouterRuntime:
    """What the router handler needs: the router and the settings of its entry points."""

    router: Router
    settings: RouterSettings


def exchange_for(message: OutboundMessage) -> str:
    """The RabbitMQ exchange of a message: audit batches to the audit exchange, letters going
    back to a work queue (``redeliver_to``: the drain, the redrive) to the redeliver exchange,
    unroutable messages to the unrouted exchange, every other message to the ingress exchange,
    whose bindings (generated from the routing table) take emergencies to the emergency
    exchange (which no user but the administrator may write) and everything else to the group
    queues."""
    if message.kind is MessageKind.AUDIT:
        return topology.AUDIT_EXCHANGE
    if message.redeliver_to is not None:
        return topology.REDELIVER_EXCHANGE
    if not message.audience:
        # Nothing in the table routes it. Straight to the unrouted queue: through the ingress
        # exchange a topic that matches a header route's pattern but not its headers would
        # reach no queue at all.
        return topology.UNROUTED_EXCHANGE
    return topology.INGRESS_EXCHANGE


def build_router_runtime(
    settings: RouterSettings,
    *,
    client_factory: Callable[[str], Any] | None = None,
    metrics: Metrics | None = None,
) -> RouterRuntime:
    """Wire the router from settings. Nothing touches the network until the first message.

    ``client_factory(service_name)`` builds boto3 clients (default: ``boto3.client``, imported
    lazily so that cold starts do not pay for boto3 before it is needed). ``metrics`` defaults
    to CloudWatch EMF lines on stdout.
    """
    make_client = client_factory or _boto3_client
    rabbit = _rabbit(settings, make_client)
    fallback = SnsFallbackTransport(
        fallback_topic_arn=settings.fallback_topic_arn,
        emergency_topic_arn=settings.emergency_topic_arn,
        client_factory=lambda: make_client("sns"),
    )
    # The breaker stops a dead broker from costing its timeout on every call, for messages and
    # audit batches alike (an audit batch sent around it would hold every reply during an outage
    # for two connect timeouts); what RabbitMQ does not store goes to SNS/SQS.
    broker = BreakerTransport(rabbit)
    router = Router(
        table=default_routing_table(),
        transports=[broker, fallback],
        cipher=EsdkCipher(settings.messages_key_arn, client_factory=lambda: make_client("kms")),
        audit=_audit_sink(settings, broker, make_client, emitted_by="router"),
        environment=settings.environment,
        metrics=metrics or EmfMetrics(environment=settings.environment, emitted_by="router"),
    )
    return RouterRuntime(router=router, settings=settings)


# Objects allocated, less those freed, between young collections once a function has settled
# (see settle_after_init); CPython's default is 700.
_YOUNG_GENERATION_THRESHOLD = 20_000

# The drain, the redrive and the replay have no fallback: they wait out a broker stall (a quorum
# WAL roll-over, a GC) that the router, which has a fallback and a latency goal, hands to
# SNS/SQS after RabbitSettings' 0.5 s. A confirm timeout past that stops a redrive or replay run,
# to be done again; the drain leaves the one work queue that timed out for the run, and stops
# at a second (fabric.drain: a stall of the node's queue storage times out every queue).
_TOOL_CONFIRM_TIMEOUT = 5.0
# How long one router publish call may wait on the broker from its first publish (the router's
# own time preparing messages inside it not counted): a broker that confirms slowly but steadily
# never lets the confirm timeout pass, and held a 500-message call for 500 confirms, past the
# function's 30 s timeout. With a connect timeout (2 s and the transport's 0.5 s margin) before
# it, the broker's stage of a call stays within the 5 s docs/router.md adds up; a healthy broker
# confirms 500 messages in tens of milliseconds. What is unconfirmed by then goes to SNS/SQS.
# The tools have no budget: without a fallback, a bound would stop a run while the broker still
# stores, and their batches are small (10 or 100 messages) in runs that end before their
# function's timeout: the drain's and the redrive's a minute before it, the replay's two.
_ROUTER_PUBLISH_BUDGET = 2.5


def _rabbit(
    settings: RouterSettings | DrainSettings | RedriveSettings | ReplaySettings,
    make_client: Callable[[str], Any],
    *,
    republish_lost: bool = True,
) -> RabbitMqTransport:
    router = isinstance(settings, RouterSettings)
    return RabbitMqTransport(
        RabbitSettings(
            host=settings.rabbitmq_host,
            port=settings.rabbitmq_port,
            credentials=SecretCredentials(
                settings.rabbitmq_secret_arn, lambda: make_client("secretsmanager")
            ),
            vhost=settings.rabbitmq_vhost,
            use_tls=settings.rabbitmq_tls,
            confirm_timeout=RabbitSettings.confirm_timeout if router else _TOOL_CONFIRM_TIMEOUT,
            publish_budget=_ROUTER_PUBLISH_BUDGET if router else None,
            republish_lost=republish_lost,
        ),
        exchange_for=exchange_for,
    )


def _audit_sink(
    settings: RouterSettings | DrainSettings | RedriveSettings | ReplaySettings,
    broker: Transport,
    make_client: Callable[[str], Any],
    *,
    emitted_by: str,
) -> TransportAuditSink:
    """Audit batches to RabbitMQ's audit exchange, or, when it cannot take them, to the SQS
    audit queue (the audit writer reads both and deduplicates by batch id)."""
    transports: list[Transport] = [broker]
    if settings.audit_queue_url is not None:
        transports.append(SqsAuditTransport(settings.audit_queue_url, lambda: make_client("sqs")))
    return TransportAuditSink(transports, emitted_by=emitted_by)


def build_drainer(
    settings: DrainSettings,
    *,
    client_factory: Callable[[str], Any] | None = None,
    metrics: Metrics | None = None,
) -> Drainer:
    """Wire the drain from settings. Nothing touches the network until it runs."""
    from fabric.adapters.sqs import SqsFallbackSource
    from fabric.drain import FALLBACK_MAX_RECEIVES, Drainer, FallbackQueue
    from fabric.naming import subscription_dead_letter_queue_name

    make_client = client_factory or _boto3_client
    rabbit = _rabbit(settings, make_client)
    # Audit batches through a breaker, as the router's: after a batch that the broker's audit
    # queue did not confirm (or the broker did not take), the next ones go straight to the SQS
    # audit queue for as long as a run may last (then one tries the broker again). Each waited
    # out the 5 s confirm timeout again: about two messages a second for the whole run while the
    # work queues were healthy. The batch that timed out is in doubt and goes to SQS too, under
    # its batch id, which the audit writer deduplicates on. The breaker sees the audit batches
    # only: the drain tells a refusing work queue from a broker that takes nothing by itself.
    audit_path = BreakerTransport(rabbit, open_seconds=settings.max_seconds)
    return Drainer(
        queues=[
            FallbackQueue(
                url=url,
                group=Stakeholder(group),
                emergency=emergency,
                # A subscription's DLQ has no redrive policy: SQS never moves its messages on.
                max_receives=(
                    None
                    if url.endswith(subscription_dead_letter_queue_name(""))
                    else FALLBACK_MAX_RECEIVES
                ),
            )
            for url, group, emergency in settings.queues
        ],
        source=SqsFallbackSource(lambda: make_client("sqs")),
        broker=rabbit,
        audit=_audit_sink(settings, audit_path, make_client, emitted_by="drain"),
        metrics=metrics or EmfMetrics(environment=settings.environment, emitted_by="drain"),
        max_messages=settings.max_messages,
        max_seconds=settings.max_seconds,
        connect=rabbit.connect,
    )


@dataclass(frozen=True)
class RedriveRuntime:
    """The redrive function's parts: the redriver, and the dead-letter queues it may drain."""

    redriver: Redriver
    settings: RedriveSettings
    open_queue: Callable[[str, str], DeadLetterQueue]

    def queue(self, source: str, name: str) -> DeadLetterQueue:
        """The dead-letter queue ``name`` of ``source`` ("rabbitmq" or "sqs"); on RabbitMQ also
        the overflow queue, whose letters go back to the terminal queues they came from.

        Raises:
            ValueError: no such dead-letter queue in this environment.
        """
        return self.open_queue(source, name)


def build_redrive(
    settings: RedriveSettings, *, client_factory: Callable[[str], Any] | None = None
) -> RedriveRuntime:
    """Wire the redrive from settings. Nothing touches the network until it runs."""
    from fabric.adapters.dynamodb_ledger import DynamoDbRedriveLedger
    from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
    from fabric.adapters.rabbitmq_overflow import RabbitMqOverflowQueue
    from fabric.adapters.sqs_dlq import SqsDeadLetterQueue
    from fabric.redrive import Redriver

    make_client = client_factory or _boto3_client
    # The SQS dead-letter queues' own client: a send made once (see _redrive_sqs_client).
    dead_letter_client = (lambda: make_client("sqs")) if client_factory else _redrive_sqs_client
    rabbit = _rabbit(settings, make_client)
    sqs_queues = {q.name: q for q in settings.sqs_dead_letter_queues}

    def open_queue(source: str, name: str) -> DeadLetterQueue:
        if source == "rabbitmq" and name == topology.OVERFLOW_QUEUE:
            # Back to each letter's terminal queue, on a channel of the run's own connection.
            return RabbitMqOverflowQueue(rabbit.settings)
        if source == "rabbitmq":
            # Its own publisher per run: the source's channel and the origin's confirms apart.
            # It publishes nothing again after a lost connection, which is the run's own, fresh
            # one (not a warm one gone stale): what was unconfirmed is in doubt, not moved, and
            # the run stops "origin unavailable", the letters left in the DLQ for the next run.
            # Published again at once, a letter the broker had stored went back twice, counted
            # moved under one "redriven" record.
            origin = _rabbit(settings, make_client, republish_lost=False)
            return RabbitMqDeadLetterQueue(rabbit.settings, name, origin=origin)
        # The source queue's name or its DLQ's name, as operators see either.
        queue = sqs_queues.get(name.removesuffix("-dlq"))
        if queue is None:
            raise ValueError(f"{name!r} is not a redrivable SQS queue of this environment")
        return SqsDeadLetterQueue(queue, dead_letter_client)

    return RedriveRuntime(
        redriver=Redriver(
            ledger=DynamoDbRedriveLedger(
                settings.idempotency_table, lambda: make_client("dynamodb")
            ),
            audit=_audit_sink(settings, rabbit, make_client, emitted_by="redrive"),
        ),
        settings=settings,
        open_queue=open_queue,
    )


def redrive_from_environment(environ: Mapping[str, str] | None = None) -> RedriveRuntime:
    """The redrive of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing or malformed (the message names it).
    """
    return build_redrive(RedriveSettings.from_env(os.environ if environ is None else environ))


def build_audit_writer(
    settings: AuditWriterSettings, *, client_factory: Callable[[str], Any] | None = None
) -> AuditWriter:
    """Wire the audit writer from settings. Nothing touches the network until it writes."""
    from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
    from fabric.adapters.kms_signer import KmsSigner
    from fabric.audit_writer import AuditWriter

    make_client = client_factory or _writer_client
    return AuditWriter(
        settings.writer,
        chains=DynamoDbChainStore(settings.table, lambda: make_client("dynamodb")),
        objects=S3ObjectStore(settings.bucket, lambda: make_client("s3")),
        signer=KmsSigner(settings.signing_key_arn, lambda: make_client("kms")),
    )


def audit_writer_from_environment(environ: Mapping[str, str] | None = None) -> AuditWriter:
    """The audit writer of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing (the message names it).
    """
    return build_audit_writer(
        AuditWriterSettings.from_env(os.environ if environ is None else environ)
    )


# -- replay ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayRuntime:
    """The replay function's parts: the replayer and its settings."""

    replayer: Replayer
    settings: ReplaySettings


def build_replay(
    settings: ReplaySettings, *, client_factory: Callable[[str], Any] | None = None
) -> ReplayRuntime:
    """Wire the replay from settings. Nothing touches the network until it runs.

    RabbitMQ only (no fallback transport): see ``fabric.replay``. The audit bucket is read
    only, and its checkpoints are verified with KMS; audit batches go to RabbitMQ's audit
    exchange or the SQS audit queue.
    """
    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.adapters.kms_signer import kms_keyring
    from fabric.replay import Replayer

    make_client = client_factory or _boto3_client
    read_client = client_factory or _reader_client
    rabbit = _rabbit(settings, make_client)
    return ReplayRuntime(
        replayer=Replayer(
            archive=S3ObjectStore(settings.bucket, lambda: read_client("s3")),
            writers=settings.writers,
            # Only Verify is used: the replay checks checkpoints, it never signs one.
            keys=kms_keyring(settings.signing_key_arns, lambda: read_client("kms")),
            broker=rabbit,
            audit=_audit_sink(settings, rabbit, make_client, emitted_by="replay"),
            table=default_routing_table(),
        ),
        settings=settings,
    )


def replay_from_environment(environ: Mapping[str, str] | None = None) -> ReplayRuntime:
    """The replay of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing or malformed (the message names it).
    """
    return build_replay(ReplaySettings.from_env(os.environ if environ is None else environ))


def _writer_client(service_name: str) -> Any:
    # For the audit writer: not on a message's path either, and its archive puts carry megabytes.
    # With the router's one- and two-second bounds, a slow put failed the event (no loss: the
    # write-ahead intent recovers it) and sent the batches round again.
    return _aws_client(
        service_name,
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 5, "mode": "standard"},
    )


def _reader_client(service_name: str) -> Any:
    from fabric.compliance_run import READ_WORKERS

    # For the replay and the compliance report. Reading the trail is not on a message's path:
    # an object may take longer than the router's two seconds to arrive, and the SDK's retries
    # are worth their time here, within bounds: one call that never answers gives up after
    # about 30 s (three attempts of a 10 s read; before, 181 s, past the 120 s margin the
    # replay and the report keep before their function's timeout). The trail is read READ_WORKERS
    # objects at a time (fabric.compliance_run.read_objects): one pooled connection each.
    return _aws_client(
        service_name,
        max_pool_connections=READ_WORKERS + 4,
        connect_timeout=5,
        read_timeout=10,
        retries={"total_max_attempts": 3, "mode": "standard"},
    )


def drainer_from_environment(environ: Mapping[str, str] | None = None) -> Drainer:
    """The drain of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing or malformed (the message names it).
    """
    return build_drainer(DrainSettings.from_env(os.environ if environ is None else environ))


def settle_after_init() -> None:
    """Set the cyclic garbage collector up for invocations: call once, at the end of init.

    The router makes tens of objects a message that live until its call returns and are then
    freed by reference counting, never by the collector (a call leaves no cycles). At CPython's
    young threshold of 700, a 500-message call ran five or six young collections, every second
    call a middle one and every twentieth a full one, and they freed nothing: 5 to 15 µs of CPU
    a message in ``router_vs_raw_publish``. At 20,000 a call runs about one young collection in
    ten, and cycles, should any appear, are still collected. ``gc.freeze`` first takes what init
    built (about 25,000 objects at the router's: the modules, pika, the routing table) out of
    every later collection, since it lives as long as the process. What loads on first use (the
    Encryption SDK, the AWS clients) is not frozen and is walked by the rare full collection.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_GENERATION_THRESHOLD, older, oldest)


@contextlib.contextmanager
def collector_kept() -> Iterator[None]:
    """The collector's settings as they were before the block, whatever ``settle_after_init``
    did in it: for processes that build a function's runtime but are not that function (the
    tests, the benchmarks)."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def router_runtime(environ: Mapping[str, str] | None = None) -> RouterRuntime:
    """The router of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing or malformed (the message names it).
    """
    return build_router_runtime(RouterSettings.from_env(os.environ if environ is None else environ))


def _boto3_client(service_name: str) -> Any:
    # Bounded, so a failing AWS endpoint is noticed in about a second, not after the SDK's
    # default minute of retries: the router must answer an emergency within a second.
    return _aws_client(
        service_name,
        connect_timeout=1,
        read_timeout=2,
        retries={"total_max_attempts": 2, "mode": "standard"},  # "max_attempts" counts retries
    )


def _redrive_sqs_client() -> Any:
    # For the redrive's SQS dead-letter queues (fabric.adapters.sqs_dlq). With the router's
    # client, a SendMessageBatch that SQS stored but answered after its 2 s was made again by
    # the SDK: every letter went back to its source twice under one record, and when both
    # answers came late the letters were stored twice yet reported not moved (no record, no
    # ledger entry), and the next run sent a third copy. A send is not idempotent, so it is made
    # once: the adapter itself sends again only the entries SQS lists as failed, which SQS did
    # not store. The redrive is not latency-bound, so SQS has 5 s to answer (tens of
    # milliseconds when healthy). The first send in doubt (not answered, or answered with an
    # error of SQS's own) ends the run's batch (SqsDeadLetterQueue.move sends nothing more, and
    # the run stops "origin unavailable"), and no send starts after the run's time limit (an SQS
    # answering each send slowly, within the 5 s: the letters not sent stay in the DLQ, and the
    # run stops "time limit"). Before, a batch of 100 letters (up to 100 sends, 256 KiB a send)
    # went on after a send not answered: 6 s more a send, past the function's timeout, and each
    # one more that SQS may have stored without a record. That one send is the only one in
    # doubt: not moved, its letters stay in the DLQ, and if SQS did store them, the next run
    # puts them back a second time (same message id): a duplicate, never a loss. Receives,
    # deletes and visibility changes keep the SDK's retries (3 attempts, up to 18 s when SQS
    # does not answer): one made again hides, deletes or shows letters the lost answer did
    # already. The first batch of deletes or visibility changes SQS does not answer (a timeout,
    # no connection, the connection dropped) ends its call; after an error SQS answered with,
    # the next batch is still made. Letters moved but not deleted stop the run "dead-letter
    # queue unavailable" (the ledger knows them: the next run only removes them); held letters
    # not shown again come back after their hold, counted in the report's "hidden" (the
    # runbook exits 1 and says to go on after 16 minutes). So an SQS
    # that stops answering at the run's time limit costs it a send in doubt (6 s) and at most
    # three calls of 18 s (deletes, the next receive, visibility changes): within the 60 s it
    # keeps before its function's timeout (REDRIVE_MAX_SECONDS 840 of 900). One that answers
    # every call slowly no longer does: the dead-letter queue begins no call it does not expect
    # to end within the run's time, keeping time to delete or show again what it holds
    # (SqsDeadLetterQueue.limit_time; docs/dead-letters.md).
    timeouts: dict[str, Any] = {"connect_timeout": 1, "read_timeout": 5}
    return _SendsOnce(
        sends=_aws_client("sqs", **timeouts, retries={"total_max_attempts": 1, "mode": "standard"}),
        rest=_aws_client("sqs", **timeouts, retries={"total_max_attempts": 3, "mode": "standard"}),
    )


class _SendsOnce:
    """An SQS client that makes ``send_message_batch`` with ``sends`` (no SDK retries) and every
    other call with ``rest``."""

    def __init__(self, *, sends: Any, rest: Any) -> None:
        self._sends = sends
        self._rest = rest

    def send_message_batch(self, **kwargs: Any) -> Any:
        return self._sends.send_message_batch(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)


def _aws_client(service_name: str, **config: Any) -> Any:
    """A boto3 client with this botocore ``Config``; boto3 is imported on first use."""
    import boto3
    from botocore.config import Config

    return boto3.client(service_name, config=Config(**config))


# -- compliance report -------------------------------------------------------------------------

if TYPE_CHECKING:
    from fabric.compliance_run import ComplianceReporter
    from fabric.settings import ComplianceReportSettings


def build_compliance_reporter(
    settings: ComplianceReportSettings,
    *,
    client_factory: Callable[[str], Any] | None = None,
    metrics: Metrics | None = None,
) -> ComplianceReporter:
    """Wire the compliance report from settings. Nothing touches the network until it runs.

    ``client_factory`` defaults to boto3 clients sized for reading many objects in parallel.
    """
    from fabric.adapters.compliance_storage import S3ReportStore, S3TrailStore, SnsSummaryTopic
    from fabric.adapters.kms_signer import kms_keyring
    from fabric.compliance_run import ComplianceReporter

    make_client = client_factory or _reader_client
    return ComplianceReporter(
        environment=settings.environment,
        writers=settings.writers,
        trail=S3TrailStore(settings.audit_bucket, lambda: make_client("s3")),
        # Only Verify is used: the report checks checkpoints, it never signs one.
        keys=kms_keyring(settings.signing_key_arns, lambda: make_client("kms")),
        reports=S3ReportStore(
            settings.reports_bucket, settings.reports_key_arn, lambda: make_client("s3")
        ),
        topic=SnsSummaryTopic(settings.topic_arn, lambda: make_client("sns")),
        metrics=metrics or EmfMetrics(environment=settings.environment, emitted_by="compliance"),
    )


def compliance_reporter_from_environment(
    environ: Mapping[str, str] | None = None,
) -> ComplianceReporter:
    """The compliance report of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing (the message names it).
    """
    from fabric.settings import ComplianceReportSettings

    return build_compliance_reporter(
        ComplianceReportSettings.from_env(os.environ if environ is None else environ)
    )


# -- broker metrics ----------------------------------------------------------------------------

if TYPE_CHECKING:
    from fabric.broker_depth import BrokerDepthMonitor, DepthMetrics
    from fabric.settings import BrokerMetricsSettings


def build_broker_metrics(
    settings: BrokerMetricsSettings,
    *,
    client_factory: Callable[[str], Any] | None = None,
    metrics: DepthMetrics | None = None,
) -> BrokerDepthMonitor:
    """Wire the broker depth measurement from settings. Nothing touches the network until it
    runs: then one management API call as the monitor user, whose secret is read on first use.

    ``metrics`` defaults to EMF lines on stdout.
    """
    from fabric.adapters.broker_metrics import EmfDepthMetrics, SecretQueueLister
    from fabric.broker_depth import BrokerDepthMonitor

    make_client = client_factory or _boto3_client
    credentials = SecretCredentials(
        settings.monitor_secret_arn, lambda: make_client("secretsmanager")
    )
    return BrokerDepthMonitor(
        api=SecretQueueLister(settings.management_url, credentials, credentials.forget),
        metrics=metrics or EmfDepthMetrics(environment=settings.environment),
        vhost=settings.vhost,
        queues=settings.queues,
    )


def broker_metrics_from_environment(
    environ: Mapping[str, str] | None = None,
) -> BrokerDepthMonitor:
    """The broker depth measurement of this process, from its environment variables.

    Raises:
        ConfigError: a variable is missing or malformed (the message names it).
    """
    from fabric.settings import BrokerMetricsSettings

    return build_broker_metrics(
        BrokerMetricsSettings.from_env(os.environ if environ is None else environ)
    )
