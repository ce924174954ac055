"""Function settings from environment variables: a malformed value is a ConfigError that names
the variable, never a silently different configuration."""

from __future__ import annotations

import pytest

from fabric.errors import ConfigError
from fabric.settings import (
    AuditWriterSettings,
    ComplianceReportSettings,
    DrainSettings,
    RouterSettings,
)

BROKER = {
    "FABRIC_ENV": "test",
    "RABBITMQ_HOST": "broker.internal",
    "RABBITMQ_PORT": "5671",
    "RABBITMQ_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:111111111111:secret:x",
}
PREFIX = "https://sqs.ap-southeast-3.amazonaws.com/111111111111/"
WRITER = {
    "FABRIC_ENV": "test",
    "AUDIT_BUCKET": "fabric-test-audit",
    "IDEMPOTENCY_TABLE": "fabric-test-idempotency",
    "SIGNING_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/k",
    "AUDIT_WRITER_NAME": "fabric-test-audit-writer",
}


def drain(**extra: str) -> DrainSettings:
    return DrainSettings.from_env({**BROKER, "SQS_URL_PREFIX": PREFIX, **extra})


def test_the_drain_empties_every_fallback_queue_and_subscription_dlq_of_its_environment() -> None:
    queues = drain().queues
    # Two flows, five groups, each queue and its subscription's DLQ.
    assert len(queues) == len(set(queues)) == 20
    assert queues[:2] == (
        (f"{PREFIX}fabric-test-emergency-government", "government", True),
        (f"{PREFIX}fabric-test-emergency-government-sub-dlq", "government", True),
    )
    assert (f"{PREFIX}fabric-test-fallback-media-sub-dlq", "media", False) in queues
    # The flow decides the work queue: an emergency queue is never drained as routine traffic.
    assert all(("-emergency-" in url) == emergency for url, _, emergency in queues)
    assert all(f"-{group}" in url for url, group, _ in queues)
    assert drain().rabbitmq_port == 5671


@pytest.mark.parametrize(
    "prefix",
    [
        "https://sqs.ap-southeast-3.amazonaws.com/111111111111",  # every name would run on
        "https://sqs.ap-southeast-3.amazonaws.com/",  # no account
        "sqs.ap-southeast-3.amazonaws.com/111111111111/",
        "http://sqs.ap-southeast-3.amazonaws.com/111111111111/",
        "https://sqs.ap-southeast-3.amazonaws.com/111111111111/fabric-test-",
        "",
    ],
)
def test_an_sqs_url_prefix_that_makes_no_queue_url_is_refused_naming_the_variable(
    prefix: str,
) -> None:
    with pytest.raises(ConfigError, match="SQS_URL_PREFIX"):
        drain(SQS_URL_PREFIX=prefix)


@pytest.mark.parametrize("port", ["5671²", "0", "65536", "56 71", ""])
def test_a_port_that_is_not_a_tcp_port_is_refused_naming_the_variable(port: str) -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_PORT"):
        drain(RABBITMQ_PORT=port)


def test_the_audit_writer_trusts_the_platform_and_redrive_users_unless_told_otherwise() -> None:
    trusted = AuditWriterSettings.from_env(WRITER).trusted_publishers
    assert trusted == {"fabric-platform", "fabric-redrive"}
    named = AuditWriterSettings.from_env({**WRITER, "AUDIT_TRUSTED_PUBLISHERS": "a, b"})
    assert named.trusted_publishers == {"a", "b"}


@pytest.mark.parametrize("value", ["", " , "])
def test_an_audit_writer_that_would_trust_no_publisher_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="AUDIT_TRUSTED_PUBLISHERS names no user"):
        AuditWriterSettings.from_env({**WRITER, "AUDIT_TRUSTED_PUBLISHERS": value})


REPORT = {
    "FABRIC_ENV": "test",
    "AUDIT_BUCKET": "fabric-test-audit",
    "AUDIT_WRITERS": "fabric-test-audit-writer",
    "SIGNING_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/k3",
    "REPORTS_BUCKET": "fabric-test-reports",
    "REPORTS_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/r",
    "COMPLIANCE_TOPIC_ARN": "arn:aws:sns:ap-southeast-3:111111111111:fabric-test-compliance",
}


def test_the_verifiers_trust_the_retired_signing_keys_then_the_current_one() -> None:
    arn = "arn:aws:kms:ap-southeast-3:111111111111:key/"
    settings = ComplianceReportSettings.from_env(
        {**REPORT, "RETIRED_SIGNING_KEY_ARNS": f"{arn}k1, {arn}k2"}
    )
    assert settings.signing_key_arns == (f"{arn}k1", f"{arn}k2", f"{arn}k3")
    assert ComplianceReportSettings.from_env(REPORT).signing_key_arns == (f"{arn}k3",)


@pytest.mark.parametrize(
    "retired", ["key/k1,key/k1", "arn:aws:kms:ap-southeast-3:111111111111:key/k3"]
)
def test_a_retired_signing_key_named_twice_or_still_current_is_refused(retired: str) -> None:
    with pytest.raises(ConfigError, match="RETIRED_SIGNING_KEY_ARNS"):
        ComplianceReportSettings.from_env({**REPORT, "RETIRED_SIGNING_KEY_ARNS": retired})


def test_the_audit_writer_waits_for_megabyte_archive_puts_longer_than_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the router's two-second read bound a slow archive put failed the event and sent its
    # batches round again; the writer is not on a message's path and may wait.
    from fabric.bootstrap import audit_writer_from_environment

    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-3")
    writer = audit_writer_from_environment(WRITER)
    config = writer._objects._s3().meta.config  # type: ignore[attr-defined]
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    assert config.retries["total_max_attempts"] == 6  # botocore: the first try and 5 retries


ROUTER = {
    **BROKER,
    "MESSAGES_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/m",
    "FABRIC_INGEST_QUEUE_PREFIX": "fabric-test-ingest-",
    "FALLBACK_TOPIC_ARN": "arn:aws:sns:ap-southeast-3:111111111111:fabric-test-fallback",
    "EMERGENCY_TOPIC_ARN": "arn:aws:sns:ap-southeast-3:111111111111:fabric-test-emergency",
}


def test_the_routers_optional_variables_take_the_defaults_docs_router_md_lists() -> None:
    settings = RouterSettings.from_env(ROUTER)
    assert settings.rabbitmq_tls is True
    assert settings.rabbitmq_vhost == "/"
    assert settings.identity_claim == "fabric:group"
    assert settings.audit_queue_url is None  # the stack sets it; local tools may not


@pytest.mark.parametrize("name", sorted(ROUTER))
def test_a_missing_router_variable_stops_the_cold_start_naming_it(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        RouterSettings.from_env({k: v for k, v in ROUTER.items() if k != name})
