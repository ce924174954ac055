"""The drain's SQS receives: a long poll of a second by default, a quick look when asked."""

from __future__ import annotations

from typing import Any

from fabric.adapters.sqs import SqsFallbackSource


class _Client:
    def __init__(self) -> None:
        self.waits: list[int] = []

    def receive_message(self, **request: Any) -> dict[str, Any]:
        self.waits.append(request["WaitTimeSeconds"])
        return {"Messages": []}


def test_a_receive_long_polls_a_second_and_a_look_does_not_wait() -> None:
    # A short poll samples some of SQS's servers only and may answer nothing while messages
    # remain: the deployed drain would leave emergencies for its next run.
    client = _Client()
    source = SqsFallbackSource(lambda: client)

    assert source.receive("https://sqs/q", 10) == []
    assert source.receive("https://sqs/q", 10, wait=False) == []
    assert client.waits == [1, 0]


def test_the_deployed_drain_keeps_the_long_poll() -> None:
    from fabric.bootstrap import build_drainer
    from fabric.settings import DrainSettings

    client = _Client()
    settings = DrainSettings.from_env(
        {
            "FABRIC_ENV": "test",
            "RABBITMQ_HOST": "127.0.0.1",
            "RABBITMQ_PORT": "1",
            "RABBITMQ_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:111111111111:secret:x",
            "SQS_URL_PREFIX": "https://sqs.ap-southeast-3.amazonaws.com/111111111111/",
        }
    )
    drainer = build_drainer(settings, client_factory=lambda service: client)
    drainer._source.receive("https://sqs/q", 10)
    assert client.waits == [1]
