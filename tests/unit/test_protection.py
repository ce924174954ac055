"""Sealed restricted payloads: only ciphertext on the wire, opened only in their own context."""

from __future__ import annotations

import base64
import json

import pytest

from fabric.adapters.memory_cipher import LocalCipher
from fabric.envelope import JsonValue
from fabric.errors import DecryptionFailed
from fabric.protection import encryption_context, open_payload, seal_payload

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
