"""The redrive's SQS client as ``build_redrive`` wires it, against moto's SQS over HTTP whose
answer to a SendMessageBatch comes late, or as an error, after SQS stored the batch.

A send is made once: each send the SDK made again put every letter back at its source again. A
slow SQS that answers is not taken for one that failed: with the router's 2 s read timeout, a
batch answered after 3 s was stored twice yet reported not moved, with no ``redriven`` record.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from fabric.adapters import sqs_dlq
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.bootstrap import build_redrive
from fabric.redrive import RedrivePlan, Redriver, RedriveReport
from fabric.settings import RedriveSettings
from fabric.settings import SqsDeadLetterQueue as QueueSettings
from tests.message_ids import msg_id

REGION = "ap-southeast-3"
_INTERNAL_ERROR = json.dumps({"__type": "InternalError", "message": "try again"}).encode()


@dataclass
class Faults:
    """What the SQS endpoint does wrong, and the calls it took (by operation)."""

    late_s: float = 0.0  # each SendMessageBatch answered this late, after SQS stored it
    failed_sends: int = 0  # so many SendMessageBatch answered 500 after SQS stored them
    failed_receives: int = 0  # so many ReceiveMessage answered 500, nothing received
    failed_deletes: int = 0  # so many DeleteMessageBatch answered 500, nothing deleted
    failed_visibility_changes: int = 0  # so many ChangeMessageVisibilityBatch answered 500
    # So many not answered at all, the connection dropped (as by an SQS that stopped answering,
    # without waiting out the client's timeouts): nothing deleted, nothing shown again.
    dropped_deletes: int = 0
    dropped_visibility_changes: int = 0
    calls: Counter[str] = field(default_factory=Counter)


def _faulty(app: Any, faults: Faults) -> Callable[..., Iterable[bytes]]:
    """moto's WSGI app, with ``faults``."""

    def faulty(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).rpartition(".")[2]
        faults.calls[operation] += 1
        if operation == "ReceiveMessage" and faults.failed_receives:
            faults.failed_receives -= 1
            return _internal_error(start_response)
        if operation == "DeleteMessageBatch" and faults.failed_deletes:
            faults.failed_deletes -= 1
            return _internal_error(start_response)
        if operation == "ChangeMessageVisibilityBatch" and faults.failed_visibility_changes:
            faults.failed_visibility_changes -= 1
            return _internal_error(start_response)
        if operation == "DeleteMessageBatch" and faults.dropped_deletes:
            faults.dropped_deletes -= 1
            _drop(environ)
        if operation == "ChangeMessageVisibilityBatch" and faults.dropped_visibility_changes:
            faults.dropped_visibility_changes -= 1
            _drop(environ)
        answer: list[Any] = []
        result = app(
            environ, lambda status, headers, exc_info=None: answer.extend([status, headers])
        )
        try:
            body = b"".join(result)
        finally:
            getattr(result, "close", lambda: None)()
        if operation == "SendMessageBatch":
            if faults.failed_sends:
                faults.failed_sends -= 1
                return _internal_error(start_response)
            time.sleep(faults.late_s)
        start_response(*answer)
        return [body]

    return faulty


def _drop(environ: dict[str, Any]) -> None:
    """Close the request's connection without an answer (the client sees it closed: the SDK
    tries again, then raises ``ConnectionClosedError``)."""
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError("dropped without an answer")  # the server lets it go quietly


def _internal_error(start_response: Any) -> list[bytes]:
    start_response(
        "500 Internal Server Error",
        [
            ("Content-Type", "application/x-amz-json-1.0"),
            ("Content-Length", str(len(_INTERNAL_ERROR))),
        ],
    )
    return [_INTERNAL_ERROR]


