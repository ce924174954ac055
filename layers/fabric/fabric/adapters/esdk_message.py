"""Encryption SDK messages written in one pass: format 2, suite 0x0478, framed, unsigned.

``EsdkCipher`` gets its materials from the SDK (the caching CMM, the KMS master key provider)
and has this module write the message, because the SDK's streaming encryptor spends about 75 µs
of Python per small message on stream objects, attrs validation and generic serializers around
a few microseconds of cryptography. The bytes are the SDK's own: ``tests/unit/test_esdk_message.py``
holds every size, frame boundary and context shape to what ``EncryptionSDKClient.encrypt`` writes
for the same data key and message id, and decryption is always the SDK's.

Layout (AWS Encryption SDK message format, version 2, the only one written here):

- header: version ``0x02``, suite ``0x0478`` (``AES_256_GCM_HKDF_SHA512_COMMIT_KEY``), a 32-byte
  random message id, the serialized encryption context, the encrypted data keys, content type
  ``0x02`` (framed), the frame length, and the 32-byte commitment key;
- header authentication: the AES-GCM tag over the header, with a zero IV and no plaintext;
- frames: each ``frame_length`` bytes of plaintext as ``seq · IV · ciphertext · tag``, then a
  final frame (``0xFFFFFFFF · seq · IV · length · ciphertext · tag``) holding the rest, which may
  be empty. IVs are the sequence number, unique per message because the key is.

The data key of a message is HKDF-SHA512 of the materials' key with the message id as salt
(info ``0x0478 || "DERIVEKEY"``); the commitment key the same with info ``"COMMITKEY"``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA512
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fabric.errors import EncryptionUnavailable

SUITE_ID = 0x0478
FRAME_LENGTH = 4096  # the SDK's default
MESSAGE_ID_BYTES = 32
_KEY_BYTES = 32
_PREFIX = struct.pack(">BH", 0x02, SUITE_ID)
_FRAMED = b"\x02"
_DERIVE_INFO = struct.pack(">H9s", SUITE_ID, b"DERIVEKEY")
_COMMIT_INFO = b"COMMITKEY"
_HEADER_AUTH_IV = bytes(12)
_FRAME_AAD = b"AWSKMSEncryptionClient Frame"
_FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
_FINAL_MARK = 0xFFFFFFFF
_MAX_SHORT = 0xFFFF


def serialize_context(context: Mapping[str, str]) -> bytes:
    """The encryption context as the header stores it: entries sorted by UTF-8 key, each key and
    value length-prefixed (empty context: no bytes).

    Raises:
        EncryptionUnavailable: the context does not fit the format (more than 65,535 bytes, or an
            entry longer than that); the SDK refuses the same.
    """
    if not context:
        return b""
    entries = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    parts = [struct.pack(">H", len(entries))]
    for key, value in entries:
        if len(key) > _MAX_SHORT or len(value) > _MAX_SHORT:
            raise EncryptionUnavailable("an encryption context entry is too long for the format")
        parts += (struct.pack(">H", len(key)), key, struct.pack(">H", len(value)), value)
    serialized = b"".join(parts)
    if len(serialized) > _MAX_SHORT:
        raise EncryptionUnavailable("the encryption context is too long for the format")
    return serialized


def serialize_data_keys(keys: Iterable[tuple[str, bytes, bytes]]) -> bytes:
    """The encrypted data keys section: a count, then ``(provider id, key info, wrapped key)``
    each length-prefixed."""
    listed = list(keys)
    parts = [struct.pack(">H", len(listed))]
    for provider_id, key_info, wrapped in listed:
        provider = provider_id.encode("utf-8")
        for field in (provider, key_info, wrapped):
            parts += (struct.pack(">H", len(field)), field)
    return b"".join(parts)


def write_message(
    *,
    data_key: bytes,
    message_id: bytes,
    context: bytes,
    data_keys: bytes,
    plaintext: bytes,
    frame_length: int = FRAME_LENGTH,
) -> bytes:
    """One complete message: header, header authentication and frames.

    ``data_key`` is the plaintext data key of the materials, ``message_id`` 32 random bytes
    (never reused with the same data key), ``context`` and ``data_keys`` as serialized by
    ``serialize_context`` and ``serialize_data_keys``.

    Raises:
        ValueError: a key or message id of the wrong length, or a frame length below 1.
    """
    if len(data_key) != _KEY_BYTES or len(message_id) != MESSAGE_ID_BYTES or frame_length < 1:
        raise ValueError("a 32-byte data key, a 32-byte message id and a positive frame length")
    derived = _hkdf(data_key, message_id, _DERIVE_INFO)
    header = b"".join(
        (
            _PREFIX,
            message_id,
            struct.pack(">H", len(context)),
            context,
            data_keys,
            _FRAMED,
            struct.pack(">I", frame_length),
            _hkdf(data_key, message_id, _COMMIT_INFO),
        )
    )
    aead = AESGCM(derived)
    parts = [header, aead.encrypt(_HEADER_AUTH_IV, b"", header)]
    view = memoryview(plaintext)
    sequence, offset = 1, 0
    while len(plaintext) - offset >= frame_length:  # full frames
        chunk = view[offset : offset + frame_length]
        iv = _iv(sequence)
        aad = message_id + _FRAME_AAD + struct.pack(">IQ", sequence, frame_length)
        parts += (struct.pack(">I", sequence), iv, aead.encrypt(iv, chunk, aad))
        sequence, offset = sequence + 1, offset + frame_length
    rest = view[offset:]  # the final frame, possibly empty
    iv = _iv(sequence)
    aad = message_id + _FINAL_FRAME_AAD + struct.pack(">IQ", sequence, len(rest))
    parts += (
        struct.pack(">II", _FINAL_MARK, sequence),
        iv,
        struct.pack(">I", len(rest)),
        aead.encrypt(iv, rest, aad),
    )
    return b"".join(parts)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA512(), length=_KEY_BYTES, salt=salt, info=info).derive(key)


def _iv(sequence: int) -> bytes:
    return struct.pack(">8xI", sequence)
