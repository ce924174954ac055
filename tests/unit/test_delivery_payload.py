"""A consumer handler opens a restricted payload with ``Delivery.payload``: the context comes
from the envelope it received and the environment it runs in, never from what it remembers."""

from __future__ import annotations

import json

import pytest

from fabric.adapters.memory_cipher import LocalCipher
from fabric.consumer import Delivery
from fabric.errors import DecryptionFailed
from fabric.protection import encryption_context, seal_payload

MESSAGE_ID = "01JDQ3ZP5G8Y7K2M4N6R8T0V1W"
PAYLOAD = {"case_ref": "JKT-2026-0042", "child": "CANARY-Siti"}


def delivery(cipher: LocalCipher, *, sealed_for: dict[str, str], **fields: object) -> Delivery:
    context = encryption_context(**sealed_for)
    envelope = {
        "version": "fabric.envelope/1",
        "message_id": MESSAGE_ID,
        "topic": "child-safety.incident.reported",
        "source": "community",
        "classification": "restricted",
        "payload": seal_payload(cipher, json.dumps(PAYLOAD).encode(), context),
        **fields,
    }
    return Delivery(
        message_id=MESSAGE_ID,
        topic="child-safety.incident.reported",
        body=json.dumps(envelope).encode(),
        queue="fabric.government",
    )


SEALED_HERE = {"message_id": MESSAGE_ID, "source": "community", "environment": "prod"}


def test_a_restricted_payload_opens_in_the_consumers_environment() -> None:
    cipher = LocalCipher()
    assert delivery(cipher, sealed_for=SEALED_HERE).payload(cipher, "prod") == PAYLOAD


@pytest.mark.parametrize(
    ("sealed_for", "environment"),
    [
        ({**SEALED_HERE, "message_id": "01JDQ3ZP5G8Y7K2M4N6R8T0V1X"}, "prod"),  # another message's
        ({**SEALED_HERE, "source": "media"}, "prod"),  # another source's
        (SEALED_HERE, "staging"),  # a prod message read by a staging consumer
    ],
)
def test_a_payload_moved_from_another_message_source_or_environment_does_not_open(
    sealed_for: dict[str, str], environment: str
) -> None:
    cipher = LocalCipher()
    with pytest.raises(DecryptionFailed):
        delivery(cipher, sealed_for=sealed_for).payload(cipher, environment)


def test_a_payload_that_is_not_restricted_is_returned_as_it_is() -> None:
    cipher = LocalCipher()
    body = {
        "version": "fabric.envelope/1",
        "message_id": MESSAGE_ID,
        "topic": "media.story.published",
        "source": "media",
        "classification": "public",
        "payload": {"headline": "…"},
    }
    plain = Delivery(MESSAGE_ID, "media.story.published", json.dumps(body).encode(), "q")
    assert plain.payload(cipher, "prod") == {"headline": "…"}
