"""The drain function's entry point: bad input is refused with a reason, limits come from config."""

from __future__ import annotations

from types import ModuleType

import pytest

from fabric.drain import FALLBACK_MAX_RECEIVES
from tests.conftest import load_handler

ENVIRONMENT = {
    "FABRIC_ENV": "test",
    "RABBITMQ_HOST": "127.0.0.1",
    "RABBITMQ_PORT": "1",
    "RABBITMQ_TLS": "false",
    "RABBITMQ_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:111111111111:secret:x",
    "SQS_URL_PREFIX": "https://sqs.ap-southeast-3.amazonaws.com/111111111111/",
    "DRAIN_MAX_MESSAGES": "25",
    "DRAIN_MAX_SECONDS": "240",
    "AWS_EC2_METADATA_DISABLED": "true",  # no credentials: the secret read fails at once
}


@pytest.fixture
def drain_handler(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    return load_handler("drain", monkeypatch)


@pytest.mark.parametrize("limit", [0, -3, "10", 2.5, True, None])
def test_a_bad_max_messages_is_refused_and_nothing_is_drained(
    drain_handler: ModuleType, limit: object
) -> None:
    answer = drain_handler.handler({"max_messages": limit} if limit is not None else [], None)
    if limit is None:  # not a dict at all: a scheduled run with defaults; the broker is down
        assert answer["stopped"] == "broker unavailable"
        return
    assert answer == {"error": "max_messages must be a positive whole number"}


def test_the_deployed_limits_reach_the_drainer(drain_handler: ModuleType) -> None:
    drainer = drain_handler.DRAINER
    assert (drainer._max_messages, drainer._max_seconds) == (25, 240.0)
    # Every fallback queue of FABRIC_ENV and its subscription's DLQ, at SQS_URL_PREFIX.
    assert len(drainer._queues) == 20
    (media,) = [q for q in drainer._queues if q.url.endswith("/fabric-test-fallback-media")]
    assert media.url == f"{ENVIRONMENT['SQS_URL_PREFIX']}fabric-test-fallback-media"
    assert (media.group.value, media.emergency) == ("media", False)
    # What the stack's redrive policies allow: a fallback queue's message goes to its DLQ after
    # that many receives; a subscription's DLQ has no redrive policy.
    assert {
        q.url.rsplit("/", 1)[1]: q.max_receives for q in drainer._queues if "-media" in q.url
    } == {
        "fabric-test-fallback-media": FALLBACK_MAX_RECEIVES,
        "fabric-test-fallback-media-sub-dlq": None,
        "fabric-test-emergency-media": FALLBACK_MAX_RECEIVES,
        "fabric-test-emergency-media-sub-dlq": None,
    }
    answer = drain_handler.handler({"version": "0", "source": "aws.events"}, None)
    # Port 1: the drain finds the broker down before it receives anything.
    assert answer == {
        "moved": {},
        "total": 0,
        "left": 0,
        "stopped": "broker unavailable",
        "refused": [],
    }
