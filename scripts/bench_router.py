"""Router benchmarks on the real local RabbitMQ (and moto's KMS for the Encryption SDK).

Each benchmark works in a fresh vhost holding the fabric's generated topology and removes it
afterwards; nothing else on the shared broker is touched. Figures (see BENCHMARKS.md):

- ``router_msgs_per_s`` / ``raw_publish_msgs_per_s`` / ``router_vs_raw_publish`` (and
  ``transport_*``: the router's RabbitMQ transport alone, prebuilt messages): 1 KiB internal
  messages through ``Router.route`` in batches of 500, against the best raw pika publisher
  (SelectConnection, a window of unconfirmed publishes) sending the same bodies, with the same
  headers, to the same exchange and so the same two quorum queues. Same run, alternating sides.
- ``router_restricted_msgs_per_s`` / ``esdk_encrypt_msgs_per_s`` / ``router_restricted_vs_esdk``:
  1 KiB restricted messages through the router (Encryption SDK + publish), against the
  Encryption SDK's encryption of the same payloads with the same contexts alone.
- ``emergency_p50_ms`` / ``emergency_p99_ms``: an emergency message's time from the router call
  to its consumer, while a bulk backlog of at least 100,000 messages is being drained by another
  consumer.
- ``router_cold_init_ms``: importing the router handler and building its object graph in a fresh
  interpreter, from the built layers, compiling their modules as Lambda does (median of 5).
"""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika

ROOT = Path(__file__).resolve().parent.parent
Figure = tuple[str, float, str]


@dataclass(frozen=True)
class Broker:
    """Where a benchmark's RabbitMQ is: the shared local broker unless it says otherwise."""

    amqp_port: int = 5672
    management_url: str = "http://127.0.0.1:15672"
    pid: int | None = None  # its Erlang VM's; None: ask its management API

    def parameters(self, vhost: str) -> pika.ConnectionParameters:
        return pika.ConnectionParameters("127.0.0.1", self.amqp_port, virtual_host=vhost)


SHARED = Broker()
REGION = "ap-southeast-3"
BULK_TOPIC = "media.story.published"  # routed to one group (media)
FANOUT_TOPIC = "research.dataset.synced"  # routed to academic and government
EMERGENCY_TOPIC = "child-safety.incident.reported"  # emergency path, government and community


# -- fixtures ------------------------------------------------------------------------------------


@contextmanager
def fabric_vhost(broker: Broker = SHARED) -> Iterator[str]:
    """A fresh vhost with the generated topology (its users renamed and removed afterwards)."""
    from fabric.adapters.management import ManagementClient
    from fabric.routing import default_routing_table
    from fabric.topology import definitions
    from fabric.topology_apply import apply_topology

    vhost = f"fabric-bench-{uuid.uuid4().hex[:8]}"
    client = ManagementClient(broker.management_url, "guest", "guest")
    document = definitions(default_routing_table(), vhost=vhost)
    # Users are broker-wide: give the bench its own, so it never changes anyone else's.
    rename = {u["name"]: f"{vhost}-{u['name']}" for u in document["users"]}
    document["users"] = [{**u, "name": rename[u["name"]]} for u in document["users"]]
    document["permissions"] = [{**p, "user": rename[p["user"]]} for p in document["permissions"]]
    client.put_vhost(vhost)
    client.put_permissions(vhost, "guest", configure=".*", write=".*", read=".*")
    try:
        apply_topology(
            client, document, passwords={n: uuid.uuid4().hex for n in rename.values()}, vhost=vhost
        )
        yield vhost
    finally:
        client.delete_vhost(vhost)
        for name in rename.values():
            client.delete_user(name)


