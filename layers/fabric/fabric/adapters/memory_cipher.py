"""In-memory PayloadCipher: real AES-256-GCM under a per-instance key, the test double of KMS."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fabric.errors import DecryptionFailed

_VERSION = b"\x01"
_NONCE_BYTES = 12
_LENGTH = struct.Struct(">I")


class LocalCipher:
    """AES-256-GCM with a random key that lives and dies with the instance.

    Message layout: ``0x01 | context length (uint32 BE) | context | nonce (12) | ciphertext+tag``.
    The context is serialized canonically (sorted keys, compact JSON) and the whole header is the
    associated data, so, as with the Encryption SDK, the stored context is authenticated and
    ``decrypt`` checks the expected context against it. Two instances never share a key, which
    stands in for "encrypted under another KMS key".
    """

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``; never raises EncryptionUnavailable."""
        serialized = _canonical(context)
        header = _VERSION + _LENGTH.pack(len(serialized)) + serialized
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, plaintext, header)

    def decrypt(self, ciphertext: bytes, expected_context: Mapping[str, str]) -> bytes:
        """Decrypt and check that the stored context contains ``expected_context``.

        Raises:
            DecryptionFailed: malformed or tampered bytes, another instance's key, or a context
                that lacks or contradicts an expected key.
        """
        prefix = len(_VERSION) + _LENGTH.size
        if len(ciphertext) < prefix or ciphertext[:1] != _VERSION:
            raise DecryptionFailed("not a LocalCipher message")
        (length,) = _LENGTH.unpack_from(ciphertext, len(_VERSION))
        header_end = prefix + length
        header = ciphertext[:header_end]
        nonce = ciphertext[header_end : header_end + _NONCE_BYTES]
        if len(nonce) != _NONCE_BYTES:
            raise DecryptionFailed("truncated LocalCipher message")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext[header_end + _NONCE_BYTES :], header)
        except InvalidTag as exc:
            raise DecryptionFailed("ciphertext is corrupt or under another key") from exc
        stored: dict[str, str] = json.loads(header[prefix:])
        mismatched = sorted(k for k, v in expected_context.items() if stored.get(k) != v)
        if mismatched:
            raise DecryptionFailed(f"encryption context does not match on {mismatched}")
        return plaintext


def _canonical(context: Mapping[str, str]) -> bytes:
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()
