"""RabbitMQ over TLS, as the fabric reaches it in AWS: AMQPS on 5671 (Amazon MQ listens on
nothing else) and the management API over HTTPS.

A private node gets an AMQPS and an HTTPS management listener with a certificate for
``localhost`` from a certificate authority made for the test; the client trusts that authority
through ``SSL_CERT_FILE``, which the default TLS contexts of the transport and the management
client read, as they read the system's store in Lambda.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabric.adapters.management import ManagementClient
from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.bootstrap import exchange_for as fabric_exchanges
from fabric.errors import ManagementUnavailable
from fabric.ports import Failure, OutboundMessage
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.topology import definitions
from fabric.topology_apply import apply_topology
from tests.integration.private_node import GUEST, PrivateNode, free_port, private_node

EXCHANGE = "amq.topic"
TOPIC = "tls.check"
QUEUE = "tls-check"


@dataclass(frozen=True)
class Authority:
    """A certificate authority made for the test: its certificate and key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    def issue(self, dns_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate for ``dns_name`` only, and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
        certificate = (
            _builder(subject, self.certificate.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return certificate, key

    def write(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class TlsBroker:
    node: PrivateNode
    tls_port: int
    https_port: int  # the management API's
    trusted: Path  # the authority that issued the node's certificate, as a PEM file
    untrusted: Path  # another authority's certificate


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    folder = tmp_path_factory.mktemp("tls")
    authority = Authority.create("fabric test authority")
    certificate, key = authority.issue("localhost")
    (folder / "server.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    trusted = authority.write(folder / "authority.pem")
    untrusted = Authority.create("another authority").write(folder / "other.pem")
    tls_port, https_port = free_port(), free_port()
    files = (
        f"cacertfile = {trusted}\n"
        f"certfile = {folder / 'server.pem'}\n"
        f"keyfile = {folder / 'server.key'}\n"
    )
    config = (
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        + "".join(f"ssl_options.{line}\n" for line in files.splitlines())
        + "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        f"management.ssl.port = {https_port}\n"
        "management.ssl.ip = 127.0.0.1\n"
        + "".join(f"management.ssl.{line}\n" for line in files.splitlines())
    )
    with private_node(config) as node:
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", node.amqp_port, credentials=pika.PlainCredentials(*GUEST)
            )
        )
        channel = connection.channel()
        channel.queue_declare(QUEUE)
        channel.queue_bind(QUEUE, EXCHANGE, TOPIC)
        connection.close()
        yield TlsBroker(node, tls_port, https_port, trusted, untrusted)


def transport(
    broker: TlsBroker,
    host: str,
    name: str,
    *,
    vhost: str = "/",
    exchange_for: Callable[[OutboundMessage], str] = lambda _message: EXCHANGE,
) -> RabbitMqTransport:
    # A generous connect timeout: the first TLS handshake of a node that has just started
    # is slow on a busy machine, and timing is not what these tests are about.
    settings = RabbitSettings(
        host,
        broker.tls_port,
        lambda: GUEST,
        use_tls=True,
        vhost=vhost,
        connect_timeout=10,
        connection_name=name,
    )
    return RabbitMqTransport(settings, exchange_for=exchange_for)


def messages(count: int) -> list[OutboundMessage]:
    return [
        OutboundMessage(str(uuid.uuid4()), TOPIC, f'{{"n": {n}}}'.encode(), frozenset())
        for n in range(count)
    ]


def take(broker: TlsBroker, queue: str = QUEUE, vhost: str = "/") -> list[tuple[str, bytes]]:
    """(message id, body) of each message waiting in ``queue`` of ``vhost``, taken out over the
    node's plain AMQP listener."""
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            broker.node.amqp_port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(*GUEST),
        )
    )
    channel = connection.channel()
    taken = []
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        taken.append((got[1].message_id, got[2]))
    connection.close()
    return taken


def connection_named(broker: TlsBroker, name: str) -> dict[str, Any]:
    """The broker's view of the open connection called ``name``, from the node's CLI (the
    management API's list lags by a statistics interval, and more on a busy machine)."""
    listed = broker.node.ctl(
        "list_connections",
        "client_properties",
        "ssl",
        "ssl_protocol",
        "port",
        "--formatter",
        "json",
        "--quiet",
    )
    for found in json.loads(listed.stdout):
        properties = {key: value for key, _type, value in found["client_properties"]}
        if properties.get("connection_name") == name:
            return dict(found)
    raise AssertionError(f"no connection named {name} on the broker")


@pytest.fixture(autouse=True)
def empty_queue(tls_broker: TlsBroker) -> None:
    """Each test starts with nothing in the queue, whatever the test before it left."""
    take(tls_broker)


def test_the_transport_publishes_over_tls_with_confirms_to_a_verified_broker(
    tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_broker.trusted))
    sent = messages(300)
    publisher = transport(tls_broker, "localhost", "tls-verified")
    try:
        outcomes = publisher.publish(sent)
        seen = connection_named(tls_broker, "tls-verified")
    finally:
        publisher.close()

    assert all(outcome.stored for outcome in outcomes)
    assert take(tls_broker) == [(message.message_id, message.body) for message in sent]
    assert seen["ssl"] is True
    assert seen["port"] == tls_broker.tls_port
    assert seen["ssl_protocol"] in {"tlsv1.2", "tlsv1.3"}