@contextmanager
def moto_kms() -> Iterator[str]:
    """moto's KMS in-process; yields a symmetric key ARN."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": REGION,
        }
    )
    from moto import mock_aws

    with mock_aws():
        import boto3

        yield boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]


def build_router(vhost: str, key_arn: str, broker: Broker = SHARED) -> Any:
    from fabric.adapters.esdk import EsdkCipher
    from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
    from fabric.audit_sink import TransportAuditSink
    from fabric.bootstrap import exchange_for, settle_after_init
    from fabric.router import Router
    from fabric.routing import default_routing_table

    transport = RabbitMqTransport(
        RabbitSettings("127.0.0.1", broker.amqp_port, lambda: ("guest", "guest"), vhost=vhost),
        exchange_for=exchange_for,
    )
    router = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=EsdkCipher(key_arn),
        audit=TransportAuditSink([transport], emitted_by="bench"),
        environment="bench",
    )
    # As the router function does at the end of its init. It sets the process's collector, so
    # the raw side of a ratio, measured in the same process, runs under it too; bench.py sets
    # the collector back before the next benchmark.
    settle_after_init()
    return router


def message(topic: str, size: int = 1024, **fields: Any) -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "topic": topic,
        "payload": {"data": "x" * size},
        **fields,
    }


def purge(vhost: str, queues: list[str], broker: Broker = SHARED) -> None:
    connection = pika.BlockingConnection(broker.parameters(vhost))
    channel = connection.channel()
    for queue in queues:
        channel.queue_purge(queue)
    connection.close()


# -- raw pika, the best a client can do ---------------------------------------------------------


class RawPublisher:
    """The best raw pika client: a ``SelectConnection`` with a window of unconfirmed publishes,
    each persistent and mandatory, with the properties a fabric message has (JSON, its own
    message id, the routing headers), so both sides of a ratio put the same AMQP messages on
    the wire. Connected once and kept open, as the router's connection is. A nack, a returned
    (unroutable) message or a lost connection fails ``publish``."""

    def __init__(self, vhost: str, *, broker: Broker = SHARED, window: int = 2000) -> None:
        from pika.adapters.select_connection import SelectConnection

        self._window = window
        self._channel: Any = None
        self._failures: list[str] = []
        self._pending: list[tuple[str, str, bytes, str, dict[str, str]]] = []
        self._next = self._published = self._confirmed = self._end = 0
        self._connection = SelectConnection(
            broker.parameters(vhost),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, error: self._stop(f"connect: {error}"),
            on_close_callback=lambda _c, reason: self._stop(f"closed: {reason}"),
        )
        self._connection.ioloop.start()  # until the channel is in confirm mode
        if self._channel is None:
            raise RuntimeError(f"raw pika did not connect: {self._failures}")

    def publish(
        self,
        exchange: str,
        routing_key: str,
        bodies: list[bytes],
        headers: dict[str, str],
        message_ids: list[str],
    ) -> None:
        """Publish ``bodies`` (message ids given: made before any clock starts) and return
        once the broker confirmed every one of them."""
        self._pending = [
            (exchange, routing_key, body, message_id, headers)
            for body, message_id in zip(bodies, message_ids, strict=True)
        ]
        self._next, self._end = 0, self._published + len(bodies)
        self._pump()
        self._connection.ioloop.start()  # until the last confirm, or a failure
        if self._failures or self._confirmed < self._end:
            raise RuntimeError(
                f"raw pika: {self._end - self._confirmed} of {len(bodies)} not confirmed; "
                f"{self._failures[:3]}"
            )

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()
            self._connection.ioloop.start()  # until closed

    def _on_channel(self, channel: Any) -> None:
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(lambda _ch, reason: self._stop(f"channel: {reason}"))
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._ready(channel))

    def _ready(self, channel: Any) -> None:
        self._channel = channel
        self._connection.ioloop.stop()

    def _pump(self) -> None:
        while self._next < len(self._pending) and self._published - self._confirmed < self._window:
            exchange, routing_key, body, message_id, headers = self._pending[self._next]
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=message_id,
                headers=dict(headers),
            )
            self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
            self._next += 1
            self._published += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._failures.append(f"nacked up to delivery tag {method.delivery_tag}")
        tag = method.delivery_tag
        self._confirmed = tag if method.multiple else max(self._confirmed, tag)
        if self._confirmed >= self._end:
            self._connection.ioloop.stop()
        else:
            self._pump()

    def _on_return(self, _channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        self._failures.append(f"returned: {method.reply_code} {method.reply_text}")

    def _stop(self, failure: str) -> None:
        self._failures.append(failure)
        self._connection.ioloop.stop()


def raw_publish(
    vhost: str,
    *,
    exchange: str,
    routing_key: str,
    bodies: list[bytes],
    headers: dict[str, str],
    window: int = 2000,
    broker: Broker = SHARED,
) -> float:
    """Load ``bodies`` with a ``RawPublisher`` of its own, every one confirmed; msgs/s."""
    message_ids = [str(uuid.uuid4()) for _ in bodies]
    with contextlib.closing(RawPublisher(vhost, broker=broker, window=window)) as raw:
        started = time.perf_counter()
        raw.publish(exchange, routing_key, bodies, headers, message_ids)
        return len(bodies) / (time.perf_counter() - started)


# -- benchmarks ------------------------------------------------------------------------------------


def bench_router_vs_raw(count: int = 20_000, rounds: int = 3) -> Iterator[Figure]:
    """Router throughput against raw pika to the same exchange and queues, same run."""
    rates = _router_and_raw(SHARED, count=count, rounds=rounds, instances=(1, 2))
    raw = rates["raw"]
    yield "raw_publish_msgs_per_s", raw, "msg/s"
    yield "transport_msgs_per_s", rates["transport"], "msg/s"
    yield "router_msgs_per_s", rates["router"], "msg/s"
    yield "transport_vs_raw_publish", rates["transport"] / raw, "ratio"
    yield "router_vs_raw_publish", rates["router"] / raw, "ratio"
    if "router_2" in rates:  # left out, with its reason printed, if that side failed
        yield "router_2_instances_msgs_per_s", rates["router_2"], "msg/s"
        yield "router_2_instances_vs_raw_publish", rates["router_2"] / raw, "ratio"
    for side in ("raw", "router"):
        yield f"{side}_client_cpu_us_per_msg", rates[f"{side}_client_cpu_us"], "us/msg"
        yield f"{side}_broker_cpu_us_per_msg", rates[f"{side}_broker_cpu_us"], "us/msg"


def bench_router_vs_raw_own_core(count: int = 20_000, rounds: int = 3) -> Iterator[Figure]:
    """The same comparison with the broker on a core of its own, as on Amazon MQ, where the
    broker runs on hosts of its own (see ``own_core``)."""
    with own_core() as broker:
        rates = _router_and_raw(broker, count=count, rounds=rounds, instances=(1,))
    yield "own_core_raw_publish_msgs_per_s", rates["raw"], "msg/s"
    yield "own_core_router_msgs_per_s", rates["router"], "msg/s"
    yield "own_core_router_vs_raw_publish", rates["router"] / rates["raw"], "ratio"


@contextmanager
def own_core() -> Iterator[Broker]:
    """A private RabbitMQ node (same version; each benchmark applies the same topology) pinned
    to CPU 0, and this process, so both sides of a ratio, pinned to CPU 1."""
    sys.path.insert(0, str(ROOT))  # the drills' private node
    from tests.integration.private_node import private_node

    ours = os.sched_getaffinity(0)
    with private_node() as node:
        pid = node.pid
        if pid is None:
            raise RuntimeError("the private node wrote no pid file")
        for thread in os.listdir(f"/proc/{pid}/task"):  # threads started later inherit it
            os.sched_setaffinity(int(thread), {0})
        os.sched_setaffinity(0, {1})
        try:
            yield Broker(node.amqp_port, node.management_url, pid)
        finally:
            os.sched_setaffinity(0, ours)


def _router_and_raw(
    broker: Broker, *, count: int, rounds: int, instances: tuple[int, ...]
) -> dict[str, float]:
    """The best of ``rounds`` alternating rounds: the router's transport alone with prebuilt
    messages, raw pika, and the router (one instance, and more at once if ``instances`` says
    so), each after the queues are purged; msgs/s by side, and the CPU per message of raw pika
    and the router. Both of those start warm, connected and with everything they are given
    (the router's items, raw pika's bodies and message ids) made before the clocks start.

    The sides of more than one instance are no goal: if one fails, its reason is printed and
    its figure left out, and the other sides still count."""
    from fabric.envelope import validate_envelope
    from fabric.topology import INGRESS_EXCHANGE, delivery_headers

    with fabric_vhost(broker) as vhost, moto_kms() as key:
        router = build_router(vhost, key, broker)
        queues = ["fabric.academic", "fabric.government", "fabric.audit"]
        items = [message(FANOUT_TOPIC, classification="internal") for _ in range(count)]
        envelopes = [validate_envelope(item, "academic") for item in items]
        bodies = [envelope.to_json_bytes() for envelope in envelopes]  # type: ignore[union-attr]
        headers = delivery_headers(envelopes[0])  # type: ignore[arg-type]
        raw_ids = [str(uuid.uuid4()) for _ in bodies]
        _check_routed(router.route(items[:100], source="academic"))  # connect and warm up
        raw = RawPublisher(vhost, broker=broker)
        raw.publish(INGRESS_EXCHANGE, FANOUT_TOPIC, bodies[:100], headers, raw_ids[:100])
        transport = router._transports[0]
        prepared = _outbound(bodies, headers)
        rates: dict[str, list[float]] = {}
        failed: set[str] = set()  # sides of more instances that failed: left out
        cpu = _CpuMeter(_broker_pid(broker))

        def fresh() -> None:  # empty queues and a broker done with the side before
            purge(vhost, queues, broker)
            cpu.wait_for_quiet_broker()

        for _ in range(rounds):
            fresh()
            started = time.perf_counter()
            for start in range(0, count, 500):
                transport.publish(prepared[start : start + 500])
            rates.setdefault("transport", []).append(count / (time.perf_counter() - started))
            fresh()
            with cpu.measure("raw", count):
                started = time.perf_counter()
                raw.publish(INGRESS_EXCHANGE, FANOUT_TOPIC, bodies, headers, raw_ids)
                rates.setdefault("raw", []).append(count / (time.perf_counter() - started))
            fresh()
            with cpu.measure("router", count):
                started = time.perf_counter()
                for start in range(0, count, 500):
                    _check_routed(router.route(items[start : start + 500], source="academic"))
                rates.setdefault("router", []).append(count / (time.perf_counter() - started))
            for n in instances[1:]:
                if f"router_{n}" not in failed:
                    fresh()
                    try:
                        rate = _route_concurrently(vhost, key, items, instances=n, broker=broker)
                        rates.setdefault(f"router_{n}", []).append(rate)
                    except (RuntimeError, queue_module.Empty) as error:
                        print(f"# router_{n}_instances left out: {error!r}", flush=True)
                        failed.add(f"router_{n}")
        raw.close()
    best = {side: max(values) for side, values in rates.items() if side not in failed}
    return best | cpu.per_message()


def _outbound(bodies: list[bytes], headers: dict[str, str]) -> list[Any]:
    """The router's transport's messages for ``bodies``, to the academic and government groups."""
    from fabric.ports import OutboundMessage
    from fabric.stakeholders import Stakeholder

    groups = frozenset({Stakeholder.ACADEMIC, Stakeholder.GOVERNMENT})
    return [
        OutboundMessage(str(uuid.uuid4()), FANOUT_TOPIC, body, groups, headers=headers)
        for body in bodies
    ]


def _check_routed(result: Any) -> None:
    """Raise with the rejections' reasons if the router did not accept every message."""
    if result.rejected:
        raise RuntimeError(f"the router rejected {result.rejected}: {_rejections(result)}")


