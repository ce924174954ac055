"""EsdkCipher's messages are exactly the bytes the Encryption SDK's own encryptor writes."""

from __future__ import annotations

import itertools
from typing import Any

import aws_encryption_sdk
import aws_encryption_sdk.internal.utils
import pytest
from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from aws_encryption_sdk.materials_managers import DecryptionMaterials, EncryptionMaterials
from aws_encryption_sdk.materials_managers.base import CryptoMaterialsManager
from aws_encryption_sdk.structures import DataKey, EncryptedDataKey, MasterKeyInfo
from cryptography.exceptions import InvalidTag

from fabric.adapters.esdk_message import (
    FRAME_LENGTH,
    serialize_context,
    serialize_data_keys,
    write_message,
)
from fabric.errors import EncryptionUnavailable

SUITE = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
DATA_KEY = bytes(range(32))
MESSAGE_ID = bytes(range(100, 132))
KMS_KEY = "arn:aws:kms:ap-southeast-3:111111111111:key/0f8fad5b-d9cb-469f-a165-70867728950e"
PROVIDERS = [("aws-kms", KMS_KEY.encode(), bytes(range(184))), ("fabric-tëst", b"", b"\x01")]
CONTEXTS: list[dict[str, str]] = [
    {},
    {
        "fabric:message_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "fabric:source": "community",
        "fabric:classification": "restricted",
        "fabric:environment": "prod",
    },
    # Sorted by UTF-8 bytes, not by code point or insertion: "z" < "é" < "\uffff" < "😀".
    {"😀": "emoji", "é": "ünïcode ✓", "z": "", "\uffff": "x" * 300},
]
SIZES = [0, 1, 1023, FRAME_LENGTH - 1, FRAME_LENGTH, FRAME_LENGTH + 1, 3 * FRAME_LENGTH + 7]


class FixedMaterials(CryptoMaterialsManager):  # type: ignore[misc]
    """Materials with a known data key, as a caching CMM would hand out for a cached entry."""

    def __init__(self, provider: tuple[str, bytes, bytes]) -> None:
        provider_id, key_info, wrapped = provider
        self.key = DataKey(
            key_provider=MasterKeyInfo(provider_id=provider_id, key_info=key_info),
            data_key=DATA_KEY,
            encrypted_data_key=wrapped,
        )

    def get_encryption_materials(self, request: Any) -> EncryptionMaterials:
        return EncryptionMaterials(
            algorithm=SUITE,
            data_encryption_key=self.key,
            encrypted_data_keys={
                EncryptedDataKey(
                    key_provider=self.key.key_provider,
                    encrypted_data_key=self.key.encrypted_data_key,
                )
            },
            encryption_context=dict(request.encryption_context),
        )

    def decrypt_materials(self, request: Any) -> DecryptionMaterials:
        return DecryptionMaterials(data_key=self.key)


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The SDK's client, with its random message id replaced by ``MESSAGE_ID``."""
    monkeypatch.setattr(aws_encryption_sdk.internal.utils, "message_id", lambda _size: MESSAGE_ID)
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


def ours(
    plaintext: bytes,
    context: dict[str, str],
    provider: tuple[str, bytes, bytes],
    frame_length: int = FRAME_LENGTH,
) -> bytes:
    return write_message(
        data_key=DATA_KEY,
        message_id=MESSAGE_ID,
        context=serialize_context(context),
        data_keys=serialize_data_keys([provider]),
        plaintext=plaintext,
        frame_length=frame_length,
    )


def plaintext_of(size: int) -> bytes:
    return bytes((i * 7) % 256 for i in range(size))


@pytest.mark.parametrize(
    ("size", "context", "provider"), list(itertools.product(SIZES, CONTEXTS, PROVIDERS))
)
def test_a_message_is_byte_for_byte_the_sdks(
    sdk: Any, size: int, context: dict[str, str], provider: tuple[str, bytes, bytes]
) -> None:
    plaintext = plaintext_of(size)
    expected, _ = sdk.encrypt(
        source=plaintext,
        materials_manager=FixedMaterials(provider),
        encryption_context=context,
        algorithm=SUITE,
    )
    assert ours(plaintext, context, provider) == expected


# The SDK takes frame lengths that are multiples of 128 (it checks the AES block size in bits).
@pytest.mark.parametrize(
    ("size", "frame_length"), [(0, 128), (5, 128), (300, 128), (256, 128), (999, 256)]
)
def test_other_frame_lengths_split_as_the_sdk_splits(
    sdk: Any, size: int, frame_length: int
) -> None:
    plaintext = plaintext_of(size)
    expected, _ = sdk.encrypt(
        source=plaintext,
        materials_manager=FixedMaterials(PROVIDERS[0]),
        encryption_context=CONTEXTS[1],
        algorithm=SUITE,
        frame_length=frame_length,
    )
    assert ours(plaintext, CONTEXTS[1], PROVIDERS[0], frame_length) == expected


def test_the_sdk_decrypts_a_written_message_and_reads_its_context(sdk: Any) -> None:
    plaintext = b'{"child": "CANARY"}'
    message = ours(plaintext, CONTEXTS[1], PROVIDERS[0])
    decrypted, header = sdk.decrypt(source=message, materials_manager=FixedMaterials(PROVIDERS[0]))
    assert decrypted == plaintext
    assert header.encryption_context == CONTEXTS[1]
    assert b"CANARY" not in message


def test_a_flipped_bit_anywhere_fails_the_sdks_decryption(sdk: Any) -> None:
    message = ours(plaintext_of(FRAME_LENGTH + 10), CONTEXTS[1], PROVIDERS[0])
    for position in range(0, len(message), 97):
        tampered = bytearray(message)
        tampered[position] ^= 0x01
        with pytest.raises((AWSEncryptionSDKClientError, InvalidTag)):
            sdk.decrypt(source=bytes(tampered), materials_manager=FixedMaterials(PROVIDERS[0]))


def test_an_entry_too_long_for_the_format_is_refused() -> None:
    with pytest.raises(EncryptionUnavailable, match="too long"):
        serialize_context({"key": "v" * 70_000})
    with pytest.raises(EncryptionUnavailable, match="too long"):
        serialize_context({f"key-{n}": "v" * 1_000 for n in range(70)})


@pytest.mark.parametrize(
    ("data_key", "message_id", "frame_length"),
    [(b"short", MESSAGE_ID, 4096), (DATA_KEY, b"short", 4096), (DATA_KEY, MESSAGE_ID, 0)],
)
def test_a_wrong_key_id_or_frame_length_is_a_value_error(
    data_key: bytes, message_id: bytes, frame_length: int
) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        write_message(
            data_key=data_key,
            message_id=message_id,
            context=b"",
            data_keys=serialize_data_keys([PROVIDERS[0]]),
            plaintext=b"{}",
            frame_length=frame_length,
        )
