"""The stateless stack: the fabric's functions, their entry points, the topology resource, the
broker passwords' rotation and the broker's queue-depth metrics."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from aws_cdk import CfnOutput, Environment, Fn, Stack
from constructs import Construct

from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import (
    AUDIT_READER_USER,
    MONITOR_USER,
    OVERFLOW_QUEUE,
    REDRIVE_USER,
    UNROUTED_QUEUE,
    dead_letter_queue_name,
)
from stacks.config import EnvironmentConfig
from stacks.constructs.alarms import (
    DeadLetterAlarms,
    EventSourceQueueAgeAlarms,
    FailoverAlarms,
    FunctionErrorAlarms,
)
from stacks.constructs.audit_writer import AuditWriter, audit_writer_name
from stacks.constructs.broker_metrics import BrokerMetrics
from stacks.constructs.compliance_report import ComplianceReport
from stacks.constructs.drain import Drain
from stacks.constructs.function import FunctionPlatform, build_layers
from stacks.constructs.key_state import KeyStateAlarm
from stacks.constructs.queues import address, physical_name
from stacks.constructs.redrive import DeadLetterPair, Redrive
from stacks.constructs.replay import Replay
from stacks.constructs.rotation import PasswordRotation
from stacks.constructs.router import VIRTUAL_HOST, Router
from stacks.constructs.topology import BrokerTopology
from stacks.stateful_stack import StatefulStack


class ServicesStack(Stack):
    """Functions, APIs and deploy-time custom resources; receives stateful resources as props.

    Deleting and redeploying this stack loses no data: everything that holds messages, keys or
    credentials lives in the stateful stack.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: EnvironmentConfig,
        stateful: StatefulStack,
        topology: dict[str, object],
        router_user: str,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=Environment(account=config.account, region=config.region),
            description=f"Messaging Fabric {config.name}: functions and entry points",
            termination_protection=config.termination_protection,
        )
        platform = FunctionPlatform(
            vpc=stateful.network.vpc,
            subnets=stateful.network.subnets,
            security_group=stateful.network.functions_security_group,
            layers=build_layers(self, config.name),
            logs_key=stateful.keys.logs,
            queues_key=stateful.keys.queues,
            log_retention=stateful.log_retention,
            removal_policy=stateful.removal,
        )
        # Each function carries the one security group for the broker port it uses: AMQPS
        # (platform, the functions' group), the management API, or none.
        network = stateful.network
        admin = replace(platform, security_group=network.broker_admin_security_group)
        no_broker = replace(platform, security_group=network.no_broker_security_group)
        user_secrets = stateful.broker_users.secrets
        # The stateful audit queue by its literal name: no cross-stack output for its URL or ARN.
        audit_queue = address(self, stateful.audit_queue.queue)
        self.topology = BrokerTopology(
            self,
            "Topology",
            env_name=config.name,
            platform=admin,
            management_url=stateful.broker.management_url,
            admin_secret=stateful.broker.admin_secret,
            user_secrets=dict(user_secrets),
            secrets_key=stateful.keys.secrets,
            topology_digest=hashlib.sha256(
                json.dumps(topology, sort_keys=True).encode()
            ).hexdigest(),
        )
        self.router = Router(
            self,
            "Router",
            env_name=config.name,
            platform=platform,
            config=config.router,
            api=config.api,
            producers=config.producers,
            broker_host=stateful.broker.host,
            broker_secret=user_secrets[router_user],
            secrets_key=stateful.keys.secrets,
            messages_key=stateful.keys.messages,
            ingest_queues=dict(stateful.ingest.queues),
            fallback_topics=dict(stateful.fallback.topics),
            topics_key=stateful.keys.topics,
            ingest_prefix=stateful.ingest.prefix,
            audit_queue=audit_queue,
        )
        self.drain = Drain(
            self,
            "Drain",
            env_name=config.name,
            platform=platform,
            broker_host=stateful.broker.host,
            broker_secret=user_secrets[router_user],
            secrets_key=stateful.keys.secrets,
            queues={
                (flow, group.value): queues
                for (flow, group), queues in stateful.fallback.queues.items()
            },
            audit_queue=audit_queue,
        )
        fallback = stateful.fallback.queues.values()
        ingest = stateful.ingest
        self.redrive = Redrive(
            self,
            "Redrive",
            env_name=config.name,
            platform=platform,
            broker_host=stateful.broker.host,
            broker_secret=user_secrets[REDRIVE_USER],
            secrets_key=stateful.keys.secrets,
            pairs=[
                *(DeadLetterPair(q.queue, q.dead_letter_queue) for q in fallback),
                *(
                    DeadLetterPair(ingest.queues[group], ingest.dead_letter_queues[group])
                    for group in STAKEHOLDERS
                ),
                DeadLetterPair(stateful.audit_queue.queue, stateful.audit_queue.dead_letter_queue),
            ],
            queues_key=stateful.keys.queues,
            table=stateful.idempotency.table,
            table_key=stateful.idempotency.key,
            audit_queue=audit_queue,
        )
        self.alarms = FailoverAlarms(
            self,
            "FailoverAlarms",
            env_name=config.name,
            config=config.alarms,
            fallback_queues=[q.queue for q in stateful.fallback.queues.values()],
            topics_key=stateful.keys.topics,
            removal_policy=stateful.removal,
        )
        # Every fabric key, the retired signing keys too (they verify the trail).
        self.key_state = KeyStateAlarm(
            self,
            "KeyState",
            env_name=config.name,
            keys=[*stateful.keys.symmetric_keys.values(), *stateful.keys.signing_keys],
            topic=self.alarms.topic,
        )
        self.rotation = PasswordRotation(
            self,
            "PasswordRotation",
            env_name=config.name,
            platform=admin,
            management_url=stateful.broker.management_url,
            admin_secret=stateful.broker.admin_secret,
            user_secrets=dict(user_secrets),
            secrets_key=stateful.keys.secrets,
            topology=self.topology.resource,
            alarm_topic=self.alarms.topic,
        )
        # The explicit Fn::GetStackOutput below is not a reference CDK tracks: say the order.
        self.add_dependency(stateful, "the audit writer reads the AuditBucketName output")
        self.audit_writer = AuditWriter(
            self,
            "AuditWriter",
            env_name=config.name,
            platform=no_broker,
            broker_arn=stateful.broker.broker_arn,
            broker_secret=user_secrets[AUDIT_READER_USER],
            secrets_key=stateful.keys.secrets,
            audit_queue=audit_queue,
            # By the stateful stack's AuditBucketName output: see AuditWriter.
            bucket_name=stateful.output("AuditBucketName"),
            bucket_key=stateful.keys.audit,
            table=stateful.idempotency.table,
            table_key=stateful.idempotency.key,
            signing_key=stateful.keys.signing,
            alarm_topic=self.alarms.topic,
        )
        # Replay: archived messages of a period back into the fabric (on demand, runbook).
        self.replay = Replay(
            self,
            "Replay",
            env_name=config.name,
            platform=platform,
            broker_host=stateful.broker.host,
            broker_secret=user_secrets[router_user],
            secrets_key=stateful.keys.secrets,
            audit_queue=audit_queue,
            # By the stateful stack's AuditBucketName output, as for the audit writer.
            bucket_name=stateful.output("AuditBucketName"),
            bucket_key=stateful.keys.audit,
            writers=[audit_writer_name(config.name)],
            signing_keys=stateful.keys.signing_keys,
            alarm_topic=self.alarms.topic,
        )
        self.replay.function.function.node.add_dependency(self.topology.resource)
        # The compliance report: daily and on demand, read only on the audit writer's trail.
        self.compliance_report = ComplianceReport(
            self,
            "ComplianceReport",
            env_name=config.name,
            platform=no_broker,
            writers=[audit_writer_name(config.name)],
            audit_bucket_name=stateful.output("AuditBucketName"),
            reports_bucket_name=stateful.output("ReportsBucketName"),
            audit_key=stateful.keys.audit,
            signing_keys=stateful.keys.signing_keys,
            topics_key=stateful.keys.topics,
            alarm_topic=self.alarms.topic,
            removal_policy=stateful.removal,
        )
        # What the broker dead-letter alarms watch, measured every minute through the management
        # API (Amazon MQ has no per-queue metrics for RabbitMQ 4): the same list for both.
        broker_dlqs = [
            dead_letter_queue_name(group, emergency=emergency)
            for emergency in (False, True)
            for group in STAKEHOLDERS
        ]
        broker_overflow_queues = [OVERFLOW_QUEUE]
        broker_unrouted_queues = [UNROUTED_QUEUE]
        self.broker_metrics = BrokerMetrics(
            self,
            "BrokerMetrics",
            env_name=config.name,
            platform=admin,
            management_url=stateful.broker.management_url,
            vhost=VIRTUAL_HOST,
            monitor_secret=user_secrets[MONITOR_USER],
            secrets_key=stateful.keys.secrets,
            queues=[*broker_dlqs, *broker_overflow_queues, *broker_unrouted_queues],
            alarm_topic=self.alarms.topic,
        )
        # The monitor user exists once the topology is applied.
        self.broker_metrics.function.function.node.add_dependency(self.topology.resource)
        functions = (
            self.topology.function,
            self.router.function,
            self.drain.function,
            self.audit_writer.function,
            self.compliance_report.function,
            self.rotation.function,
            self.broker_metrics.function,
        )
        self.dead_letter_alarms = DeadLetterAlarms(
            self,
            "DeadLetterAlarms",
            topic=self.alarms.topic,
            # Stateful queues by their literal names: no cross-stack output per queue.
            fallback_dlqs=[physical_name(q.dead_letter_queue) for q in fallback],
            subscription_dlqs=[physical_name(q.subscription_dead_letter_queue) for q in fallback],
            ingest_dlqs=[physical_name(q) for q in ingest.dead_letter_queues.values()],
            audit_dlqs=[physical_name(stateful.audit_queue.dead_letter_queue)],
            function_dlqs=[
                f.dead_letter_queue.queue_name
                for f in (*functions, self.redrive.function, self.replay.function)
            ],
            env_name=config.name,
            broker_dlqs=broker_dlqs,
            broker_overflow_queues=broker_overflow_queues,
            broker_unrouted_queues=broker_unrouted_queues,
        )
        # Queues that only event source mappings read: a mapping that stops receiving fails
        # nothing else.
        self.queue_age_alarms = EventSourceQueueAgeAlarms(
            self,
            "EventSources",
            topic=self.alarms.topic,
            ingest_queues=[ingest.queues[group] for group in STAKEHOLDERS],
            audit_queue=stateful.audit_queue.queue,
        )
        self.function_errors = FunctionErrorAlarms(
            self,
            "FunctionErrors",
            topic=self.alarms.topic,
            functions={
                "Router": (
                    self.router.function,
                    "The router failed an invocation: a direct invoke got an error, an HTTPS "
                    "request a 5xx, or an SQS ingest batch went back to its queue whole. Read "
                    "the router's logs (docs/runbook.md, 'When a function fails').",
                ),
                "Topology": (
                    self.topology.function,
                    "The topology function failed: a deploy's custom resource or a runbook "
                    "`topology diff|apply` got no answer. Read its logs, then run `topology "
                    "diff` (docs/runbook.md, 'When a function fails').",
                ),
                "Drain": (
                    self.drain.function,
                    "A drain run failed: fallback messages stay in SQS (nothing is lost) until "
                    "a run succeeds; FallbackQueueAge follows if it goes on. Read the drain's "
                    "logs (docs/runbook.md, 'When a function fails').",
                ),
            },
        )
        self.drain.function.function.node.add_dependency(self.topology.resource)
        self.redrive.function.function.node.add_dependency(self.topology.resource)
        # The writer first: a redrive of a new version may publish as a user only the new
        # writer trusts (AUDIT_TRUSTED_PUBLISHERS); a rollback then reverts the redrive first.
        self.redrive.function.function.node.add_dependency(self.audit_writer.function.function)
        # The broker event source reads `fabric.audit` as the audit reader: both exist only
        # once the topology is applied.
        self.audit_writer.function.function.node.add_dependency(self.topology.resource)
        # Messages must not reach a broker whose topology is not applied yet.
        self.router.function.function.node.add_dependency(self.topology.resource)
        # Where producers reach the router (README, docs/infrastructure.md "Outputs").
        CfnOutput(
            self,
            "MessagesApiUrl",
            value=Fn.join("", [self.router.api.api_endpoint, "/v1/messages"]),
        )
        for group, alias in self.router.aliases.items():
            CfnOutput(self, f"{group.value.capitalize()}RouterAliasArn", value=alias.function_arn)