def _rejections(result: Any) -> str:
    """The distinct reasons (and details) of a router result's rejections."""
    reasons = {
        f"{r.reason}: {r.detail}" if r.detail else str(r.reason)
        for r in result.results
        if r.status != "accepted"
    }
    return "; ".join(sorted(reasons))


def _broker_pid(broker: Broker) -> int:
    """The OS pid of the broker's Erlang VM: given, or as its management API reports it (a
    node's statistics, which hold it, arrive some seconds after it starts)."""
    if broker.pid is not None:
        return broker.pid
    request = urllib.request.Request(  # noqa: S310 (loopback only)
        f"{broker.management_url}/api/nodes",
        headers={"authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
    )
    for _ in range(30):
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            (node,) = json.load(response)
        if "os_pid" in node:
            return int(node["os_pid"])
        time.sleep(1)
    raise RuntimeError(f"{broker.management_url} reports no os_pid for its node")


class _CpuMeter:
    """CPU seconds of this process and of the broker's VM (``/proc/<pid>/stat``) while a side
    runs, per message over all its rounds."""

    def __init__(self, broker_pid: int) -> None:
        self._broker_pid = broker_pid
        self._spent: dict[str, list[float]] = {}  # side -> [client s, broker s, messages]

    @contextmanager
    def measure(self, side: str, messages: int) -> Iterator[None]:
        client, broker = time.process_time(), self._broker_seconds()
        yield
        spent = self._spent.setdefault(side, [0.0, 0.0, 0])
        spent[0] += time.process_time() - client
        spent[1] += self._broker_seconds() - broker
        spent[2] += messages

    def wait_for_quiet_broker(self, *, window: float = 0.2, within: float = 5.0) -> None:
        """Wait (at most ``within`` seconds) until the broker spends under 15 % of a core over
        ``window``: a purge leaves it compacting the purged messages' log for a while, and the
        side measured next should not pay for the side before it."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            before = self._broker_seconds()
            time.sleep(window)
            if self._broker_seconds() - before < 0.15 * window:
                return

    def per_message(self) -> dict[str, float]:
        """``<side>_client_cpu_us`` and ``<side>_broker_cpu_us`` per message."""
        out = {}
        for side, (client, broker, messages) in self._spent.items():
            out[f"{side}_client_cpu_us"] = client / messages * 1e6
            out[f"{side}_broker_cpu_us"] = broker / messages * 1e6
        return out

    def _broker_seconds(self) -> float:
        with open(f"/proc/{self._broker_pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _route_concurrently(
    vhost: str, key: str, items: list[Any], *, instances: int, broker: Broker
) -> float:
    """``items`` split over ``instances`` router processes routing at the same time, as
    concurrent Lambda invocations do; msgs/s of them together, from the common start to the
    last one's end. Each connects and warms up before the clock starts."""
    start = multiprocessing.Event()
    results: Any = multiprocessing.Queue()  # "ready", then an end time or what failed
    share = len(items) // instances
    workers = [
        multiprocessing.Process(
            target=_route_share,
            args=(vhost, key),
            kwargs={
                "broker": broker,
                "items": items[i * share : (i + 1) * share],
                "start": start,
                "results": results,
            },
        )
        for i in range(instances)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready = results.get(timeout=60)
            if ready != "ready":
                raise RuntimeError(f"a router instance failed before the start: {ready}")
        started = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        start.set()
        finished: list[float | str] = [results.get(timeout=300) for _ in workers]
    finally:
        start.set()
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    failures = [end for end in finished if isinstance(end, str)]
    if failures:
        raise RuntimeError(f"a router instance failed: {failures}")
    ends = [end for end in finished if isinstance(end, float)]
    return share * instances / (max(ends) - started)


def _route_share(
    vhost: str, key: str, *, broker: Broker, items: list[Any], start: Any, results: Any
) -> None:
    """One instance of ``_route_concurrently``: puts "ready", then its end time, or what failed
    (the rejections' reasons, or the error) instead of either."""
    try:
        router = build_router(vhost, key, broker)
        _check_routed(
            router.route([message(FANOUT_TOPIC, classification="internal")], source="academic")
        )
        results.put("ready")
        start.wait()
        for offset in range(0, len(items), 500):
            _check_routed(router.route(items[offset : offset + 500], source="academic"))
    except Exception as error:  # reported to the parent, which raises it
        results.put(f"{type(error).__name__}: {error}")
        return
    results.put(time.monotonic())


def bench_restricted_vs_esdk(count: int = 3_000, rounds: int = 3) -> Iterator[Figure]:
    """Restricted messages through the router against the Encryption SDK's own encryption of
    the same payloads alone, on the shared broker."""
    rates = _restricted_and_esdk(SHARED, count=count, rounds=rounds)
    yield "esdk_encrypt_msgs_per_s", rates["esdk"], "msg/s"
    yield "cipher_encrypt_msgs_per_s", rates["cipher"], "msg/s"
    yield "router_restricted_msgs_per_s", rates["router"], "msg/s"
    yield "router_restricted_vs_esdk", rates["router"] / rates["esdk"], "ratio"
    yield "router_restricted_vs_cipher", rates["router"] / rates["cipher"], "ratio"


def bench_restricted_vs_esdk_own_core(count: int = 3_000, rounds: int = 3) -> Iterator[Figure]:
    """The same comparison with the broker on a core of its own (see ``own_core``)."""
    with own_core() as broker:
        rates = _restricted_and_esdk(broker, count=count, rounds=rounds)
    yield "own_core_esdk_encrypt_msgs_per_s", rates["esdk"], "msg/s"
    yield "own_core_router_restricted_msgs_per_s", rates["router"], "msg/s"
    yield "own_core_router_restricted_vs_esdk", rates["router"] / rates["esdk"], "ratio"


def _restricted_and_esdk(broker: Broker, *, count: int, rounds: int) -> dict[str, float]:
    """The best of ``rounds`` alternating rounds a side, in msgs/s: the SDK's encryptor
    (``sdk_encryptor``), the router's cipher alone, and the router, each side after the queues
    are purged and the broker is quiet."""
    from fabric.adapters.esdk import EsdkCipher
    from fabric.protection import encryption_context

    with fabric_vhost(broker) as vhost, moto_kms() as key:
        router = build_router(vhost, key, broker)
        items = [
            message("case.assessment.updated", classification="restricted") for _ in range(count)
        ]
        # Connect, import the SDK, cache a key.
        _check_routed(router.route(items[:50], source="government"))
        payloads = [json.dumps(item["payload"]).encode() for item in items]
        contexts = [
            encryption_context(message_id=i["message_id"], source="government", environment="b")
            for i in items
        ]
        sdk, cipher = sdk_encryptor(key), EsdkCipher(key)
        # The reference writes what the cipher reads: the same encryption, by the SDK itself.
        if cipher.decrypt(sdk(payloads[0], contexts[0]), contexts[0]) != payloads[0]:
            raise RuntimeError("the SDK reference and the cipher disagree")
        cipher.encrypt(payloads[0], contexts[0])
        cpu = _CpuMeter(_broker_pid(broker))
        rates: dict[str, list[float]] = {}

        def fresh() -> None:  # before every side: empty queues and a broker gone quiet
            purge(vhost, ["fabric.government", "fabric.audit"], broker)
            cpu.wait_for_quiet_broker()

        for _ in range(rounds):
            for side, encrypt in (("esdk", sdk), ("cipher", cipher.encrypt)):
                fresh()
                started = time.perf_counter()
                for payload, context in zip(payloads, contexts, strict=True):
                    encrypt(payload, context)
                rates.setdefault(side, []).append(count / (time.perf_counter() - started))
            fresh()
            started = time.perf_counter()
            for start in range(0, count, 500):
                _check_routed(router.route(items[start : start + 500], source="government"))
            rates.setdefault("router", []).append(count / (time.perf_counter() - started))
    return {side: max(values) for side, values in rates.items()}


def sdk_encryptor(key_arn: str) -> Callable[[bytes, dict[str, str]], bytes]:
    """The Encryption SDK's own encryptor (``EncryptionSDKClient.encrypt``) behind the SDK's
    caching CMM at ``EsdkCipher``'s settings: the same suite, strict KMS provider and data-key
    limits, with ``fabric:message_id`` kept out of the cache key and KMS as the cipher keeps
    it, so one data key serves the whole run on both sides. ``EsdkCipher.encrypt`` did exactly
    this until it wrote its messages itself."""
    import attr
    import aws_encryption_sdk
    from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
    from aws_encryption_sdk.materials_managers.base import CryptoMaterialsManager
    from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager

    from fabric.adapters import esdk

    caching = CachingCryptoMaterialsManager(
        master_key_provider=aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[key_arn]),
        cache=LocalCryptoMaterialsCache(esdk.DEFAULT_CACHE_CAPACITY),
        max_age=esdk.DEFAULT_MAX_AGE_SECONDS,
        max_messages_encrypted=esdk.DEFAULT_MAX_MESSAGES_ENCRYPTED,
    )

    class MessageScoped(CryptoMaterialsManager):  # type: ignore[misc]
        def get_encryption_materials(self, request: Any) -> Any:
            scoped, shared = esdk._split(request.encryption_context)  # as the cipher splits it
            found = caching.get_encryption_materials(
                attr.evolve(request, encryption_context=shared)
            )
            return attr.evolve(found, encryption_context={**found.encryption_context, **scoped})

        def decrypt_materials(self, request: Any) -> Any:
            raise NotImplementedError("the reference only encrypts")

    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT,
        max_encrypted_data_keys=1,
    )
    materials = MessageScoped()

    def encrypt(plaintext: bytes, context: dict[str, str]) -> bytes:
        ciphertext, _header = client.encrypt(
            source=plaintext,
            encryption_context=context,
            materials_manager=materials,
            algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        )
        return bytes(ciphertext)

    return encrypt


