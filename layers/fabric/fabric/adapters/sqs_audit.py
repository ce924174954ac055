"""Audit batches to the SQS audit queue: their path while RabbitMQ cannot take them.

A ``Transport`` for audit batches only (``MessageKind.AUDIT``); the audit writer reads this
queue as well as the RabbitMQ audit queue, and deduplicates by the batch's message id, which
travels as the ``fabric-message-id`` attribute either way. The whole call answers within its
budget: what is not sent by then is ``unavailable`` unsent, and a request SQS has not answered
by then is given up on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE
from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome

_LOG = logging.getLogger(__name__)
TRANSPORT_NAME = "sqs-audit"
# How long one publish call may take in all. An audit batch is one SendMessage a part (up to
# 256 KiB each: a 500-message call whose bodies are archived makes about twenty), sent one
# after another and each bounded only by the client's timeouts, about 4 s on an SQS that takes
# the connection and never answers: 17 parts took 69 s, and the router function, killed at
# 30 s, answered nothing. Past the budget, the parts not sent yet are not sent, and the one in
# flight is given up on: they are ``unavailable``, and the router counts the batch's records
# lost (``AuditRecordsLost``). A healthy SQS takes a part in tens of milliseconds. The router's
# other stages are bounded too, and the sum stays inside 30 s (``fabric.adapters.sns``,
# ``PUBLISH_BUDGET_S``). Twenty parts to a healthy SQS take one or two seconds of it.
PUBLISH_BUDGET_S = 5.0


class SqsAuditTransport:
    """Sends each audit batch as one SQS message; anything else is refused (``UNAVAILABLE``)."""

    name = TRANSPORT_NAME
    max_message_bytes = 262_144  # SQS's limit: the audit sink splits batches to fit

    def __init__(self, queue_url: str, client_factory: Callable[[], Any]) -> None:
        self._queue_url = queue_url
        self._client_factory = client_factory
        self._client: Any = None

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """One ``SendMessage`` per audit batch, in order; never raises for SQS trouble.

        Returns within ``PUBLISH_BUDGET_S`` (and a few milliseconds), whatever SQS does.
        """
        del meanwhile  # each request returns once stored: no wait to overlap with
        deadline = time.monotonic() + PUBLISH_BUDGET_S
        outcomes = []
        for message in messages:
            stored = (
                message.kind is MessageKind.AUDIT
                and time.monotonic() < deadline  # past it, the part is not sent at all
                and self._bounded(message, deadline)
            )
            outcomes.append(
                Outcome(message.message_id, transport=TRANSPORT_NAME)
                if stored
                else Outcome(message.message_id, failure=Failure.UNAVAILABLE)
            )
        unsent = sum(o.failure is not None for o in outcomes)
        if unsent and time.monotonic() >= deadline:
            _LOG.warning("SQS audit publish out of time: %d part(s) not stored", unsent)
        return outcomes

    def close(self) -> None:
        """Nothing to release."""

    def _bounded(self, message: OutboundMessage, until: float) -> bool:
        """``_send``, if SQS answers before ``until``; else not stored.

        The request runs on a thread of its own and is abandoned at ``until``, as the SNS
        fallback's are (``SnsFallbackTransport._bounded``): an exact bound, whatever the client
        does. The abandoned request ends within the client's own bounds; should SQS still store
        the part, the audit writer takes it as any other, and the records the router counted
        lost are in the trail after all.
        """
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqs-audit")
        call = pool.submit(self._send, message)
        pool.shutdown(wait=False)  # the thread ends with its call, even one abandoned here
        try:
            return call.result(timeout=max(0.0, until - time.monotonic()))
        except TimeoutError:
            _LOG.warning("SQS audit publish of %r did not answer in time", message.message_id)
            return False

    def _send(self, message: OutboundMessage) -> bool:
        """One ``SendMessage``: whether SQS stored it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if self._client is None:
                self._client = self._client_factory()
            self._client.send_message(
                QueueUrl=self._queue_url,
                MessageBody=message.body.decode("utf-8"),
                MessageAttributes={
                    MESSAGE_ID_ATTRIBUTE: {
                        "DataType": "String",
                        "StringValue": message.message_id,
                    }
                },
            )
        except (BotoCoreError, ClientError) as exc:
            _LOG.warning("SQS audit publish failed: %s", type(exc).__name__)
            return False
        return True
