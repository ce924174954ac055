"""Reading a queue's depth on the real local RabbitMQ at the right moment.

What a consumer or a redrive run did not acknowledge goes back to its quorum queue a moment
after the run's channel closes: a depth read at once can miss it. A quorum queue counts every
holder of its messages as a consumer (a subscriber, one cancelled but still holding deliveries,
each ``basic.get`` not yet acknowledged), and gives held messages back in the same step that
drops the count: once ``consumer_count`` is 0 the depth is the whole story.
"""

from __future__ import annotations

import time
from typing import Any

# How long an empty queue must stay empty: a margin beyond the count above, which is exact for
# held messages (they are back within milliseconds of the count dropping).
QUIET_S = 0.25
POLL_S = 0.02


def depth(channel: Any, queue: str) -> int:
    """The queue's ready messages (passive declare)."""
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def settled_depth(channel: Any, queue: str, expected: int, timeout: float = 5.0) -> int:
    """The depth once it reaches ``expected`` (or after ``timeout``): what a run gives back and
    what the broker dead-letters reach a quorum queue asynchronously. For "nothing left", use
    ``settled_empty``: this returns the first 0 it reads, before a message on its way back."""
    if expected == 0:
        raise ValueError("settled_depth cannot wait for an empty queue: use settled_empty")
    deadline = time.monotonic() + timeout
    while (found := depth(channel, queue)) != expected and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return found


def unheld_depth(channel: Any, queue: str, timeout: float = 5.0) -> int:
    """The depth once nothing holds the queue's messages (see the module docstring): every
    letter a finished run or a hand-back gave up is back, or moved on by the broker."""
    deadline = time.monotonic() + timeout
    while True:
        declared = channel.queue_declare(queue, passive=True).method
        if declared.consumer_count == 0:
            return int(declared.message_count)
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{queue}: still {declared.consumer_count} consumer(s) or unacknowledged "
                f"get(s) after {timeout} s: a run that ended did not let go of its messages"
            )
        time.sleep(POLL_S)


def settled_empty(channel: Any, *queues: str, timeout: float = 5.0) -> None:
    """Fail unless each queue is empty once nothing holds its messages, and stays empty for
    ``QUIET_S``: nothing left unacknowledged by the run that just ended, nothing on its way."""
    for queue in queues:
        found = unheld_depth(channel, queue, timeout)
        assert found == 0, f"{queue} holds {found} message(s) once its consumers are gone"
    quiet_until = time.monotonic() + QUIET_S
    while time.monotonic() < quiet_until:
        time.sleep(POLL_S)
        for queue in queues:
            declared = channel.queue_declare(queue, passive=True).method
            assert (declared.message_count, declared.consumer_count) == (0, 0), (
                f"{queue} did not stay empty: {declared.message_count} message(s), "
                f"{declared.consumer_count} consumer(s) within {QUIET_S} s"
            )