def _drain(vhost: str, queue: str, stop: Any, drained: Any, broker: Broker) -> None:
    """Another process: consume the bulk backlog as fast as a consumer does (prefetch 500)."""
    connection = pika.BlockingConnection(broker.parameters(vhost))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=_DRAIN_PREFETCH)

    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        ch.basic_ack(method.delivery_tag)
        with drained.get_lock():
            drained.value += 1

    channel.basic_consume(queue, on_message)
    while not stop.is_set():
        connection.process_data_events(time_limit=0.1)
    connection.close()


def _consume_emergencies(vhost: str, ready: Any, stop: Any, arrivals: Any, broker: Broker) -> None:
    """Another process, as a stakeholder's consumer is: report when each emergency arrives.

    Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process).
    """
    connection = pika.BlockingConnection(broker.parameters(vhost))
    channel = connection.channel()

    def on_message(ch: Any, method: Any, properties: Any, _body: bytes) -> None:
        arrivals.put((properties.message_id, time.monotonic()))
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume("fabric.government.emergency", on_message)
    ready.set()
    while not stop.is_set():
        connection.process_data_events(time_limit=0.05)
    connection.close()


def _load_backlog(vhost: str, backlog: int, broker: Broker) -> None:
    """``backlog`` bulk messages into ``fabric.media``, every one confirmed and routed (raw
    pika fails on a nack or a return), and the queue's depth checked afterwards."""
    from fabric.envelope import validate_envelope
    from fabric.topology import INGRESS_EXCHANGE, delivery_headers

    envelope = validate_envelope(
        message(BULK_TOPIC, priority="bulk", classification="public"), "government"
    )
    raw_publish(
        vhost,
        exchange=INGRESS_EXCHANGE,
        routing_key=BULK_TOPIC,
        bodies=[envelope.to_json_bytes()] * backlog,  # type: ignore[union-attr]
        headers=delivery_headers(envelope),  # type: ignore[arg-type]
        broker=broker,
    )
    connection = pika.BlockingConnection(broker.parameters(vhost))
    depth = connection.channel().queue_declare(BULK_QUEUE, passive=True).method.message_count
    connection.close()
    if depth != backlog:
        raise RuntimeError(f"{BULK_QUEUE} holds {depth} messages after loading {backlog}")


