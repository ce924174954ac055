"""The router function and its three entry points: aliases, the HTTPS API, SQS ingest."""

from __future__ import annotations

from typing import Any

import jsii
from aws_cdk import Duration, Names, Stack
from aws_cdk import aws_apigateway as apigw_v1
from aws_cdk import aws_apigatewayv2 as apigw
from aws_cdk import aws_apigatewayv2_authorizers as authorizers
from aws_cdk import aws_apigatewayv2_integrations as integrations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric.protection import CLASSIFICATION_KEY, ENVIRONMENT_KEY, SOURCE_KEY
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from stacks.config import ApiConfig, RouterConfig
from stacks.constructs.audit_queue import audit_environment
from stacks.constructs.function import FabricFunction, FunctionPlatform, router_role_name
from stacks.constructs.queues import QueueAddress, address

AMQPS_PORT = "5671"
# The one RabbitMQ virtual host the topology is applied to and every function connects to.
VIRTUAL_HOST = "/"
ROUTER_TIMEOUT = Duration.seconds(30)
# What Lambda's SQS poller does on an ingest queue as the router's role (the same actions as
# CDK's grant_consume_messages, without its unconditioned kms:Decrypt: the queues key is usable
# through SQS only, OwnDeadLetterQueueKey).
_CONSUME = [
    "sqs:ReceiveMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueUrl",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
]


def restricted_payload_context(env_name: str) -> dict[str, Any]:
    """Conditions that admit a data key of the messages key only for a restricted payload of
    this environment: the context KMS sees is exactly ``fabric:source``,
    ``fabric:classification`` (``restricted``) and ``fabric:environment`` (``env_name``).

    ``fabric:message_id`` is also in the payload's context, but the Encryption SDK adapter
    keeps it out of what KMS sees (``fabric.adapters.esdk``); the suite is unsigned, so the SDK
    adds no ``aws-crypto-public-key``. ``ForAllValues`` alone would admit an empty context, so
    each of the three keys is also required.
    """
    return {
        "StringEquals": {
            f"kms:EncryptionContext:{CLASSIFICATION_KEY}": "restricted",
            f"kms:EncryptionContext:{ENVIRONMENT_KEY}": env_name,
        },
        "Null": {f"kms:EncryptionContext:{SOURCE_KEY}": "false"},
        "ForAllValues:StringEquals": {
            "kms:EncryptionContextKeys": [SOURCE_KEY, CLASSIFICATION_KEY, ENVIRONMENT_KEY]
        },
    }


def broker_environment(
    env_name: str, broker_host: str, broker_secret: secretsmanager.ISecret
) -> dict[str, str]:
    """How a fabric function reaches the broker: AMQPS, as the user whose secret it may read."""
    return {
        "FABRIC_ENV": env_name,
        "RABBITMQ_HOST": broker_host,
        "RABBITMQ_PORT": AMQPS_PORT,
        "RABBITMQ_TLS": "true",
        "RABBITMQ_VHOST": VIRTUAL_HOST,
        "RABBITMQ_SECRET_ARN": broker_secret.secret_arn,
    }


