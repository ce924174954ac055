"""Checkpoint signatures with the asymmetric KMS key (``fabric.audit_chain.Signer``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from fabric.audit_chain import Keyring

ALGORITHM = "ECDSA_SHA_256"  # the signing key is ECC_NIST_P256, SIGN_VERIFY
# The signature lengths KMS Verify takes; it refuses any other (ValidationException).
_SIGNATURE_BYTES = range(1, 6145)


class KmsSigner:
    """Signs with KMS ``Sign`` (the private key never leaves KMS) and checks with ``Verify``.

    The message is hashed here and KMS signs the SHA-256 digest (``MessageType`` ``DIGEST``):
    KMS takes at most 4096 bytes of ``RAW`` message, and a checkpoint names every object of its
    hour (about 160 bytes each). ECDSA_SHA_256 over a digest is the same signature as over the
    raw message, so checkpoints signed either way verify alike.
    """

    def __init__(self, key_id: str, client_factory: Callable[[], Any]) -> None:
        self.key_id = key_id
        self._client_factory = client_factory
        self._client: Any = None

    def _kms(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def sign(self, message: bytes) -> bytes:
        """The signature of ``message``, of any length.

        Raises:
            botocore.exceptions.ClientError: KMS refused (disabled key, no permission).
        """
        response = self._kms().sign(
            KeyId=self.key_id,
            Message=hashlib.sha256(message).digest(),
            MessageType="DIGEST",
            SigningAlgorithm=ALGORITHM,
        )
        return bytes(response["Signature"])

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether KMS accepts ``signature`` for ``message``; False for a bad signature."""
        from botocore.exceptions import ClientError

        if len(signature) not in _SIGNATURE_BYTES:  # a request KMS refuses: no signature of it
            return False
        try:
            response = self._kms().verify(
                KeyId=self.key_id,
                Message=hashlib.sha256(message).digest(),
                MessageType="DIGEST",
                Signature=signature,
                SigningAlgorithm=ALGORITHM,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "KMSInvalidSignatureException":
                return False
            raise
        return bool(response["SignatureValid"])


def kms_keyring(key_arns: Sequence[str], client_factory: Callable[[], Any]) -> Keyring:
    """The keys ``key_arns`` (oldest first) as a verifier's keyring, sharing one KMS client.

    Raises:
        ValueError: no key, or a key named twice.
    """
    shared: list[Any] = []

    def client() -> Any:
        if not shared:
            shared.append(client_factory())
        return shared[0]

    return Keyring([KmsSigner(arn, client) for arn in key_arns])