@contextlib.contextmanager
def moto_behind(wrap: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's server, its WSGI app wrapped by ``wrap``, on a loopback port that every default
    client now reaches; a plain SQS client of it."""
    app = wrap(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # Polled often: shutting it down waits up to one poll interval (0.5 s by default).
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield boto3.client("sqs", region_name=REGION)
    finally:
        server.shutdown()
        server.server_close()


def timeouts_divided(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """Every AWS client made from now on (by ``boto3.client``) waits ``scale`` times less to
    connect and to read than its configuration says (botocore's defaults included); its
    attempts are its own. A test divides the slowness it plays by as much, to be shorter."""
    make = boto3.client

    def client(*args: Any, config: Config | None = None, **kwargs: Any) -> Any:
        config = config or Config()
        quicker = Config(
            connect_timeout=config.connect_timeout / scale,
            read_timeout=config.read_timeout / scale,
        )
        return make(*args, config=config.merge(quicker), **kwargs)

    monkeypatch.setattr(boto3, "client", client)


@pytest.fixture
def sqs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Faults]]:
    """A plain SQS client on the faulty endpoint, which every default client now reaches."""
    faults = Faults()
    with moto_behind(lambda app: _faulty(app, faults), monkeypatch) as client:
        yield client, faults


def _parked(client: Any, count: int, *, batched: bool = False) -> tuple[QueueSettings, list[str]]:
    """A source queue and its DLQ holding ``count`` dead letters; their bodies. (moto keeps
    its queues as long as the process: each test has its own.) Sent one a SendMessage, or,
    ``batched``, 10 a SendMessageBatch (quicker, but among the calls the endpoint counts)."""
    source = f"fabric-test-fallback-{uuid.uuid4().hex[:8]}"
    urls = {n: client.create_queue(QueueName=n)["QueueUrl"] for n in (source, f"{source}-dlq")}
    bodies = [
        json.dumps({"message_id": msg_id(f"m-{i}"), "topic": "media.story.published"})
        for i in range(count)
    ]
    if batched:
        for start in range(0, count, 10):
            chunk = bodies[start : start + 10]
            client.send_message_batch(
                QueueUrl=urls[f"{source}-dlq"],
                Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)],
            )
    else:
        for body in bodies:
            client.send_message(QueueUrl=urls[f"{source}-dlq"], MessageBody=body)
    queue = QueueSettings(
        name=source,
        dlq_url=urls[f"{source}-dlq"],
        dlq_arn=f"arn:aws:sqs:{REGION}:123456789012:{source}-dlq",
        source_url=urls[source],
        source_arn=f"arn:aws:sqs:{REGION}:123456789012:{source}",
    )
    return queue, bodies


def _redrive(queue: QueueSettings, audit: MemoryAuditSink) -> RedriveReport:
    """One run on the dead-letter queue the deployed builder opens (its own SQS client)."""
    redriver = Redriver(ledger=MemoryRedriveLedger(), audit=audit)
    return redriver.run(_dead_letter_queue(queue), RedrivePlan())


def _dead_letter_queue(queue: QueueSettings) -> Any:
    """The dead-letter queue of ``queue`` as the deployed builder opens it."""
    runtime = build_redrive(
        RedriveSettings(
            environment="test",
            rabbitmq_host="127.0.0.1",
            rabbitmq_port=5672,
            rabbitmq_tls=False,
            rabbitmq_vhost="/",
            rabbitmq_secret_arn=f"arn:aws:secretsmanager:{REGION}:123456789012:secret:x",
            idempotency_table="fabric-test-idempotency",
            sqs_dead_letter_queues=(queue,),
            max_seconds=60.0,
        )
    )
    return runtime.queue("sqs", f"{queue.name}-dlq")


def _bodies(client: Any, url: str) -> list[str]:
    out: list[str] = []
    while batch := client.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
        out += [message["Body"] for message in batch]
    return sorted(out)


def test_a_send_answered_late_moves_each_letter_once_with_its_record(
    sqs: tuple[Any, Faults], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, faults = sqs
    queue, bodies = _parked(client, 3)
    # Every timeout halved, and the lateness with them, to keep the test short: 3 s (1.5 s
    # here), past the router's 2 s read timeout, within the redrive's 5 s.
    timeouts_divided(monkeypatch, 2.0)
    faults.late_s = 3.0 / 2.0
    monkeypatch.setattr(sqs_dlq, "_RECEIVE_WAIT_S", 0)  # moto has no letter a poll misses
    audit = MemoryAuditSink()

    report = _redrive(queue, audit)

    # Before: two sends, each given up on at 2 s: moved 0 ("origin unavailable"), no records,
    # the letters left in the DLQ, and each at its source twice.
    assert faults.calls["SendMessageBatch"] == 1
    assert (report.moved, report.stopped) == (3, "empty")
    assert len(audit.records) == 3
    assert _bodies(client, queue.source_url) == sorted(bodies)
    assert _bodies(client, queue.dlq_url) == []


def test_a_send_stored_then_failed_is_not_sent_again_by_the_sdk(
    sqs: tuple[Any, Faults],
) -> None:
    client, faults = sqs
    queue, bodies = _parked(client, 3)
    faults.failed_sends = 1  # SQS stored the batch, then answered 500
    audit = MemoryAuditSink()

    report = _redrive(queue, audit)

    # Before: the SDK sent it again, so each letter was at its source twice under one record.
    # Now the send is in doubt, as one never answered is: not moved, the letters stay in the
    # DLQ, and a re-run may put them back a second time (same message ids), never lose them.
    assert faults.calls["SendMessageBatch"] == 1
    assert (report.moved, report.stopped) == (0, "origin unavailable")
    assert _bodies(client, queue.source_url) == sorted(bodies)
    assert _bodies(client, queue.dlq_url) == sorted(bodies)


def test_a_failed_receive_is_still_retried(sqs: tuple[Any, Faults]) -> None:
    client, faults = sqs
    queue, bodies = _parked(client, 3)
    faults.failed_receives = 1

    report = _redrive(queue, MemoryAuditSink())

    assert (report.moved, report.stopped) == (3, "empty")
    assert _bodies(client, queue.source_url) == sorted(bodies)