class Router(Construct):
    """The router Lambda (``lambdas/router``), reachable three ways, each naming the caller.

    - **Direct invoke** through the alias of a stakeholder group (``<function>:<group>``); only
      the IAM roles configured as that group's producers may invoke it.
    - **HTTPS**: ``POST /v1/messages`` on an HTTP API with a JWT authorizer; the group is a claim
      of the verified token.
    - **SQS**: one event source per group's ingest queue, with partial batch failures, each
      running at most ``config.ingest_max_concurrency`` invocations at once.

    Its audit batches go to RabbitMQ's audit exchange, or to the SQS audit queue
    (``audit_queue``, ``AUDIT_QUEUE_URL``) while the broker cannot take them.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        config: RouterConfig,
        api: ApiConfig,
        producers: dict[str, tuple[str, ...]],
        broker_host: str,
        broker_secret: secretsmanager.ISecret,
        secrets_key: kms.IKey,
        messages_key: kms.IKey,
        ingest_queues: dict[Stakeholder, sqs.IQueue],
        fallback_topics: dict[str, sns.ITopic],
        topics_key: kms.IKey,
        ingest_prefix: str,
        audit_queue: QueueAddress,
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = FabricFunction(
            self,
            "Router",
            platform=platform,
            code_dir="lambdas/router",
            description=f"Messaging Fabric {env_name}: validates, protects and routes messages",
            environment={
                **broker_environment(env_name, broker_host, broker_secret),
                "MESSAGES_KEY_ARN": messages_key.key_arn,
                "FABRIC_IDENTITY_CLAIM": api.identity_claim,
                "FABRIC_INGEST_QUEUE_PREFIX": ingest_prefix,
                "FALLBACK_TOPIC_ARN": fallback_topics["fallback"].topic_arn,
                "EMERGENCY_TOPIC_ARN": fallback_topics["emergency"].topic_arn,
                **audit_environment(audit_queue),
            },
            reserved_concurrency=config.reserved_concurrency,
            timeout=ROUTER_TIMEOUT,
            memory_size=config.memory_mb,
            # Named: the audit queue's policy admits it as a sender by this name.
            role_name=router_role_name(env_name),
        )
        function = self.function.function
        self.function.allow_secret_read(broker_secret, secrets_key)
        self.function.allow_send(audit_queue, sid="AuditBatches")
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="MessagesKeyForRestrictedPayloads",
                actions=["kms:GenerateDataKey"],
                resources=[messages_key.key_arn],
                conditions=restricted_payload_context(env_name),
            )
        )
        # Publishing to a topic encrypted with a customer key needs that key; named actions
        # rather than grant_publish's GenerateDataKey* wildcard, through SNS and for these two
        # topics only (SNS's encryption context names the topic).
        topic_arns = [topic.topic_arn for topic in fallback_topics.values()]
        function.add_to_role_policy(
            iam.PolicyStatement(actions=["sns:Publish"], resources=topic_arns)
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="TopicsKeyThroughSns",
                actions=["kms:GenerateDataKey", "kms:Decrypt"],
                resources=[topics_key.key_arn],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": f"sns.{Stack.of(self).region}.amazonaws.com",
                        "kms:EncryptionContext:aws:sns:topicArn": topic_arns,
                    }
                },
            )
        )

        version = function.current_version
        self.aliases: dict[Stakeholder, lambda_.Alias] = {}
        for group in STAKEHOLDERS:
            alias = lambda_.Alias(
                self, f"{group.value.capitalize()}Alias", alias_name=group.value, version=version
            )
            self.aliases[group] = alias
            # In the alias's resource policy, for a producer of this account or another alike:
            # grant_invoke on an imported role of this account would write a policy onto that
            # role, which belongs to the producer's team, not to this stack.
            for index, role_arn in enumerate(producers.get(group.value, ())):
                alias.add_permission(
                    f"Producer{index}",
                    principal=iam.ArnPrincipal(role_arn),
                    action="lambda:InvokeFunction",
                )

        # Mappings rather than SqsEventSource, whose grant_consume_messages adds kms:Decrypt on
        # the queues key without a condition. The same construct ids and properties as
        # SqsEventSource's, so a deployed mapping is kept, not replaced (Lambda refuses a second
        # mapping of one queue to one function). The grant names the queues by their literal-name
        # ARNs.
        self.function.allow(
            [
                (
                    "ConsumeIngest",
                    _CONSUME,
                    [address(self, queue).arn for queue in ingest_queues.values()],
                    None,
                )
            ]
        )
        # Each mapping at most ingest_max_concurrency invocations: together they leave at least
        # half of the reserved concurrency to HTTPS and direct invokes (RouterConfig).
        for queue in ingest_queues.values():
            function.add_event_source_mapping(
                f"SqsEventSource:{Names.node_unique_id(queue.node)}",
                event_source_arn=queue.queue_arn,
                batch_size=10,
                max_batching_window=Duration.seconds(1),
                report_batch_item_failures=True,
                max_concurrency=config.ingest_max_concurrency,
            )

        self.api = self._http_api(env_name, api, function, platform)

    def _http_api(
        self, env_name: str, api: ApiConfig, function: lambda_.IFunction, platform: FunctionPlatform
    ) -> apigw.HttpApi:
        authorizer = authorizers.HttpJwtAuthorizer(
            "Jwt",
            jwt_issuer=api.jwt_issuer,
            jwt_audience=list(api.jwt_audience),
            identity_source=["$request.header.Authorization"],
        )
        http_api = apigw.HttpApi(
            self,
            "Api",
            api_name=f"fabric-{env_name}",
            description=f"Messaging Fabric {env_name}: producers' HTTPS entry point",
            create_default_stage=False,
            disable_execute_api_endpoint=False,
        )
        http_api.add_routes(
            path="/v1/messages",
            methods=[apigw.HttpMethod.POST],
            integration=integrations.HttpLambdaIntegration("Router", function),
            authorizer=authorizer,
        )
        access_logs = logs.LogGroup(
            self,
            "ApiAccessLogs",
            encryption_key=platform.logs_key,
            retention=platform.log_retention,
            removal_policy=platform.removal_policy,
        )
        apigw.HttpStage(
            self,
            "Stage",
            http_api=http_api,
            stage_name="$default",
            auto_deploy=True,
            throttle=apigw.ThrottleSettings(
                rate_limit=api.throttle_rate, burst_limit=api.throttle_burst
            ),
            access_log_settings=_AccessLogs(
                apigw.LogGroupLogDestination(access_logs),
                apigw_v1.AccessLogFormat.custom(
                    '{"requestId":"$context.requestId","ip":"$context.identity.sourceIp",'
                    '"requestTime":"$context.requestTime","routeKey":"$context.routeKey",'
                    '"status":"$context.status","responseLength":"$context.responseLength",'
                    '"integrationStatus":"$context.integrationStatus",'
                    '"principal":"$context.authorizer.claims.sub"}'
                ),
            ),
        )
        return http_api


@jsii.implements(apigw.IAccessLogSettings)
class _AccessLogs:
    """Access-log settings of an HTTP API stage (a jsii interface, so a small class)."""

    def __init__(
        self, destination: apigw.IAccessLogDestination, log_format: apigw_v1.AccessLogFormat
    ) -> None:
        self._destination = destination
        self._format = log_format

    @property
    def destination(self) -> apigw.IAccessLogDestination:
        return self._destination

    @property
    def format(self) -> apigw_v1.AccessLogFormat:
        return self._format
