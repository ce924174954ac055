"""Consumer benchmark: a stakeholder work queue drained by the consumer toolkit.

``consumer_msgs_per_s``: 20,000 bulk messages of 1 KiB, loaded into ``fabric.media``, consumed by
``fabric.adapters.rabbitmq_consumer.RabbitMqConsumer`` as a stakeholder runs it (its default
prefetch of 20, a handler that does nothing, no idempotency table), with its audit batches on the
audit exchange. ``consumer_broker_cpu_us_per_msg``: the broker's CPU during the run, per message:
what a draining consumer costs the broker that also carries the emergencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from bench_router import SHARED, _broker_pid, _CpuMeter, _load_backlog, fabric_vhost

Figure = tuple[str, float, str]


def bench_consumer_drain(count: int = 20_000) -> Iterator[Figure]:
    from fabric.adapters.rabbitmq import RabbitSettings
    from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
    from fabric.consumer import MessageProcessor

    with fabric_vhost() as vhost:
        _load_backlog(vhost, count, SHARED)
        cpu = _CpuMeter(_broker_pid(SHARED))
        cpu.wait_for_quiet_broker()
        settings = RabbitSettings(
            "127.0.0.1", SHARED.amqp_port, lambda: ("guest", "guest"), vhost=vhost
        )
        consumer = RabbitMqConsumer(settings, "fabric.media", MessageProcessor(lambda _d: None))
        with cpu.measure("consumer", count):
            started = time.perf_counter()
            counts = consumer.run(max_messages=count, idle_timeout_s=5)
            elapsed = time.perf_counter() - started
    if counts != {"done": count}:
        raise RuntimeError(f"the consumer did not settle every message: {dict(counts)}")
    yield "consumer_msgs_per_s", count / elapsed, "msg/s"
    yield "consumer_broker_cpu_us_per_msg", cpu.per_message()["consumer_broker_cpu_us"], "us/msg"


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {"consumer_drain": bench_consumer_drain}