# The stored size of the router's alerts: a 512-byte payload, encrypted (an unsigned Encryption
# SDK message, base64) inside its envelope.
_SEALED_ALERT_BYTES = 1572

BULK_QUEUE = "fabric.media"
# Loaded on top of the backlog the figure claims, so that it is still waiting at the last alert:
# the bulk consumer drained up to 172,000 messages during a run on this machine (up to about
# 20,000 msg/s for the 4 to 8 s the alerts take).
_DRAIN_HEADROOM = 200_000
_DRAIN_PREFETCH = 500  # delivered to the bulk consumer, not yet acknowledged: not waiting


def bench_emergency_latency(backlog: int = 100_000, alerts: int = 300) -> Iterator[Figure]:
    """Emergency end-to-end latency while a bulk backlog of at least ``backlog`` messages is
    being drained: ``backlog`` plus a headroom is loaded, and no figure comes out unless at
    least ``backlog`` were still waiting when the last alert was sent."""
    yield from _emergency_latency(SHARED, backlog=backlog, alerts=alerts)


def bench_emergency_latency_own_core(backlog: int = 100_000, alerts: int = 300) -> Iterator[Figure]:
    """The same with the broker on a core of its own (see ``own_core``); the router, raw pika,
    the emergency consumer and the bulk consumer share the other core."""
    with own_core() as broker:
        for name, value, unit in _emergency_latency(broker, backlog=backlog, alerts=alerts):
            yield f"own_core_{name}", value, unit


