"""The SNS/SQS fallback transport: messages RabbitMQ could not take, to SNS, filtered to SQS.

Each message is published to the ``fallback`` topic (the ``emergency`` topic for emergencies)
with the groups the routing table resolved in the ``audience`` message attribute; every group's
SQS queue is subscribed with a filter on its own name, so SNS delivers exactly what RabbitMQ
would have. ``PublishBatch`` sends up to 10 entries per call and every entry's result is checked:
a message is stored only when SNS listed it as successful. Entries SNS refused for its own
reasons (throttling, an internal error) are sent once more, alone, a moment later, and waited
for only until the call's retry window closes. The whole call answers within its budget: what is
not sent by then is ``unavailable`` unsent, and a request SNS has not answered by then is given
up on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fabric.jsoncodec import canonical_json
from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome

_LOG = logging.getLogger(__name__)
TRANSPORT_NAME = "fallback"
AUDIENCE_ATTRIBUTE = "audience"
MESSAGE_ID_ATTRIBUTE = "fabric-message-id"
TOPIC_ATTRIBUTE = "fabric-topic"
HEADERS_ATTRIBUTE = "fabric-headers"
_MAX_ENTRIES = 10
# SNS limits a whole PublishBatch request (bodies and attributes) to 256 KiB.
_MAX_BATCH_BYTES = 262_144
# An entry SNS refused without blaming the sender (``SenderFault`` false: Throttling,
# InternalError, KMSThrottling) is sent once more this long after the refusal, if the publish
# call is still inside its retry window, and that second call is waited for only until the
# window closes: the router answers within seconds (an emergency within one), and a refused
# entry is only ``unavailable``, never lost, when the window has passed.
RETRY_BACKOFF_S = 0.1
RETRY_WINDOW_S = 2.0
# How long one publish call may take in all. Requests go one after another, each bounded only
# by the client's timeouts (about 4 s on an SNS that takes the connection and never answers):
# 50 requests of a 500-message call would outlast the router function's 30 s timeout, which
# kills the call before it answers or audits anything. Past the budget, the requests not sent
# yet are not sent, and the one in flight is given up on: their messages are ``unavailable``.
# A fixed budget rather than the function's remaining time: the stages around it are bounded
# too, and with it a call that meets an outage everywhere still answers inside 30 s. Each stage
# at most, added up as if all met their bound in one call: the credentials' read from Secrets
# Manager when a connection needs them anew, about 4.3 s (the client's two attempts of a 2 s
# read); the broker's connect timeout, 2 s; its publish, at most its budget, 2.5 s
# (``bootstrap._ROUTER_PUBLISH_BUDGET``); the key service, about 4.3 s (asked once a call);
# SNS, this budget, 8 s; the audit batch on the broker, at most its own publish budget, 2.5 s
# (after a call that timed out or ran out of budget it goes straight to SQS, and nothing once
# the breaker is open); the audit batch's SQS path, 5 s
# (``fabric.adapters.sqs_audit.PUBLISH_BUDGET_S``): 28.6 s, beside the router's own work, well
# under a second for 500 messages. A healthy SNS answers a request in tens of milliseconds: a
# 500-message call takes one or two seconds of it.
PUBLISH_BUDGET_S = 8.0


class SnsFallbackTransport:
    """A ``Transport`` onto the SNS fallback and emergency topics.

    Refuses (as ``UNAVAILABLE``, never a false success) what the fallback cannot deliver: a
    message no group would receive (SNS would accept and drop it) and audit batches (their
    fallback path arrives with the audit trail).
    """

    name = TRANSPORT_NAME

    def __init__(
        self,
        *,
        fallback_topic_arn: str,
        emergency_topic_arn: str,
        client_factory: Callable[[], Any],
    ) -> None:
        self._topics = {False: fallback_topic_arn, True: emergency_topic_arn}
        self._client_factory = client_factory
        self._client: Any = None

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish in batches of at most 10 (and 256 KiB); one Outcome per message, in order.

        Returns within ``PUBLISH_BUDGET_S`` (and a few milliseconds), whatever SNS does.
        """
        del meanwhile  # each request returns once stored: no wait to overlap with
        started = time.monotonic()
        deadline = started + PUBLISH_BUDGET_S
        retry_until = min(started + RETRY_WINDOW_S, deadline)
        taken = list(messages)
        outcomes: dict[int, Outcome] = {}
        entries: dict[int, dict[str, Any]] = {}
        batches: dict[bool, list[list[int]]] = {False: [], True: []}
        sizes: dict[bool, int] = {False: 0, True: 0}
        for index, message in enumerate(taken):
            if message.kind is not MessageKind.MESSAGE or not message.audience:
                outcomes[index] = Outcome(message.message_id, failure=Failure.UNAVAILABLE)
                continue
            entries[index] = entry = _entry(str(index), message)
            size = entry_bytes(entry)
            groups = batches[message.emergency]
            if (
                not groups
                or len(groups[-1]) >= _MAX_ENTRIES
                or sizes[message.emergency] + size > _MAX_BATCH_BYTES
            ):
                groups.append([])
                sizes[message.emergency] = 0
            groups[-1].append(index)
            sizes[message.emergency] += size
        for emergency in (True, False):  # emergencies first: never behind a bulk call's
            for group in batches[emergency]:
                outcomes.update(
                    self._send(
                        self._topics[emergency],
                        taken,
                        group,
                        entries,
                        retry_until=retry_until,
                        deadline=deadline,
                    )
                )
        unsent = sum(o.failure is not None for o in outcomes.values())
        if unsent and time.monotonic() >= deadline:
            _LOG.warning("SNS publish out of time: %d message(s) not stored", unsent)
        return [outcomes[i] for i in range(len(taken))]

    def close(self) -> None:
        """Nothing to release (the HTTP client pools its connections)."""

    def _send(
        self,
        topic_arn: str,
        messages: list[OutboundMessage],
        indices: list[int],
        entries: dict[int, dict[str, Any]],
        *,
        retry_until: float,
        deadline: float,
    ) -> dict[int, Outcome]:
        stored: set[int] = set()
        refused: list[int] = []
        if time.monotonic() < deadline:  # past it, the batch is not sent at all
            stored, refused = self._bounded(topic_arn, [entries[i] for i in indices], deadline)
        # Only the refused entries go again: one SNS accepted would be delivered twice.
        if refused and time.monotonic() + RETRY_BACKOFF_S <= retry_until:
            time.sleep(RETRY_BACKOFF_S)
            stored |= self._bounded(topic_arn, [entries[i] for i in refused], retry_until)[0]
        return {
            i: Outcome(messages[i].message_id, transport=TRANSPORT_NAME)
            if i in stored
            else Outcome(messages[i].message_id, failure=Failure.UNAVAILABLE)
            for i in indices
        }

    def _bounded(
        self, topic_arn: str, batch: list[dict[str, Any]], until: float
    ) -> tuple[set[int], list[int]]:
        """``_publish_batch``, if SNS answers before ``until``; else nothing stored.

        The client's timeouts and retries bound one request at about 4 s on an SNS that does not
        answer (two attempts of a 2 s read timeout), more than is left of a retry window or of
        the call's budget. So the request runs on a thread of its own and is abandoned, its
        entries ``unavailable``, at ``until``: an exact bound, whatever the client does (DNS,
        retries, backoff), and no second client for the composition root to build. The
        abandoned request ends within the client's own bounds; should SNS still store an entry,
        the producer's retry makes a duplicate, which consumers drop by ``message_id``.
        """
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sns-publish")
        call = pool.submit(self._publish_batch, topic_arn, batch)
        pool.shutdown(wait=False)  # the thread ends with its call, even one abandoned here
        try:
            return call.result(timeout=max(0.0, until - time.monotonic()))
        except TimeoutError:
            _LOG.warning("SNS publish of %d message(s) did not answer in time", len(batch))
            return set(), []

    def _publish_batch(
        self, topic_arn: str, batch: list[dict[str, Any]]
    ) -> tuple[set[int], list[int]]:
        """One PublishBatch: the indices SNS stored, and those it refused without blaming the
        sender (worth another try). A failed call stores nothing and is not tried again here:
        the client's own retries have already been spent on it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if self._client is None:
                self._client = self._client_factory()
            response = self._client.publish_batch(
                TopicArn=topic_arn, PublishBatchRequestEntries=batch
            )
        except (BotoCoreError, ClientError) as exc:
            _LOG.warning("SNS publish failed for %d message(s): %s", len(batch), type(exc).__name__)
            return set(), []
        stored = {int(item["Id"]) for item in response.get("Successful", [])}
        failed = response.get("Failed", [])
        if failed:
            _LOG.warning("SNS refused %d message(s): %s", len(failed), failed[0].get("Code"))
        return stored, [int(item["Id"]) for item in failed if not item.get("SenderFault", True)]


def _entry(entry_id: str, message: OutboundMessage) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        AUDIENCE_ATTRIBUTE: {
            "DataType": "String.Array",
            "StringValue": json.dumps(sorted(group.value for group in message.audience)),
        },
        MESSAGE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": message.message_id},
        TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": message.topic},
    }
    if message.headers:
        # Canonical JSON, as the envelope's own headers: U+FFFE and U+FFFF in a header value are
        # escaped, since SQS refuses them in an attribute as in a body (``fabric.jsoncodec``).
        attributes[HEADERS_ATTRIBUTE] = {
            "DataType": "String",
            "StringValue": canonical_json(dict(message.headers)).decode("utf-8"),
        }
    return {
        "Id": entry_id,
        "Message": message.body.decode("utf-8"),
        "MessageAttributes": attributes,
    }


def entry_bytes(entry: dict[str, Any]) -> int:
    """What SNS counts of one entry against its 256 KiB: the message, and each attribute's
    name, data type and value, in UTF-8."""
    attributes = entry["MessageAttributes"]
    return len(entry["Message"].encode("utf-8")) + sum(
        len(f"{name}{value['DataType']}{value['StringValue']}".encode())
        for name, value in attributes.items()
    )
