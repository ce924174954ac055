"""The rotation function against a Secrets Manager endpoint that accepts connections and never
answers: it must fail with an error within its one-minute timeout, not be ended by Lambda's
"Task timed out" after botocore's default 60 s reads and retries (180 s).

To keep the test short, every AWS client made in it waits ``SCALE`` times less to connect and
to read than its configuration says (botocore's defaults included), and the minute is divided
by ``SCALE`` too: the client's attempts, and so the time the step takes, are the function's
own. A client made some other way than by ``boto3.client`` is not scaled: it waits its whole
time, and the test fails."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fabric.errors import TransportUnavailable
from fabric.rotation import on_event
from tests import silent_endpoint as endpoints
from tests.unit.test_redrive_sqs_client import timeouts_divided

FUNCTION_TIMEOUT_S = 60.0  # stacks/constructs/rotation.py
SCALE = 4.0  # the clients' timeouts and the function's, divided by this
EVENT = {
    "SecretId": "arn:aws:secretsmanager:ap-southeast-3:123456789012:secret:fabric-dev-community",
    "ClientRequestToken": "3f0e5a52-6b8e-4b8a-9a51-2f6c7c1d2e01",
    "Step": "createSecret",
}
ENVIRON = {
    "MANAGEMENT_URL": "https://broker.example:443",
    "ADMIN_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:123456789012:secret:admin",
    "USER_SECRET_ARNS": '{"fabric-dev-community": "' + EVENT["SecretId"] + '"}',
}


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """AWS clients pointed at a local socket that accepts every connection and never answers;
    the connections it took."""
    with endpoints.silent_endpoint() as (port, taken):
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_DEFAULT_REGION": "ap-southeast-3",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        timeouts_divided(monkeypatch, SCALE)
        yield taken


def test_a_silent_secrets_manager_fails_the_step_within_the_functions_timeout(
    silent_endpoint: list[socket.socket],
) -> None:
    outcome: list[BaseException | None] = []

    def rotate() -> None:
        try:
            on_event(EVENT, ENVIRON, client_factory=lambda *_: pytest.fail("no broker call"))
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=rotate, daemon=True)
    worker.start()
    worker.join(FUNCTION_TIMEOUT_S / SCALE)
    took = (time.monotonic() - started) * SCALE  # in the function's time

    assert outcome, f"still waiting on Secrets Manager after {took:.0f} s: Lambda would time out"
    (error,) = outcome
    assert isinstance(error, TransportUnavailable)
    assert "broker credentials" in str(error)
    # Room left in the minute for the error to be logged and returned.
    assert took < FUNCTION_TIMEOUT_S - 15
    assert silent_endpoint  # it did reach the endpoint