def _emergency_latency(broker: Broker, *, backlog: int, alerts: int) -> Iterator[Figure]:
    loaded = backlog + _DRAIN_HEADROOM
    with fabric_vhost(broker) as vhost, moto_kms() as key:
        _load_backlog(vhost, loaded, broker)
        router = build_router(vhost, key, broker)
        ready, stop_consumer = multiprocessing.Event(), multiprocessing.Event()
        queue: Any = multiprocessing.Queue()
        consumer = multiprocessing.Process(
            target=_consume_emergencies, args=(vhost, ready, stop_consumer, queue, broker)
        )
        consumer.start()
        ready.wait(10)
        stop_drain = multiprocessing.Event()
        drained = multiprocessing.Value("i", 0)
        drainer = multiprocessing.Process(
            target=_drain, args=(vhost, BULK_QUEUE, stop_drain, drained, broker)
        )
        drainer.start()
        _check_routed(
            router.route(
                [message(EMERGENCY_TOPIC, priority="emergency", classification="restricted")],
                source="community",
            )
        )  # warm: connection, data key
        raw = _RawEmergencyPublisher(vhost, body_bytes=_SEALED_ALERT_BYTES, broker=broker)
        drained_at_first = drained.value
        sent, raw_sent = _alternate_alerts(router, raw, alerts)
        drained_at_last = drained.value
        raw.close()
        sent_ids = set(sent) | set(raw_sent)
        arrivals: dict[str, float] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not sent_ids <= set(arrivals):
            with contextlib.suppress(queue_module.Empty):
                message_id, at = queue.get(timeout=0.1)
                arrivals.setdefault(message_id, at)
        stop_drain.set()
        drainer.join(10)
        stop_consumer.set()
        consumer.join(5)
    # Waiting in the queue: loaded, less what the consumer acknowledged and what it holds.
    backlog_at_first = loaded - drained_at_first - _DRAIN_PREFETCH
    backlog_at_last = loaded - drained_at_last - _DRAIN_PREFETCH
    if drained_at_last == drained_at_first:
        raise RuntimeError("the bulk consumer drained nothing during the alerts")
    if backlog_at_last < backlog:
        raise RuntimeError(
            f"only {backlog_at_last} bulk messages were waiting at the last alert, not the "
            f"{backlog} the figure claims ({drained_at_last} of {loaded} drained): load more"
        )
    latencies = _latencies(sent, arrivals)
    raw_latencies = _latencies(raw_sent, arrivals)
    yield "emergency_p50_ms", statistics.median(latencies), "ms"
    yield "emergency_p99_ms", latencies[int(len(latencies) * 0.99) - 1], "ms"
    yield "emergency_raw_p50_ms", statistics.median(raw_latencies), "ms"
    yield "emergency_raw_p99_ms", raw_latencies[int(len(raw_latencies) * 0.99) - 1], "ms"
    yield "emergency_backlog_at_first_alert_msgs", float(backlog_at_first), "msgs"
    yield "emergency_backlog_min_msgs", float(backlog_at_last), "msgs"
    yield "emergency_backlog_drained_during_run", float(drained_at_last - drained_at_first), "msgs"