@pytest.mark.parametrize(
    ("authority", "host"),
    [("untrusted", "localhost"), ("trusted", "127.0.0.1")],
    ids=["from-an-unknown-authority", "for-another-name"],
)
def test_a_broker_certificate_that_does_not_verify_is_refused(
    tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch, authority: str, host: str
) -> None:
    # The certificate names localhost only: reached as 127.0.0.1, the same listener is refused.
    monkeypatch.setenv("SSL_CERT_FILE", str(getattr(tls_broker, authority)))

    outcomes = transport(tls_broker, host, f"tls-{authority}-{host}").publish(messages(3))

    assert [outcome.failure for outcome in outcomes] == [Failure.UNAVAILABLE] * 3
    assert take(tls_broker) == []


def test_the_topology_goes_over_https_and_a_routed_message_over_amqps(
    tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The two ways the fabric reaches Amazon MQ, end to end: the custom resource applies the
    # generated topology through the management API, the router publishes into it.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_broker.trusted))
    vhost = f"fabric-tls-{uuid.uuid4().hex[:8]}"
    management = ManagementClient(f"https://localhost:{tls_broker.https_port}", *GUEST)
    management.put_vhost(vhost)
    tls_broker.node.add_vhost(vhost)  # guest's permissions in it
    document = definitions(default_routing_table(), vhost=vhost)
    document["users"], document["permissions"] = [], []
    apply_topology(management, document, passwords={}, vhost=vhost)
    publisher = transport(
        tls_broker, "localhost", "tls-router", vhost=vhost, exchange_for=fabric_exchanges
    )
    router = Router(
        table=default_routing_table(),
        transports=[publisher],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(),
        environment="test",
    )
    message: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "topic": "research.dataset.synced",
        "classification": "internal",
        "payload": {"dataset": "attendance-2026"},
    }
    try:
        result = router.route([message], source="academic")
    finally:
        publisher.close()

    assert result.to_dict()["results"] == [
        {"message_id": message["message_id"], "status": "accepted", "transport": "rabbitmq"}
    ]
    for queue in ("fabric.academic", "fabric.government"):
        assert [mid for mid, _ in take(tls_broker, queue, vhost)] == [message["message_id"]]
    assert take(tls_broker, "fabric.media", vhost) == []


def test_the_management_api_refuses_a_certificate_from_an_unknown_authority(
    tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_broker.untrusted))
    management = ManagementClient(f"https://localhost:{tls_broker.https_port}", *GUEST)

    with pytest.raises(ManagementUnavailable):
        management.overview()
