"""PayloadCipher on the AWS Encryption SDK and KMS: key-committing AES-256-GCM, cached data keys."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.errors import ConfigError, DecryptionFailed, EncryptionUnavailable
from fabric.protection import MESSAGE_ID_KEY

DEFAULT_CACHE_CAPACITY = 100
DEFAULT_MAX_AGE_SECONDS = 300.0
DEFAULT_MAX_MESSAGES_ENCRYPTED = 10_000

# Keys that differ on every message. The caching CMM keys its cache on the whole encryption
# context, so one of these reaching it would mean one KMS GenerateDataKey per message. They are
# kept out of what the cache and KMS see and put back into the message header, which the data
# key authenticates: they stay bound to the ciphertext, only not to the KMS-wrapped data key.
_MESSAGE_SCOPED_KEYS = frozenset({MESSAGE_ID_KEY})

_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):\d{12}:key/[A-Za-z0-9-]+$")


class EsdkCipher:
    """Encrypts restricted payloads with the AWS Encryption SDK under one KMS key.

    - Suite ``AES_256_GCM_HKDF_SHA512_COMMIT_KEY`` (committing, unsigned) with commitment policy
      REQUIRE_ENCRYPT_REQUIRE_DECRYPT. Unsigned because every reader and writer is a fabric
      component trusted with the key: a signature would only stop a holder of kms:Decrypt from
      forging messages, and ECDSA P-384 would cost more than the rest of the routing.
    - ``StrictAwsKmsMasterKeyProvider`` for ``key_arn`` only (a full key ARN: the data keys'
      provider info is the key ARN, so an alias would never decrypt). A data key serves at most
      ``max_messages_encrypted`` messages for at most ``max_age_seconds`` (defaults 10,000 and
      5 minutes, i.e. a few KMS calls per container per 5 minutes and per source): on
      encryption ``_DataKeys`` counts them, on decryption the SDK's
      ``CachingCryptoMaterialsManager`` caches the decrypted data keys for the same age.
      ``cache_capacity`` bounds the entries (one per source for encryption, one per data key
      for decryption).
    - At most one encrypted data key per message is accepted on decrypt.
    - Encryption takes the materials from ``_DataKeys`` and writes the message with
      ``fabric.adapters.esdk_message``: the bytes the SDK's own encryptor writes, at a sixth
      of its cost. Decryption is the SDK's.

    ``client_factory()`` builds the boto3 KMS client on first use (never at construction, so
    moto can be started first); the default builds one for the key ARN's region, which is the
    only region the key lives in. The SDK itself is imported on first use too (~0.4 s).
    """

    def __init__(
        self,
        key_arn: str,
        *,
        client_factory: Callable[[], Any] | None = None,
        cache_capacity: int = DEFAULT_CACHE_CAPACITY,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        max_messages_encrypted: int = DEFAULT_MAX_MESSAGES_ENCRYPTED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Check the settings; nothing is imported or connected yet.

        Raises:
            ConfigError: ``key_arn`` is not a KMS key ARN, or a cache setting is not positive.
        """
        match = _KEY_ARN.match(key_arn)
        if match is None:
            raise ConfigError(f"messages key must be a KMS key ARN, got {key_arn!r}")
        if cache_capacity < 1 or max_age_seconds <= 0 or max_messages_encrypted < 1:
            raise ConfigError("cipher cache capacity, max age and max messages must be positive")
        region = match["region"]
        self._key_arn = key_arn
        self._client_factory = client_factory or (lambda: _boto3_kms_client(region))
        self._cache_capacity = cache_capacity
        self._max_age_seconds = float(max_age_seconds)
        self._max_messages_encrypted = max_messages_encrypted
        self._clock = clock
        self._engine: _Engine | None = None

    def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext`` as one ESDK message bound to ``context``.

        Raises:
            EncryptionUnavailable: KMS cannot be reached, throttles, or refuses the key
                (disabled, access denied), or the SDK cannot produce a message.
        """
        engine = self._ready()  # raises EncryptionUnavailable itself
        scoped, shared = _split(context)
        try:
            return engine.encrypt(plaintext, shared, scoped)
        except engine.encrypt_errors as exc:
            raise EncryptionUnavailable(
                f"cannot encrypt under {self._key_arn}: {type(exc).__name__}"
            ) from exc

    def decrypt(self, ciphertext: bytes, expected_context: Mapping[str, str]) -> bytes:
        """Decrypt one ESDK message and check that its header context contains every expected
        key with the same value (extra keys, such as the SDK's own, are ignored).

        Raises:
            DecryptionFailed: the bytes are not a valid message, are tampered with, are under
                another key, or the context lacks or contradicts an expected key.
            EncryptionUnavailable: KMS could not be reached (network, timeout), or answered
                but would not decrypt now (throttled, key disabled, access denied): nothing
                that says the message is bad.
        """
        engine = self._ready()
        engine.refusals.code = None
        try:
            plaintext, header = engine.client.decrypt(
                source=ciphertext, materials_manager=engine.cmm
            )
        except engine.network_errors as exc:
            raise EncryptionUnavailable(
                f"cannot reach KMS to decrypt under {self._key_arn}: {type(exc).__name__}"
            ) from exc
        except Exception as exc:  # untrusted bytes: any parse or crypto failure means "bad message"
            code = getattr(engine.refusals, "code", None)
            if code is not None and code not in _BAD_CIPHERTEXT_CODES:
                # KMS answered but would not decrypt now (throttled, key disabled, no access):
                # nothing is wrong with the message, so retry it later rather than park it.
                raise EncryptionUnavailable(
                    f"KMS refused to decrypt under {self._key_arn}: {code}"
                ) from exc
            raise DecryptionFailed(f"cannot decrypt payload: {type(exc).__name__}") from exc
        stored = header.encryption_context
        mismatched = sorted(k for k, v in expected_context.items() if stored.get(k) != v)
        if mismatched:
            raise DecryptionFailed(f"encryption context does not match on {mismatched}")
        return bytes(plaintext)

    def _ready(self) -> _Engine:
        """The SDK's parts, built on first use.

        Raises:
            EncryptionUnavailable: they cannot be built (the SDK's key provider makes its KMS
                client here: no region, no credentials configuration, a missing module). That
                says nothing about any message, so a message that needed it is retried, never
                refused or parked.
        """
        if self._engine is None:
            try:
                self._engine = _build_engine(
                    self._key_arn,
                    self._client_factory,
                    capacity=self._cache_capacity,
                    max_age=self._max_age_seconds,
                    max_messages=self._max_messages_encrypted,
                    clock=self._clock,
                )
            except Exception as exc:  # configuration, not a message: see the docstring
                raise EncryptionUnavailable(
                    f"cannot set up encryption under {self._key_arn}: {type(exc).__name__}"
                ) from exc
        return self._engine


@dataclass(frozen=True)
class _Engine:
    client: Any
    cmm: Any  # for decryption
    # (plaintext, context the cache and KMS see, message-scoped context) -> one message
    encrypt: Callable[[bytes, dict[str, str], dict[str, str]], bytes]
    encrypt_errors: tuple[type[BaseException], ...]
    network_errors: tuple[type[BaseException], ...]
    # The code of the last error KMS answered a Decrypt with, in this thread: the SDK turns it
    # into an error of its own that does not keep it.
    refusals: threading.local


def _build_engine(
    key_arn: str,
    client_factory: Callable[[], Any],
    *,
    capacity: int,
    max_age: float,
    max_messages: int,
    clock: Callable[[], float],
) -> _Engine:
    # Heavy imports (the SDK pulls in boto3 and cryptography) are paid on the first restricted
    # message, not on every cold start.
    import attr
    import aws_encryption_sdk
    import botocore.exceptions
    from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
    from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
    from aws_encryption_sdk.materials_managers import EncryptionMaterialsRequest
    from aws_encryption_sdk.materials_managers.base import CryptoMaterialsManager
    from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager
    from aws_encryption_sdk.materials_managers.default import DefaultCryptoMaterialsManager

    from fabric.adapters.esdk_message import (
        FRAME_LENGTH,
        MESSAGE_ID_BYTES,
        serialize_context,
        serialize_data_keys,
        write_message,
    )

    refusals = threading.local()

    def remember_refusal(parsed: Any = None, **_: Any) -> None:
        error = (parsed or {}).get("Error") if isinstance(parsed, dict) else None
        if error:
            refusals.code = str(error.get("Code", ""))

    class InjectedClientProvider(aws_encryption_sdk.StrictAwsKmsMasterKeyProvider):  # type: ignore[misc]
        """The SDK's strict provider, with KMS clients from ``client_factory``."""

        def add_regional_client(self, region_name: str) -> None:
            if region_name not in self._regional_clients:
                client = client_factory()
                client.meta.events.register("after-call.kms.Decrypt", remember_refusal)
                self._register_client(client, region_name)  # as the SDK's own method does
                self._regional_clients[region_name] = client

    class MessageScopedContextCmm(CryptoMaterialsManager):  # type: ignore[misc]
        """Decryption materials with message-scoped context keys hidden from the caching CMM
        and KMS (see ``_MESSAGE_SCOPED_KEYS``); encryption goes through ``encrypt`` below."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def get_encryption_materials(self, request: Any) -> Any:
            raise NotImplementedError("EsdkCipher.encrypt writes its messages itself")

        def decrypt_materials(self, request: Any) -> Any:
            _scoped, shared = _split(request.encryption_context)
            return self._inner.decrypt_materials(attr.evolve(request, encryption_context=shared))

    algorithm = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    policy = CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    provider = InjectedClientProvider(key_ids=[key_arn])
    backing = DefaultCryptoMaterialsManager(provider)

    def generate(shared: dict[str, str]) -> _DataKey:
        # A new data key from KMS, through the SDK's default CMM (as its caching CMM would).
        found = backing.get_encryption_materials(
            EncryptionMaterialsRequest(
                encryption_context=shared,
                frame_length=FRAME_LENGTH,
                algorithm=algorithm,
                commitment_policy=policy,
            )
        )
        keys = found.encrypted_data_keys
        if found.algorithm is not algorithm or found.signing_key is not None or len(keys) != 1:
            raise EncryptionUnavailable("the materials are not for the committing unsigned suite")
        return _DataKey(
            key=found.data_encryption_key.data_key,
            context=dict(found.encryption_context),
            header=serialize_data_keys(
                (k.key_provider.provider_id, k.key_provider.key_info, k.encrypted_data_key)
                for k in keys
            ),
            born=clock(),
        )

    data_keys = _DataKeys(
        generate, capacity=capacity, max_age=max_age, max_messages=max_messages, clock=clock
    )

    def encrypt(plaintext: bytes, shared: dict[str, str], scoped: dict[str, str]) -> bytes:
        found = data_keys.take(shared)
        return write_message(
            data_key=found.key,
            message_id=os.urandom(MESSAGE_ID_BYTES),
            context=serialize_context({**found.context, **scoped}),
            data_keys=found.header,
            plaintext=plaintext,
        )

    caching = CachingCryptoMaterialsManager(  # decryption: decrypted data keys, for max_age
        master_key_provider=provider,
        cache=LocalCryptoMaterialsCache(capacity),
        max_age=max_age,
    )

    return _Engine(
        client=aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=policy,
            max_encrypted_data_keys=1,
        ),
        cmm=MessageScopedContextCmm(caching),
        encrypt=encrypt,
        encrypt_errors=(
            AWSEncryptionSDKClientError,
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        ),
        network_errors=(botocore.exceptions.BotoCoreError,),
        refusals=refusals,
    )


@dataclass
class _DataKey:
    """One data key's encryption materials, with the data key header it writes."""

    key: bytes = field(repr=False)  # the plaintext data key: never in a repr or a traceback
    context: dict[str, str]  # the encryption context KMS bound it to
    header: bytes  # its encrypted data keys, serialized (esdk_message.serialize_data_keys)
    born: float  # clock() when KMS generated it
    messages: int = 0  # messages it has encrypted


class _DataKeys:
    """Data keys for encryption, one per encryption context (so per source), each used for at
    most ``max_messages`` messages and ``max_age`` seconds, then replaced by a new one from
    ``generate``; at most ``capacity`` contexts are kept (the oldest entry goes first).

    The limits of the SDK's ``CachingCryptoMaterialsManager``, counted as it counts them, at
    the cost of a dictionary look-up: the SDK's manager hashes the serialized context with
    SHA-512 and validates two request objects on every message, 12 of the 27 us a message
    took with it (BENCHMARKS.md). The SDK's byte limit is not set by the fabric (its default
    is 2^63 - 1 bytes), so it is not counted. Safe to share between threads.
    """

    def __init__(
        self,
        generate: Callable[[dict[str, str]], _DataKey],
        *,
        capacity: int,
        max_age: float,
        max_messages: int,
        clock: Callable[[], float],
    ) -> None:
        self._generate = generate
        self._capacity = capacity
        self._max_age = max_age
        self._max_messages = max_messages
        self._clock = clock
        self._keys: dict[tuple[tuple[str, str], ...], _DataKey] = {}
        self._lock = threading.Lock()

    def take(self, context: dict[str, str]) -> _DataKey:
        """The data key for one more message under ``context`` (counted).

        Raises:
            Exception: whatever ``generate`` raises (KMS errors); nothing is cached then.
        """
        name = tuple(sorted(context.items()))
        with self._lock:
            found = self._keys.get(name)
            if (
                found is None
                or found.messages >= self._max_messages
                or self._clock() - found.born > self._max_age
            ):
                found = self._generate(context)
                self._keys.pop(name, None)
                if len(self._keys) >= self._capacity:
                    del self._keys[next(iter(self._keys))]
                self._keys[name] = found
            found.messages += 1
            return found


def _split(context: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    scoped = {k: v for k, v in context.items() if k in _MESSAGE_SCOPED_KEYS}
    shared = {k: v for k, v in context.items() if k not in _MESSAGE_SCOPED_KEYS}
    return scoped, shared


def _boto3_kms_client(region: str) -> Any:
    import boto3

    return boto3.client("kms", region_name=region)


# What KMS answers when the ciphertext itself is wrong: that is the message's fault.
_BAD_CIPHERTEXT_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
