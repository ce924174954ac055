"""Sealed restricted payloads: only ciphertext on the wire, opened only in their own context."""

from __future__ import annotations

import base64
import json

import pytest

from fabric.adapters.memory_cipher import LocalCipher
from fabric.envelope import JsonValue
from fabric.errors import DecryptionFailed
from fabric.protection import encryption_context, open_envelope, open_payload, seal_payload

CANARY = "CANARY-child-name-Siti-Rahayu"
PAYLOAD = json.dumps({"child": CANARY, "location": "Jakarta Timur"}).encode()
CONTEXT = encryption_context(
    message_id="0f8fad5b-d9cb-469f-a165-70867728950e", source="community", environment="test"
)


def test_the_encryption_context_names_message_source_classification_and_environment() -> None:
    assert CONTEXT == {
        "fabric:message_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "fabric:source": "community",
        "fabric:classification": "restricted",
        "fabric:environment": "test",
    }


def test_a_sealed_payload_opens_to_the_original_bytes() -> None:
    cipher = LocalCipher()
    sealed = seal_payload(cipher, PAYLOAD, CONTEXT)
    assert open_payload(cipher, sealed, CONTEXT) == PAYLOAD


def test_a_sealed_payload_is_a_json_object_naming_its_scheme() -> None:
    sealed = seal_payload(LocalCipher(), PAYLOAD, CONTEXT)
    assert sealed["encrypted"] == "esdk/v1"
    assert json.loads(json.dumps(sealed)) == sealed


def test_the_canary_never_appears_in_the_sealed_payload() -> None:
    sealed = seal_payload(LocalCipher(), PAYLOAD, CONTEXT)
    ciphertext = sealed["ciphertext"]
    assert isinstance(ciphertext, str)
    assert CANARY not in json.dumps(sealed)
    assert CANARY.encode() not in base64.b64decode(ciphertext)


@pytest.mark.parametrize(
    "key", ["fabric:message_id", "fabric:source", "fabric:classification", "fabric:environment"]
)
def test_a_payload_does_not_open_in_another_context(key: str) -> None:
    cipher = LocalCipher()
    sealed = seal_payload(cipher, PAYLOAD, CONTEXT)
    with pytest.raises(DecryptionFailed, match=key):
        open_payload(cipher, sealed, {**CONTEXT, key: "other"})


def test_a_tampered_byte_is_refused() -> None:
    cipher = LocalCipher()
    sealed = seal_payload(cipher, PAYLOAD, CONTEXT)
    raw = bytearray(base64.b64decode(str(sealed["ciphertext"])))
    raw[-1] ^= 0x01
    tampered = {**sealed, "ciphertext": base64.b64encode(bytes(raw)).decode()}
    with pytest.raises(DecryptionFailed):
        open_payload(cipher, tampered, CONTEXT)


def test_a_payload_sealed_under_another_key_is_refused() -> None:
    sealed = seal_payload(LocalCipher(), PAYLOAD, CONTEXT)
    with pytest.raises(DecryptionFailed):
        open_payload(LocalCipher(), sealed, CONTEXT)


@pytest.mark.parametrize(
    "payload",
    [
        {"child": CANARY},
        "bm90IHNlYWxlZA==",
        {"encrypted": "esdk/v2", "ciphertext": "AAAA"},
        {"encrypted": "esdk/v1"},
        {"encrypted": "esdk/v1", "ciphertext": "not base64!"},
        {"encrypted": "esdk/v1", "ciphertext": "AAAA"},
    ],
    ids=["clear", "bare-string", "unknown-scheme", "no-ciphertext", "not-base64", "garbage"],
)
def test_a_restricted_payload_that_is_not_a_valid_seal_is_refused(payload: JsonValue) -> None:
    with pytest.raises(DecryptionFailed):
        open_payload(LocalCipher(), payload, CONTEXT)


@pytest.mark.parametrize(
    "key", ["fabric:message_id", "fabric:source", "fabric:classification", "fabric:environment"]
)
@pytest.mark.parametrize("partial", ["left out", "empty"])
def test_a_partial_expected_context_opens_nothing(key: str, partial: str) -> None:
    # A consumer that forgets a key (or has it empty) must not open a ciphertext moved from
    # another message, source or environment: the check would have nothing to compare.
    cipher = LocalCipher()
    sealed = seal_payload(cipher, PAYLOAD, CONTEXT)
    expected = {k: v for k, v in CONTEXT.items() if k != key}
    if partial == "empty":
        expected[key] = ""
    with pytest.raises(DecryptionFailed, match=key):
        open_payload(cipher, sealed, expected)


def test_an_envelope_opens_against_its_own_id_and_source_and_the_consumers_environment() -> None:
    cipher = LocalCipher()
    envelope: dict[str, JsonValue] = {
        "message_id": CONTEXT["fabric:message_id"],
        "source": CONTEXT["fabric:source"],
        "classification": "restricted",
        "payload": seal_payload(cipher, PAYLOAD, CONTEXT),
    }
    environment = CONTEXT["fabric:environment"]
    assert open_envelope(cipher, envelope, environment) == PAYLOAD
    with pytest.raises(DecryptionFailed, match=r"\['fabric:environment'\]"):
        open_envelope(cipher, envelope, "staging")
    with pytest.raises(DecryptionFailed, match=r"\['fabric:message_id'\]"):
        open_envelope(cipher, {**envelope, "message_id": "01JDQ3ZP5G8Y7K2M4N6R8T0V1X"}, environment)
    with pytest.raises(DecryptionFailed, match=r"\['fabric:source'\]"):
        open_envelope(cipher, {**envelope, "source": "media"}, environment)
    with pytest.raises(DecryptionFailed, match="restricted"):
        open_envelope(cipher, {**envelope, "classification": "internal"}, environment)
    with pytest.raises(DecryptionFailed, match="message_id or source"):
        open_envelope(cipher, {k: v for k, v in envelope.items() if k != "source"}, environment)
