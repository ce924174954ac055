"""EsdkCipher against moto's KMS: sealing, context binding, data-key caching, KMS outages."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws

from fabric.adapters.esdk import EsdkCipher
from fabric.errors import DecryptionFailed, EncryptionUnavailable
from fabric.protection import encryption_context, open_payload, seal_payload

pytestmark = pytest.mark.integration

REGION = "ap-southeast-3"
CANARY = "CANARY-child-name-Siti-Rahayu"
PAYLOAD = json.dumps({"child": CANARY, "location": "Jakarta Timur"}).encode()


def context(message_id: str = "0f8fad5b-d9cb-469f-a165-70867728950e") -> dict[str, str]:
    return encryption_context(message_id=message_id, source="community", environment="test")


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's KMS in Jakarta, with fake credentials so nothing can reach a real account."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("kms", region_name=REGION)


def new_key(kms: Any) -> str:
    return str(kms.create_key(Description="fabric messages")["KeyMetadata"]["Arn"])


class CountingClients:
    """Client factory for EsdkCipher: its clients count KMS calls by operation and answer the
    operations in ``failures`` with the given before-call hook instead of calling moto."""

    def __init__(self, failures: dict[str, Any] | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.failures = failures or {}

    def __call__(self) -> Any:
        client = boto3.client("kms", region_name=REGION)
        client.meta.events.register("before-call.kms", self._count)
        for operation, hook in self.failures.items():
            client.meta.events.register(f"before-call.kms.{operation}", hook)
        return client

    def _count(self, event_name: str, **_: Any) -> None:
        self.calls[event_name.rsplit(".", 1)[-1]] += 1


def kms_error(code: str, message: str) -> Any:
    """A before-call hook answering with KMS's HTTP 400 error, so botocore raises the real
    modelled ClientError subclass (e.g. ``KMS.Client.exceptions.DisabledException``)."""

    def respond(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        http = AWSResponse(f"https://kms.{REGION}.amazonaws.com/", 400, {}, None)
        return http, {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    return respond


def test_a_sealed_payload_opens_to_the_original_bytes(kms: Any) -> None:
    cipher = EsdkCipher(new_key(kms))
    sealed = seal_payload(cipher, PAYLOAD, context())
    assert open_payload(cipher, sealed, context()) == PAYLOAD


def test_the_canary_never_appears_in_the_sealed_payload(kms: Any) -> None:
    cipher = EsdkCipher(new_key(kms))
    ciphertext = cipher.encrypt(PAYLOAD, context())
    assert CANARY.encode() not in ciphertext
    assert CANARY not in json.dumps(seal_payload(cipher, PAYLOAD, context()))


def test_a_payload_does_not_open_for_another_message_id(kms: Any) -> None:
    cipher = EsdkCipher(new_key(kms))
    sealed = seal_payload(cipher, PAYLOAD, context("message-a"))
    with pytest.raises(DecryptionFailed, match="fabric:message_id"):
        open_payload(cipher, sealed, context("message-b"))


@pytest.mark.parametrize("where", ["wrapped data key", "payload"])
def test_a_tampered_byte_is_refused(kms: Any, where: str) -> None:
    cipher = EsdkCipher(new_key(kms))
    ciphertext = bytearray(cipher.encrypt(PAYLOAD, context()))
    ciphertext[len(ciphertext) // 2 if where == "wrapped data key" else -1] ^= 0x01
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(bytes(ciphertext), context())


def test_a_ciphertext_relabelled_for_another_message_is_refused(kms: Any) -> None:
    # fabric:message_id is kept away from KMS (so data keys can be cached): this shows the
    # message header still authenticates it.
    cipher = EsdkCipher(new_key(kms))
    ciphertext = cipher.encrypt(PAYLOAD, context("message-a"))
    relabelled = ciphertext.replace(b"message-a", b"message-b")
    assert relabelled != ciphertext
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(relabelled, context("message-b"))


def test_a_cipher_for_another_key_cannot_decrypt(kms: Any) -> None:
    ciphertext = EsdkCipher(new_key(kms)).encrypt(PAYLOAD, context())
    with pytest.raises(DecryptionFailed):
        EsdkCipher(new_key(kms)).decrypt(ciphertext, context())


def test_data_keys_are_cached_across_messages_with_different_ids(kms: Any) -> None:
    key_arn = new_key(kms)
    clients = CountingClients()
    cipher = EsdkCipher(key_arn, client_factory=clients)
    sealed = [cipher.encrypt(PAYLOAD, context(f"message-{n}")) for n in range(100)]
    reader = EsdkCipher(key_arn, client_factory=clients)
    opened = [reader.decrypt(c, context(f"message-{n}")) for n, c in enumerate(sealed)]
    assert opened == [PAYLOAD] * 100
    assert clients.calls["GenerateDataKey"] == 1
    assert clients.calls["Decrypt"] == 1


def test_a_data_key_serves_at_most_max_messages_encrypted_messages(kms: Any) -> None:
    clients = CountingClients()
    cipher = EsdkCipher(new_key(kms), client_factory=clients, max_messages_encrypted=10)
    for n in range(25):
        cipher.encrypt(PAYLOAD, context(f"message-{n}"))
    assert clients.calls["GenerateDataKey"] == 3


def test_a_data_key_serves_at_most_max_age_seconds(kms: Any) -> None:
    clients, now = CountingClients(), [1000.0]
    cipher = EsdkCipher(
        new_key(kms), client_factory=clients, max_age_seconds=60, clock=lambda: now[0]
    )
    cipher.encrypt(PAYLOAD, context("message-1"))
    now[0] += 60
    cipher.encrypt(PAYLOAD, context("message-2"))
    assert clients.calls["GenerateDataKey"] == 1  # 60 s old: still within its age
    now[0] += 0.5
    cipher.encrypt(PAYLOAD, context("message-3"))
    assert clients.calls["GenerateDataKey"] == 2


def test_each_source_has_its_own_data_key_bound_to_it(kms: Any) -> None:
    key_arn = new_key(kms)
    clients = CountingClients()
    cipher = EsdkCipher(key_arn, client_factory=clients, cache_capacity=2)
    sources = ["community", "government", "community", "government"]
    contexts = [
        encryption_context(message_id=f"message-{n}", source=source, environment="test")
        for n, source in enumerate(sources)
    ]
    sealed = [cipher.encrypt(PAYLOAD, c) for c in contexts]
    assert clients.calls["GenerateDataKey"] == 2
    reader = EsdkCipher(key_arn)
    assert [reader.decrypt(s, c) for s, c in zip(sealed, contexts, strict=True)] == [PAYLOAD] * 4
    with pytest.raises(DecryptionFailed):  # under the community key's context, not government's
        reader.decrypt(sealed[0], contexts[1] | {"fabric:message_id": "message-0"})


def test_past_its_capacity_the_cache_forgets_the_oldest_source(kms: Any) -> None:
    clients = CountingClients()
    cipher = EsdkCipher(new_key(kms), client_factory=clients, cache_capacity=1)
    for n, source in enumerate(["community", "government", "community"]):
        cipher.encrypt(
            PAYLOAD, encryption_context(message_id=f"m-{n}", source=source, environment="test")
        )
    assert clients.calls["GenerateDataKey"] == 3


def test_a_data_key_kms_refused_is_asked_for_again_on_the_next_message(kms: Any) -> None:
    throttled = [kms_error("ThrottlingException", "Rate exceeded")]

    def throttle_once(**kwargs: Any) -> Any:
        return throttled.pop()(**kwargs) if throttled else None  # None: the call goes on

    cipher = EsdkCipher(
        new_key(kms), client_factory=CountingClients({"GenerateDataKey": throttle_once})
    )
    with pytest.raises(EncryptionUnavailable):
        cipher.encrypt(PAYLOAD, context("message-1"))
    assert cipher.decrypt(cipher.encrypt(PAYLOAD, context("message-2")), context("message-2"))


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("DisabledException", "key is disabled"),
        ("AccessDeniedException", "not authorized to perform kms:GenerateDataKey"),
        ("ThrottlingException", "Rate exceeded"),
    ],
)
def test_kms_refusing_the_key_makes_encryption_unavailable(
    kms: Any, code: str, message: str
) -> None:
    key_arn = new_key(kms)
    # moto gap (DESIGN §9): a disabled key still generates data keys in moto (and disable_key
    # wants the bare key id, not the ARN), so the error KMS returns is injected at the client.
    kms.disable_key(KeyId=key_arn.rsplit("/", 1)[-1])
    clients = CountingClients({"GenerateDataKey": kms_error(code, message)})
    with pytest.raises(EncryptionUnavailable):
        EsdkCipher(key_arn, client_factory=clients).encrypt(PAYLOAD, context())


def test_kms_out_of_reach_makes_encryption_unavailable(kms: Any) -> None:
    clients = CountingClients({"GenerateDataKey": _unreachable})
    with pytest.raises(EncryptionUnavailable):
        EsdkCipher(new_key(kms), client_factory=clients).encrypt(PAYLOAD, context())


def test_kms_out_of_reach_on_decrypt_is_unavailable_not_a_bad_message(kms: Any) -> None:
    key_arn = new_key(kms)
    ciphertext = EsdkCipher(key_arn).encrypt(PAYLOAD, context())
    reader = EsdkCipher(key_arn, client_factory=CountingClients({"Decrypt": _unreachable}))
    with pytest.raises(EncryptionUnavailable):
        reader.decrypt(ciphertext, context())


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("ThrottlingException", "Rate exceeded"),
        ("DisabledException", "key is disabled"),
        ("AccessDeniedException", "not authorized to perform kms:Decrypt"),
    ],
)
def test_kms_refusing_to_decrypt_now_is_unavailable_not_a_bad_message(
    kms: Any, code: str, message: str
) -> None:
    # A consumer parks a DecryptionFailed message as poison: a throttled KMS must not make a
    # good restricted message look like one.
    key_arn = new_key(kms)
    ciphertext = EsdkCipher(key_arn).encrypt(PAYLOAD, context())
    reader = EsdkCipher(
        key_arn, client_factory=CountingClients({"Decrypt": kms_error(code, message)})
    )
    with pytest.raises(EncryptionUnavailable, match=code):
        reader.decrypt(ciphertext, context())
    assert EsdkCipher(key_arn).decrypt(ciphertext, context()) == PAYLOAD  # the message was fine


def _unreachable(**_: Any) -> None:
    raise EndpointConnectionError(endpoint_url=f"https://kms.{REGION}.amazonaws.com/")


def test_a_cipher_that_cannot_be_set_up_is_unavailable_not_a_crash() -> None:
    # The SDK's key provider makes its KMS client when it is built: with no region (or no
    # credentials configuration), that fails before any message; the router must answer
    # "unavailable" per message, and a consumer retry it, rather than fail the whole call.
    from botocore.exceptions import NoRegionError

    def no_region() -> Any:
        raise NoRegionError

    cipher = EsdkCipher(
        "arn:aws:kms:ap-southeast-3:111111111111:key/00000000-0000-0000-0000-000000000000",
        client_factory=no_region,
    )
    context = encryption_context(message_id="m-1", source="government", environment="test")
    with pytest.raises(EncryptionUnavailable, match="cannot set up encryption"):
        cipher.encrypt(b'{"child":"x"}', context)
    with pytest.raises(EncryptionUnavailable, match="cannot set up encryption"):
        cipher.decrypt(b"not even a message", context)


def test_a_data_key_never_shows_in_a_repr() -> None:
    from fabric.adapters.esdk import _DataKey

    key = _DataKey(key=b"\x01" * 32, context={"fabric:source": "government"}, header=b"", born=0)
    assert "\\x01" not in repr(key)
