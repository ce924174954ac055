"""The replay function's entry point: a bad request is refused with a reason, limits come from
config, and a valid request reads the bucket the stack names (moto, in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import boto3
import pytest
from moto import mock_aws

from tests.conftest import load_handler

REGION = "ap-southeast-3"
BUCKET = "fabric-test-audit"
ENVIRONMENT = {
    "FABRIC_ENV": "test",
    "RABBITMQ_HOST": "127.0.0.1",
    "RABBITMQ_PORT": "1",
    "RABBITMQ_TLS": "false",
    "RABBITMQ_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:111111111111:secret:x",
    "AUDIT_BUCKET": BUCKET,
    "AUDIT_WRITERS": "fabric-test-audit-writer",
    "SIGNING_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/unused-by-these-tests",
    "REPLAY_MAX_SECONDS": "120",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": REGION,
}


@pytest.fixture
def replay_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        module = load_handler("replay", monkeypatch)
        yield module


def test_a_malformed_request_is_refused_and_nothing_is_replayed(
    replay_handler: ModuleType,
) -> None:
    answer = replay_handler.handler({"start": "yesterday", "end": "2026-12-02T00:00:00Z"}, None)
    assert answer == {"error": "start: not an RFC 3339 timestamp with timezone: 'yesterday'"}


def test_the_deployed_time_limit_bounds_every_run(replay_handler: ModuleType) -> None:
    assert replay_handler.RUNTIME.settings.max_seconds == 120.0
    assert replay_handler.RUNTIME.settings.bucket == BUCKET


def test_a_period_with_nothing_archived_is_done_without_touching_the_broker(
    replay_handler: ModuleType,
) -> None:
    # RABBITMQ_PORT 1 refuses connections: a run that tried to publish would stop with
    # "broker unavailable".
    answer = replay_handler.handler(
        {
            "start": "2026-12-01T00:00:00Z",
            "end": "2026-12-02T00:00:00Z",
            "replay_id": "r-1",
            "max_seconds": 9999,
        },
        None,
    )
    assert (answer["selected"], answer["replayed"], answer["stopped"]) == (0, 0, "done")
    assert answer["replay_id"] == "r-1"
    assert answer["cursor"] is None
