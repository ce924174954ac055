"""Sealing restricted payloads: their encryption context and their form inside the envelope.

Convention (``fabric.envelope/1``, ``classification: restricted``), public like the envelope:

- The envelope's ``payload`` is replaced by the object
  ``{"encrypted": "esdk/v1", "ciphertext": "<base64>"}`` and every other field stays in clear
  (routing needs them).
- ``ciphertext`` is standard, padded base64 (RFC 4648 §4) of one AWS Encryption SDK message
  (format 2, committing suite ``AES_256_GCM_HKDF_SHA512_COMMIT_KEY``, one data key under the
  environment's messages KMS key). Its plaintext is the original payload as compact UTF-8 JSON.
- The message's encryption context holds ``fabric:message_id``, ``fabric:source``,
  ``fabric:classification`` (``restricted``) and ``fabric:environment``. A consumer rebuilds the
  expected context from the envelope it received and the environment it runs in, and refuses
  the payload unless every value matches, so a ciphertext cannot be moved to another message,
  source or environment. ``fabric:message_id`` is authenticated by the message header but not
  sent to KMS (see ``fabric.adapters.esdk``): the other three are, and key policies may use them.
  That keeps one data key per source for many messages, instead of a KMS call per message, and
  it means a plain AWS Encryption SDK ``decrypt`` with a KMS key provider or keyring fails
  (it sends the whole header context to KMS). Decrypt with ``open_envelope`` (or
  ``open_payload``) and ``EsdkCipher``; in another language, with a materials manager that leaves
  ``fabric:message_id`` out of the context it sends to KMS, then check every value as above.
- An unknown ``encrypted`` value is refused: a new scheme gets a new value, never a silent change.

In unit tests the same object carries a ``LocalCipher`` message instead; it never leaves a test.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from fabric.envelope import JsonValue
from fabric.errors import DecryptionFailed
from fabric.ports import PayloadCipher

SCHEME = "esdk/v1"
MESSAGE_ID_KEY = "fabric:message_id"
SOURCE_KEY = "fabric:source"
CLASSIFICATION_KEY = "fabric:classification"
ENVIRONMENT_KEY = "fabric:environment"
_CONTEXT_KEYS = (MESSAGE_ID_KEY, SOURCE_KEY, CLASSIFICATION_KEY, ENVIRONMENT_KEY)


def encryption_context(*, message_id: str, source: str, environment: str) -> dict[str, str]:
    """The encryption context of a restricted payload (the same on both sides of the wire)."""
    return {
        MESSAGE_ID_KEY: message_id,
        SOURCE_KEY: source,
        CLASSIFICATION_KEY: "restricted",
        ENVIRONMENT_KEY: environment,
    }


def seal_payload(
    cipher: PayloadCipher, payload_json: bytes, context: Mapping[str, str]
) -> dict[str, JsonValue]:
    """Encrypt a payload's UTF-8 JSON and return the object that replaces it in the envelope.

    Raises:
        EncryptionUnavailable: the key service cannot be used; nothing was sealed.
    """
    ciphertext = cipher.encrypt(payload_json, context)
    return {"encrypted": SCHEME, "ciphertext": base64.b64encode(ciphertext).decode("ascii")}


def open_envelope(
    cipher: PayloadCipher, envelope: Mapping[str, JsonValue], environment: str
) -> bytes:
    """The payload's UTF-8 JSON of a restricted envelope as received (its JSON object), checked
    against the context rebuilt from the envelope's own ``message_id`` and ``source`` and the
    environment the consumer runs in.

    Raises:
        DecryptionFailed: the envelope is not ``restricted`` or lacks a message id or source;
            or as ``open_payload``.
        EncryptionUnavailable: as ``open_payload``.
    """
    message_id, source = envelope.get("message_id"), envelope.get("source")
    if envelope.get("classification") != "restricted":
        raise DecryptionFailed("envelope is not classified restricted: nothing is sealed")
    if not isinstance(message_id, str) or not isinstance(source, str):
        raise DecryptionFailed("envelope has no message_id or source to check the payload against")
    context = encryption_context(message_id=message_id, source=source, environment=environment)
    return open_payload(cipher, envelope.get("payload"), context)


def open_payload(
    cipher: PayloadCipher, sealed: JsonValue, expected_context: Mapping[str, str]
) -> bytes:
    """The payload's UTF-8 JSON from the ``payload`` of a restricted envelope, as received.

    ``expected_context`` must be a whole context (``encryption_context``): a partial one would
    let a ciphertext moved from another message, source or environment open, so it is refused.

    Raises:
        DecryptionFailed: ``expected_context`` is not a whole restricted context; ``sealed`` is
            not an ``esdk/v1`` object with base64 ciphertext; or the ciphertext is corrupt,
            under another key, or bound to another context.
        EncryptionUnavailable: the key service cannot be reached, or will not decrypt now
            (throttled, key disabled, access denied): retry later, the message may be fine.
    """
    wrong = [key for key in _CONTEXT_KEYS if not expected_context.get(key)]
    if CLASSIFICATION_KEY not in wrong and expected_context[CLASSIFICATION_KEY] != "restricted":
        wrong.append(CLASSIFICATION_KEY)
    if wrong:
        raise DecryptionFailed(f"expected context is not a whole restricted context on {wrong}")
    if not isinstance(sealed, dict) or sealed.get("encrypted") != SCHEME:
        raise DecryptionFailed(f"payload is not sealed with {SCHEME}")
    encoded = sealed.get("ciphertext")
    if not isinstance(encoded, str):
        raise DecryptionFailed("sealed payload has no ciphertext string")
    try:
        ciphertext = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise DecryptionFailed("sealed payload ciphertext is not base64") from exc
    return cipher.decrypt(ciphertext, expected_context)
