"""RabbitMQ topology (management-API definitions) and SNS filter policies from the routing table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fabric.envelope import Envelope
from fabric.routing import Delivery, Route, RoutingTable
from fabric.stakeholders import STAKEHOLDERS, Stakeholder

# Exchanges live under `fabric.x.`, queues directly under `fabric.`, so a permission regex on
# queue names (which RabbitMQ also applies to exchange names) can never reach an exchange.
INGRESS_EXCHANGE = "fabric.x.ingress"
UNROUTED_EXCHANGE = "fabric.x.unrouted"
EMERGENCY_EXCHANGE = "fabric.x.emergency"
DEAD_LETTER_EXCHANGE = "fabric.x.dlx"
REDELIVER_EXCHANGE = "fabric.x.redeliver"
AUDIT_EXCHANGE = "fabric.x.audit"
# Where a terminal queue's letter goes when it reaches the delivery limit, and the way back.
OVERFLOW_EXCHANGE = "fabric.x.overflow"
OVERFLOW_RETURN_EXCHANGE = "fabric.x.overflow.return"
UNROUTED_QUEUE = "fabric.unrouted"
AUDIT_QUEUE = "fabric.audit"
OVERFLOW_QUEUE = "fabric.overflow"
PLATFORM_USER = "fabric-platform"
# What the platform user (the router, the drain and the replay) publishes to: routed messages,
# unroutable ones, audit batches, and redelivered letters and the drain's probes
# (fabric.bootstrap.exchange_for). It reads no queue.
PLATFORM_EXCHANGES = (
    INGRESS_EXCHANGE,
    UNROUTED_EXCHANGE,
    AUDIT_EXCHANGE,
    REDELIVER_EXCHANGE,
)
# The redrive's own user: it reads every dead-letter queue and the overflow queue
# (redrive_queues()) and publishes letters back through the redeliver and overflow-return
# exchanges, and its audit batches. The queues it reads it can purge too (RabbitMQ checks
# queue.purge against read): that is why the router, which takes what any producer sends, is
# not this user.
REDRIVE_USER = "fabric-redrive"
REDRIVE_EXCHANGES = (REDELIVER_EXCHANGE, OVERFLOW_RETURN_EXCHANGE, AUDIT_EXCHANGE)
# The audit writer's event source (Lambda's Amazon MQ poller): reads fabric.audit, writes nothing.
AUDIT_READER_USER = "fabric-audit-reader"
# The users whose audit batches the audit writer takes whatever events they record (everyone
# else: a stakeholder group's consumer events only). The redrive is one because it puts the
# platform's overflowed audit batches back under its own user-id (RabbitMQ lets a user publish
# only its own): fabric.adapters.rabbitmq_overflow.
TRUSTED_AUDIT_PUBLISHERS = (PLATFORM_USER, REDRIVE_USER)
# Reads queue depths for the dead-letter alarms (fabric.broker_depth), nothing else: tag
# `management` (the management API, own vhosts only; `monitoring` would add every vhost's
# connections and channels and the node's details) and permissions that match no name. RabbitMQ
# lists a vhost's queues only to a user with some permission on it (checked on 3.10: 401
# without one), and `^$` lets it configure, write and read nothing.
MONITOR_USER = "fabric-monitor"
MONITOR_TAGS = ("management",)
NO_RESOURCE = "^$"

# Audience gate: every group queue sits behind a headers exchange that admits a message carrying
# `fabric-audience: all` (no audience given: the bindings alone decide) or `fabric-to-<group>:
# yes` (the producer's audience names the group). `delivery_headers` sets them.
AUDIENCE_HEADER = "fabric-audience"
ALL_AUDIENCE = "all"
SNS_AUDIENCE_ATTRIBUTE = "audience"

RETRY_TIERS_SECONDS = (5, 30, 300)
EMERGENCY_RETRY_TIERS_SECONDS = (1, 5, 30)

# Headers the consumer toolkit and the redrive put on messages they republish (producers may not
# set `fabric-` headers, so these cannot be forged through the router).
ATTEMPT_HEADER = "fabric-attempt"  # the attempt a delivery is (1 = first), set on retries
DEAD_LETTER_REASON_HEADER = "fabric-dead-letter-reason"  # why a consumer parked it
DEAD_LETTERED_AT_HEADER = "fabric-dead-lettered-at"  # when, epoch seconds
ERROR_HEADER = "fabric-error"  # the exception class that failed the last attempt
REDRIVES_HEADER = "fabric-redrives"  # how many times it was redriven
REPLAY_HEADER = "fabric-replay"  # the replay id of a message re-published from the archive

# RabbitMQ 3.10 has no default delivery limit and 4.x defaults to 20; set it explicitly.
DELIVERY_LIMIT = 10
# Terminal queues (DLQs, unrouted, audit) are read again and again: every redrive run, dry run or
# audit writer failure hands letters back, and each hand-back counts as a delivery. "Unlimited"
# (-1) is a 4.x notion (3.10 refuses it, and 4.x defaults to 20 without a limit), so the limit
# is a high explicit one, and a letter that reaches it is dead-lettered, at least once, into the
# overflow queue instead of being dropped (alarmed on; the redrive puts it back).
TERMINAL_DELIVERY_LIMIT = 1000
# The overflow queue has nowhere to dead-letter to, so its limit must never be reached; yet every
# redrive run of it (dry runs, filtered runs, chunks) hands letters back. One billion: a dry run
# every second would take 31 years to drop a letter. 3.10, which has no "unlimited", takes any
# non-negative integer (checked on the drills' 3.10.8); this one fits a signed 32-bit field too.
OVERFLOW_DELIVERY_LIMIT = 1_000_000_000
MAX_LENGTH = 500_000
EMERGENCY_MAX_LENGTH = 100_000
TERMINAL_MAX_LENGTH = 1_000_000
MAX_LENGTH_BYTES = 2 * 1024**3


def queue_name(group: Stakeholder, *, emergency: bool = False) -> str:
    """The work queue a group consumes: `fabric.<group>` or `fabric.<group>.emergency`."""
    return f"fabric.{group}.emergency" if emergency else f"fabric.{group}"


def routed_queues(deliveries: Iterable[Delivery]) -> tuple[str, ...]:
    """The queues the broker's bindings put a message with these deliveries in, sorted: the
    unrouted queue when there are none (the ingress exchange's alternate exchange)."""
    return tuple(sorted(queue_name(d.group, emergency=d.emergency) for d in deliveries)) or (
        UNROUTED_QUEUE,
    )


def dead_letter_queue_name(group: Stakeholder, *, emergency: bool = False) -> str:
    """The dead-letter queue behind a work queue: `<work queue>.dlq`."""
    return queue_name(group, emergency=emergency) + ".dlq"


def work_queue_of(dead_letter_queue: str) -> str:
    """The work queue whose dead letters ``dead_letter_queue`` holds.

    Raises:
        ValueError: the name is not a group's dead-letter queue.
    """
    for group in STAKEHOLDERS:
        for emergency in (False, True):
            if dead_letter_queue_name(group, emergency=emergency) == dead_letter_queue:
                return queue_name(group, emergency=emergency)
    raise ValueError(f"{dead_letter_queue!r} is not a dead-letter queue of the fabric")


def retry_tiers(*, emergency: bool) -> tuple[int, ...]:
    """The delay tiers, in seconds, of the normal or the emergency path."""
    return EMERGENCY_RETRY_TIERS_SECONDS if emergency else RETRY_TIERS_SECONDS


def retry_exchange_name(group: Stakeholder) -> str:
    """The exchange a group's consumers publish retries to: `fabric.x.retry.<group>`."""
    return f"fabric.x.retry.{group}"


def retry_queue_name(group: Stakeholder, seconds: int, *, emergency: bool = False) -> str:
    """A delay-tier queue that returns messages to their work queue after `seconds`.

    Publish to `retry_exchange_name(group)` with this name as routing key.

    Raises:
        ValueError: `seconds` is not one of the tiers for that path.
    """
    tiers = retry_tiers(emergency=emergency)
    if seconds not in tiers:
        raise ValueError(f"retry tier {seconds}s is not one of {tiers}")
    return f"{queue_name(group, emergency=emergency)}.retry.{seconds}s"


def group_exchange_name(group: Stakeholder, *, emergency: bool = False) -> str:
    """The audience gate in front of a group queue: `fabric.x.group.<group>[.emergency]`."""
    suffix = ".emergency" if emergency else ""
    return f"fabric.x.group.{group}{suffix}"


def route_exchange_name(route: Route) -> str:
    """The headers exchange that evaluates a header route: `fabric.x.route.<route name>`."""
    return f"fabric.x.route.{route.name}"


def user_name(group: Stakeholder) -> str:
    """The broker user of a stakeholder group: `fabric-<group>`."""
    return f"fabric-{group}"


def audience_gate_header(group: Stakeholder) -> str:
    """The header that admits a message with an audience through a group's gate."""
    return f"fabric-to-{group}"


def delivery_headers(envelope: Envelope) -> dict[str, str]:
    """The AMQP headers to publish an envelope with: its own headers plus the audience gate.

    They cannot clash: envelope headers may not start with `fabric-`.
    """
    headers = dict(envelope.headers)
    if envelope.audience is None:
        headers[AUDIENCE_HEADER] = ALL_AUDIENCE
    else:
        headers.update({audience_gate_header(group): "yes" for group in envelope.audience})
    return headers


def sns_filter_policy(group: Stakeholder) -> dict[str, list[str]]:
    """The SNS subscription filter policy of a group's fallback queue.

    The router sets the `audience` message attribute (String.Array) to the groups
    `RoutingTable.resolve` returns, so this is the fallback twin of the group's bindings.
    """
    return {SNS_AUDIENCE_ATTRIBUTE: [group.value]}


def _queue(name: str, vhost: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": {"x-queue-type": "quorum", **arguments},
    }


def _work_queue_arguments(name: str, max_length: int) -> dict[str, Any]:
    return {
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": max_length,
        "x-max-length-bytes": MAX_LENGTH_BYTES,
    }


def _terminal_queue_arguments(name: str, delivery_limit: int) -> dict[str, Any]:
    # The routing key names the queue, so the return exchange can put the letter back there.
    return {
        **_end_queue_arguments(delivery_limit),
        "x-dead-letter-exchange": OVERFLOW_EXCHANGE,
        "x-dead-letter-routing-key": name,
        "x-dead-letter-strategy": "at-least-once",
    }


def _end_queue_arguments(delivery_limit: int) -> dict[str, Any]:
    """What the terminal queues and the overflow queue share: the length limits, and a delivery
    limit that is explicit (4.x would give 20 without one)."""
    return {
        "x-delivery-limit": delivery_limit,
        "x-overflow": "reject-publish",
        "x-max-length": TERMINAL_MAX_LENGTH,
        "x-max-length-bytes": MAX_LENGTH_BYTES,
    }


def dead_letter_queues() -> tuple[str, ...]:
    """Every group's two dead-letter queues (work and emergency)."""
    return tuple(
        dead_letter_queue_name(group, emergency=emergency)
        for group in STAKEHOLDERS
        for emergency in (False, True)
    )


def terminal_queues() -> tuple[str, ...]:
    """The queues that dead-letter into the overflow queue when a letter reaches their delivery
    limit: the unrouted and audit queues and every dead-letter queue."""
    return (UNROUTED_QUEUE, AUDIT_QUEUE, *dead_letter_queues())


def redrive_queues() -> tuple[str, ...]:
    """The queues the redrive user reads: the overflow queue and every dead-letter queue."""
    return (OVERFLOW_QUEUE, *dead_letter_queues())


def _exchange(
    name: str,
    kind: str,
    vhost: str,
    *,
    internal: bool = False,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": internal,
        "arguments": arguments or {},
    }


def _binding(
    source: str,
    destination: str,
    vhost: str,
    *,
    to_queue: bool,
    routing_key: str = "",
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": "queue" if to_queue else "exchange",
        "routing_key": routing_key,
        "arguments": arguments or {},
    }


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def _exactly(names: Iterable[str]) -> str:
    """A permission regex that matches these names and nothing else."""
    return f"^(?:{'|'.join(_escape(name) for name in names)})$"


def _permission(
    user: str, vhost: str, *, write: Iterable[str], read: Iterable[str]
) -> dict[str, Any]:
    """A user's permissions on ``vhost``: configure nothing, write and read exactly these
    names (none: ``NO_RESOURCE``)."""
    write, read = tuple(write), tuple(read)
    return {
        "user": user,
        "vhost": vhost,
        "configure": NO_RESOURCE,
        "write": _exactly(write) if write else NO_RESOURCE,
        "read": _exactly(read) if read else NO_RESOURCE,
    }


def definitions(
    table: RoutingTable,
    *,
    vhost: str = "/",
    terminal_delivery_limit: int = TERMINAL_DELIVERY_LIMIT,
) -> dict[str, Any]:
    """The complete topology as a RabbitMQ definitions document for one vhost.

    Contains exchanges, quorum queues (with explicit arguments), bindings, users (the platform,
    the redrive, the audit reader, one per group, and the monitor; no password fields: the
    applier adds credentials from its secret store) and permissions. Deterministic: the same
    table always yields the same document. Uses nothing newer than RabbitMQ 3.10.
    ``terminal_delivery_limit`` is the delivery limit of the terminal queues (drills lower it
    to reach it quickly; deployments keep the default); the overflow queue's stays
    ``OVERFLOW_DELIVERY_LIMIT``.

    Raises:
        ValueError: ``terminal_delivery_limit`` is less than 1.
    """
    if terminal_delivery_limit < 1:
        raise ValueError(f"terminal delivery limit {terminal_delivery_limit} is not positive")
    limit = terminal_delivery_limit
    exchanges = [
        _exchange(
            INGRESS_EXCHANGE, "topic", vhost, arguments={"alternate-exchange": UNROUTED_EXCHANGE}
        ),
        _exchange(UNROUTED_EXCHANGE, "fanout", vhost),
        # Publishable, so a producer path can target it directly; what matches no emergency
        # route still lands in the unrouted queue.
        _exchange(
            EMERGENCY_EXCHANGE, "topic", vhost, arguments={"alternate-exchange": UNROUTED_EXCHANGE}
        ),
        _exchange(DEAD_LETTER_EXCHANGE, "direct", vhost),
        _exchange(REDELIVER_EXCHANGE, "direct", vhost),
        _exchange(AUDIT_EXCHANGE, "topic", vhost),
        _exchange(OVERFLOW_EXCHANGE, "fanout", vhost),
        # Nothing publishes here in normal operation: the redrive of the overflow queue does,
        # with each letter's routing key (the terminal queue it came from).
        _exchange(OVERFLOW_RETURN_EXCHANGE, "direct", vhost),
    ]
    queues = [
        _queue(UNROUTED_QUEUE, vhost, _terminal_queue_arguments(UNROUTED_QUEUE, limit)),
        _queue(AUDIT_QUEUE, vhost, _terminal_queue_arguments(AUDIT_QUEUE, limit)),
        # The end of the line: no dead-letter exchange, and nothing consumes it; only the
        # redrive peeks it, which its own, far higher, delivery limit allows for.
        _queue(OVERFLOW_QUEUE, vhost, _end_queue_arguments(OVERFLOW_DELIVERY_LIMIT)),
    ]
    bindings = [
        _binding(UNROUTED_EXCHANGE, UNROUTED_QUEUE, vhost, to_queue=True),
        _binding(AUDIT_EXCHANGE, AUDIT_QUEUE, vhost, to_queue=True, routing_key="#"),
        _binding(OVERFLOW_EXCHANGE, OVERFLOW_QUEUE, vhost, to_queue=True),
        *(
            _binding(OVERFLOW_RETURN_EXCHANGE, name, vhost, to_queue=True, routing_key=name)
            for name in terminal_queues()
        ),
    ]
    users: list[dict[str, Any]] = [
        {"name": name, "tags": []} for name in (PLATFORM_USER, REDRIVE_USER, AUDIT_READER_USER)
    ]
    # The topology function declares everything as the administrator; the fabric's functions
    # publish, get, consume and acknowledge, and each permission names only what they use.
    # Configure would let them delete a queue. Read lets them purge a queue too (RabbitMQ checks
    # queue.purge against read): it names only the queues they read and no exchange, as binding
    # and unbinding need read on the source exchange (and write on the destination: they write
    # no queue), so they cannot rewire routes.
    permissions = [
        _permission(PLATFORM_USER, vhost, write=PLATFORM_EXCHANGES, read=()),
        _permission(REDRIVE_USER, vhost, write=REDRIVE_EXCHANGES, read=redrive_queues()),
        _permission(AUDIT_READER_USER, vhost, write=(), read=(AUDIT_QUEUE,)),
    ]
    for group in STAKEHOLDERS:
        _add_group(group, vhost, exchanges, queues, bindings, terminal_delivery_limit=limit)
        users.append({"name": user_name(group), "tags": []})
        # Its work queues; its retry exchange, and the audit exchange for the consumer
        # toolkit's records (user-id validated: the audit writer takes only consumer events).
        permissions.append(
            _permission(
                user_name(group),
                vhost,
                write=(retry_exchange_name(group), AUDIT_EXCHANGE),
                read=(queue_name(group, emergency=e) for e in (False, True)),
            )
        )
    users.append({"name": MONITOR_USER, "tags": list(MONITOR_TAGS)})
    permissions.append(_permission(MONITOR_USER, vhost, write=(), read=()))
    bindings.extend(_route_bindings(table, vhost, exchanges))
    return {
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": permissions,
        "exchanges": exchanges,
        "queues": queues,
        "bindings": _unique(bindings),
    }


def _add_group(
    group: Stakeholder,
    vhost: str,
    exchanges: list[dict[str, Any]],
    queues: list[dict[str, Any]],
    bindings: list[dict[str, Any]],
    *,
    terminal_delivery_limit: int,
) -> None:
    retry_exchange = retry_exchange_name(group)
    exchanges.append(_exchange(retry_exchange, "direct", vhost))
    gate = {"x-match": "any", AUDIENCE_HEADER: ALL_AUDIENCE, audience_gate_header(group): "yes"}
    for emergency in (False, True):
        work = queue_name(group, emergency=emergency)
        dlq = dead_letter_queue_name(group, emergency=emergency)
        gate_exchange = group_exchange_name(group, emergency=emergency)
        exchanges.append(_exchange(gate_exchange, "headers", vhost, internal=True))
        max_length = EMERGENCY_MAX_LENGTH if emergency else MAX_LENGTH
        queues.append(_queue(work, vhost, _work_queue_arguments(work, max_length)))
        queues.append(_queue(dlq, vhost, _terminal_queue_arguments(dlq, terminal_delivery_limit)))
        bindings.append(_binding(gate_exchange, work, vhost, to_queue=True, arguments=gate))
        bindings.append(_binding(DEAD_LETTER_EXCHANGE, dlq, vhost, to_queue=True, routing_key=work))
        bindings.append(_binding(REDELIVER_EXCHANGE, work, vhost, to_queue=True, routing_key=work))
        # A consumer parks a message it gave up on in its own DLQ through its retry exchange (a
        # Lambda consumer cannot reject one message of a batch); it cannot reach another's.
        bindings.append(_binding(retry_exchange, dlq, vhost, to_queue=True, routing_key=dlq))
        for seconds in retry_tiers(emergency=emergency):
            retry = retry_queue_name(group, seconds, emergency=emergency)
            arguments = _work_queue_arguments(work, max_length)
            # Expired retries dead-letter back to their origin work queue, not to the DLQ.
            arguments["x-dead-letter-exchange"] = REDELIVER_EXCHANGE
            arguments["x-message-ttl"] = seconds * 1000
            queues.append(_queue(retry, vhost, arguments))
            bindings.append(
                _binding(retry_exchange, retry, vhost, to_queue=True, routing_key=retry)
            )


def _route_bindings(
    table: RoutingTable, vhost: str, exchanges: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    bindings: list[dict[str, Any]] = []
    for route in table.routes:
        entry = INGRESS_EXCHANGE
        if route.emergency:
            entry = EMERGENCY_EXCHANGE
            bindings.append(
                _binding(
                    INGRESS_EXCHANGE,
                    EMERGENCY_EXCHANGE,
                    vhost,
                    to_queue=False,
                    routing_key=route.pattern,
                )
            )
        gates = [group_exchange_name(g, emergency=route.emergency) for g in sorted(route.groups)]
        if route.headers is None:
            bindings.extend(
                _binding(entry, gate, vhost, to_queue=False, routing_key=route.pattern)
                for gate in gates
            )
            continue
        route_exchange = route_exchange_name(route)
        exchanges.append(_exchange(route_exchange, "headers", vhost, internal=True))
        bindings.append(
            _binding(entry, route_exchange, vhost, to_queue=False, routing_key=route.pattern)
        )
        match = {"x-match": route.headers.mode.value, **dict(route.headers.values)}
        bindings.extend(
            _binding(route_exchange, gate, vhost, to_queue=False, arguments=match) for gate in gates
        )
    return bindings


def _unique(bindings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for binding in bindings:
        key = repr(sorted((k, repr(v)) for k, v in binding.items()))
        if key not in seen:
            seen.add(key)
            out.append(binding)
    return out
