"""Checkpoint signing against KMS's own rules (moto ignores MessageType and the RAW limit)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fabric.adapters.kms_signer import ALGORITHM, KmsSigner
from fabric.audit_chain import canonical, make_checkpoint


class RulesOfKms:
    """Sign and Verify as KMS documents them for ECC_NIST_P256 / ECDSA_SHA_256: a RAW message
    of at most 4096 bytes is hashed by KMS; a DIGEST is the 32-byte SHA-256 itself."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    def _algorithm(self, message: bytes, message_type: str) -> tuple[bytes, Any]:
        if message_type == "RAW":
            if len(message) > 4096:
                raise ClientError(
                    {"Error": {"Code": "ValidationException", "Message": "Message > 4096"}},
                    "Sign",
                )
            return message, ec.ECDSA(hashes.SHA256())
        assert len(message) == 32
        return message, ec.ECDSA(Prehashed(hashes.SHA256()))

    def sign(self, *, KeyId: str, Message: bytes, MessageType: str, SigningAlgorithm: str) -> Any:
        assert SigningAlgorithm == ALGORITHM
        data, algorithm = self._algorithm(Message, MessageType)
        return {"Signature": self._key.sign(data, algorithm)}

    def verify(
        self, *, KeyId: str, Message: bytes, MessageType: str, Signature: bytes, **_: Any
    ) -> Any:
        data, algorithm = self._algorithm(Message, MessageType)
        try:
            self._key.public_key().verify(Signature, data, algorithm)
        except InvalidSignature:
            raise ClientError(
                {"Error": {"Code": "KMSInvalidSignatureException", "Message": "bad"}}, "Verify"
            ) from None
        return {"SignatureValid": True}


def test_a_checkpoint_naming_an_hour_of_three_thousand_objects_is_signed_and_verified() -> None:
    kms = RulesOfKms()
    signer = KmsSigner("key", lambda: kms)
    objects = [
        (f"audit/w/2026/12/06/{i:012d}-{i:012d}.jsonl", hashlib.sha256(b"%d" % i).hexdigest())
        for i in range(3000)
    ]
    body = make_checkpoint(
        writer="w",
        sequence=1,
        objects=objects,
        last_seq=3000,
        last_hash="0" * 64,
        previous_signature=None,
        at="2026-12-06T19:00:00Z",
        signer=signer,
    )
    signed = dict(body)
    signature = signed.pop("signature")

    assert len(canonical(signed)) > 4096 * 100
    assert signer.verify(canonical(signed), base64.b64decode(signature))
    assert not signer.verify(canonical({**signed, "last_seq": 2999}), base64.b64decode(signature))


def test_a_checkpoint_signed_the_old_way_over_the_raw_message_still_verifies() -> None:
    kms = RulesOfKms()
    message = b'{"checkpoint":1,"objects":[]}'
    old = kms.sign(KeyId="key", Message=message, MessageType="RAW", SigningAlgorithm=ALGORITHM)

    assert KmsSigner("key", lambda: kms).verify(message, old["Signature"])