def _alternate_alerts(
    router: Any, raw: _RawEmergencyPublisher, alerts: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``alerts`` through the router and as many raw pika publishes, alternating 5 ms apart so
    both see the same load; when each was sent (``time.monotonic()``), by message id."""
    sent: dict[str, float] = {}
    raw_sent: dict[str, float] = {}
    for _ in range(alerts):
        alert = message(EMERGENCY_TOPIC, 512, priority="emergency", classification="restricted")
        started = time.monotonic()
        _check_routed(router.route([alert], source="community"))
        sent[alert["message_id"]] = started
        time.sleep(0.005)
        message_id = str(uuid.uuid4())
        raw_sent[message_id] = time.monotonic()
        raw.publish(message_id)
        time.sleep(0.005)
    return sent, raw_sent


def _latencies(sent: dict[str, float], arrivals: dict[str, float]) -> list[float]:
    latencies = sorted((arrivals[m] - t) * 1000 for m, t in sent.items() if m in arrivals)
    if len(latencies) < len(sent):
        raise RuntimeError(f"only {len(latencies)} of {len(sent)} emergencies arrived")
    return latencies


class _RawEmergencyPublisher:
    """The broker's own floor for the emergency path: raw pika with a confirm per message (all
    a single message can get), to the same exchange with the same headers, so into the same
    emergency queues, with a body the size of the router's encrypted alerts."""

    def __init__(self, vhost: str, *, body_bytes: int, broker: Broker) -> None:
        from fabric.envelope import validate_envelope
        from fabric.topology import INGRESS_EXCHANGE, delivery_headers

        def alert(size: int) -> Any:
            item = message(EMERGENCY_TOPIC, size, priority="emergency", classification="restricted")
            return validate_envelope(item, "community")

        envelope = alert(body_bytes - len(alert(0).to_json_bytes()))
        self._body = envelope.to_json_bytes()
        self._headers = delivery_headers(envelope)
        self._exchange = INGRESS_EXCHANGE  # the router's own first hop (bootstrap.exchange_for)
        self._connection = pika.BlockingConnection(broker.parameters(vhost))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def publish(self, message_id: str) -> None:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            headers=dict(self._headers),
        )
        self._channel.basic_publish(
            self._exchange, EMERGENCY_TOPIC, self._body, properties, mandatory=True
        )

    def close(self) -> None:
        self._connection.close()


# Run in a fresh interpreter started with -I -S: no site-packages, no PYTHON* variables. The
# handler and the layers are the only places imports come from besides the standard library.
_COLD_INIT = """
import os, sys, time
if sys.version_info[:2] != (3, 14):
    raise SystemExit(f"Python {{sys.version}}, not Lambda's 3.14")
sys.dont_write_bytecode = True  # /var/task and /opt are read-only on Lambda
sys.pycache_prefix = {pycache_prefix!r}
sys.path[:0] = {path!r}
os.environ.update({env!r})
started = time.perf_counter()
import handler
elapsed = (time.perf_counter() - started) * 1000
files = [getattr(module, "__file__", None) or "" for module in list(sys.modules.values())]
stray = [file for file in files if "site-packages" in file]
if stray:
    raise SystemExit(f"imported from a site-packages: {{stray[:3]}}")
print(elapsed)
"""


def bench_cold_init(runs: int = 5) -> Iterator[Figure]:
    """Import of the router handler + bootstrap in a fresh CPython 3.14 (Lambda's runtime
    version, see scripts/build_assets.py), from the built layers, as Lambda's cold start does
    it; median of ``runs``.

    ``router_cold_init_ms``: the layers as built, with their 3.14 bytecode, and the standard
    library's own, as in Lambda's runtime. ``router_cold_init_nocache_ms``: nothing
    precompiled at all, every module compiled (an empty pycache prefix): what a layer without
    bytecode would cost, an upper bound."""
    import build_assets  # scripts/ is on sys.path when bench.py runs

    runtime = build_assets.runtime_python()
    if runtime is None:
        raise RuntimeError("no CPython 3.14 to measure the cold start with (build_assets)")
    # The deps layer is for arm64; its pins for this machine's CPU, compiled alike.
    layers = [build_assets.build_fabric(), build_assets.build_host_dependencies()]
    with tempfile.TemporaryDirectory(prefix="bench-cold-init-") as scratch:
        task = Path(scratch) / "task"  # the function's code alone, as in /var/task
        task.mkdir()
        shutil.copy(ROOT / "lambdas" / "router" / "handler.py", task)
        path = [str(task), *(str(layer / "python") for layer in layers)]
        for layer in layers:
            if next(layer.rglob(f"*.{build_assets.CACHE_TAG}.pyc"), None) is None:
                raise RuntimeError(f"{layer} holds no bytecode for Lambda's Python 3.14")
        empty = Path(scratch) / "pycache"
        empty.mkdir()
        yield "router_cold_init_ms", _cold_init_ms(runtime, path, None, runs), "ms"
        yield "router_cold_init_nocache_ms", _cold_init_ms(runtime, path, str(empty), runs), "ms"


def _cold_init_ms(
    runtime: Sequence[str], path: list[str], pycache_prefix: str | None, runs: int
) -> float:
    """The median of ``runs`` cold inits by ``runtime`` with ``path`` before the standard
    library."""
    env = {
        "FABRIC_ENV": "bench",
        "RABBITMQ_HOST": "b-0000.mq.ap-southeast-3.amazonaws.com",
        "RABBITMQ_PORT": "5671",
        "RABBITMQ_TLS": "true",
        "RABBITMQ_SECRET_ARN": f"arn:aws:secretsmanager:{REGION}:111111111111:secret:platform",
        "MESSAGES_KEY_ARN": f"arn:aws:kms:{REGION}:111111111111:key/{uuid.uuid4()}",
        "FABRIC_IDENTITY_CLAIM": "fabric:group",
        "FABRIC_INGEST_QUEUE_PREFIX": "fabric-bench-ingest-",
        "FALLBACK_TOPIC_ARN": f"arn:aws:sns:{REGION}:111111111111:fabric-bench-fallback",
        "EMERGENCY_TOPIC_ARN": f"arn:aws:sns:{REGION}:111111111111:fabric-bench-emergency",
    }
    code = _COLD_INIT.format(pycache_prefix=pycache_prefix, path=path, env=env)
    timings = []
    for _ in range(runs):
        result = subprocess.run(
            [*runtime, "-I", "-S", "-c", code],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cold init failed:\n{result.stderr}{result.stdout}")
        timings.append(float(result.stdout.strip().splitlines()[-1]))
    return statistics.median(timings)


@contextmanager
def moto_fallback() -> Iterator[dict[str, Any]]:
    """moto's SNS/SQS with the fallback topics and one filtered queue per group and path."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": REGION,
        }
    )
    sys.path.insert(0, str(ROOT))
    from moto import mock_aws

    from tests.integration.aws_fallback import create_fallback_path

    with mock_aws():
        import boto3

        yield {
            **create_fallback_path("bench"),
            "kms": boto3.client("kms", region_name=REGION),
        }


def bench_failover(alerts: int = 20) -> Iterator[Figure]:
    """From the broker's failure (a silent black hole) to the first message accepted through
    the fallback; then how fast the drain moves fallback messages back (same run)."""
    sys.path.insert(0, str(ROOT))
    import boto3

    from fabric.adapters.esdk import EsdkCipher
    from fabric.adapters.memory import MemoryAuditSink
    from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
    from fabric.adapters.sns import SnsFallbackTransport
    from fabric.adapters.sqs import SqsFallbackSource
    from fabric.audit_sink import TransportAuditSink
    from fabric.bootstrap import exchange_for
    from fabric.breaker import BreakerTransport
    from fabric.drain import Drainer, FallbackQueue
    from fabric.router import Router
    from fabric.routing import default_routing_table
    from tests.integration.faults import FaultProxy

    with fabric_vhost() as vhost, moto_fallback() as aws:
        proxy = FaultProxy(("127.0.0.1", SHARED.amqp_port))
        rabbit = RabbitMqTransport(
            RabbitSettings("127.0.0.1", proxy.port, lambda: ("guest", "guest"), vhost=vhost),
            exchange_for=exchange_for,
        )
        fallback = SnsFallbackTransport(
            fallback_topic_arn=aws["topics"]["fallback"],
            emergency_topic_arn=aws["topics"]["emergency"],
            client_factory=lambda: boto3.client("sns", region_name=REGION),
        )
        key = aws["kms"].create_key()["KeyMetadata"]["Arn"]
        broker = BreakerTransport(rabbit)
        router = Router(
            table=default_routing_table(),
            transports=[broker, fallback],
            cipher=EsdkCipher(key),
            # As the bootstrap wires it: audit batches through the breaker, so the figure
            # includes what the audit costs a producer during an outage.
            audit=TransportAuditSink([broker], emitted_by="router"),
            environment="bench",
        )
        warm = message(EMERGENCY_TOPIC, priority="emergency", classification="restricted")
        router.route([warm], source="community")
        proxy.blackhole()
        failed_at = time.monotonic()
        first = router.route(
            [message(EMERGENCY_TOPIC, priority="emergency", classification="restricted")],
            source="community",
        )
        first_accept_ms = (time.monotonic() - failed_at) * 1000
        if first.results[0].transport != "fallback":
            raise RuntimeError(f"not failed over: {first.to_dict()}")
        # moto's SQS scans a whole queue on every receive, so a deep queue measures moto, not
        # the drain: 300 parked messages keep the figure about the drain.
        router.route([message(BULK_TOPIC, 512) for _ in range(300)], source="government")
        proxy.close()
        drainer = Drainer(
            queues=[
                FallbackQueue(url=url, group=group, emergency=flow == "emergency")
                for (flow, group), url in aws["queues"].items()
            ],
            source=SqsFallbackSource(lambda: boto3.client("sqs", region_name=REGION)),
            broker=RabbitMqTransport(
                RabbitSettings(
                    "127.0.0.1", SHARED.amqp_port, lambda: ("guest", "guest"), vhost=vhost
                ),
                exchange_for=exchange_for,
            ),
            audit=MemoryAuditSink(),
        )
        started = time.perf_counter()
        report = drainer.drain(max_seconds=120)
        drain_rate = report.total / (time.perf_counter() - started)
        if report.total < 300:
            raise RuntimeError(f"drain moved only {report.total}: {report}")
    yield "failover_first_accept_ms", first_accept_ms, "ms"
    yield "drain_msgs_per_s", drain_rate, "msg/s"


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {
    "router_vs_raw_publish": bench_router_vs_raw,
    "router_vs_raw_publish_own_core": bench_router_vs_raw_own_core,
    "router_restricted_vs_esdk": bench_restricted_vs_esdk,
    "router_restricted_vs_esdk_own_core": bench_restricted_vs_esdk_own_core,
    "emergency_latency": bench_emergency_latency,
    "emergency_latency_own_core": bench_emergency_latency_own_core,
    "router_cold_init": bench_cold_init,
    "failover": bench_failover,
}
