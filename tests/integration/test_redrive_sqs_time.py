"""A redrive run on an SQS that answers every call slowly, each within the client's timeouts,
ends within its time (moto's SQS over HTTP; the dead-letter queue as ``build_redrive`` wires
it, with its own client). The times are the deployed ones (2.5 s a call, a 20 s run) divided
by ``SCALE``, to keep the tests short: what the run does depends only on their ratios.

Before, only its sends stopped at the run's time: a batch of 100 letters is 10 receives, 10
deletes and, at the end, 10 visibility changes, and none of them looked at the clock. A run
with 20 s took about 50 s (a batch of receives, then showing its letters again), and one with
the function's 840 s that held hundreds of letters went past its 900 s timeout, killed with
letters hidden and no report. Now a call begins only if it is expected to end in time, keeping
time to give back (or delete) every letter the run holds: the run stops ``time limit`` within
its time plus one call, with nothing hidden.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sqs.models import sqs_backends

from fabric.adapters import sqs_dlq
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditRecord
from fabric.ports import PreparedAudit
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver
from tests.unit.test_redrive_sqs_client import REGION, _dead_letter_queue, _parked, moto_behind
from tests.unit.test_redrive_sqs_deadline import _counts

pytestmark = pytest.mark.integration

LETTERS = 200
# The run's time and SQS's slowness, scaled down together (``_SETTLE_GRACE_S`` too, where a
# test depends on it): 2.5 s a call and a 20 s run as deployed, 1 s and 8 s here.
SCALE = 2.5
CALL_S = 2.5 / SCALE  # each SQS call answered this late: within the client's 5 s read timeout
BUDGET_S = 20.0 / SCALE
# Python, moto and the machine's load, on top of the calls the run makes.
SLACK_S = 2.0


@dataclass
class Slowness:
    """How late the SQS endpoint answers every call, and the calls it took (by operation)."""

    late_s: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)


def _slow(app: Any, slowness: Slowness) -> Callable[..., Iterable[bytes]]:
    """moto's WSGI app, answering each call ``slowness.late_s`` after it did what it asks."""

    def slow(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).rpartition(".")[2]
        slowness.calls[operation] += 1
        answer: list[Any] = []
        result = app(
            environ, lambda status, headers, exc_info=None: answer.extend([status, headers])
        )
        try:
            body = b"".join(result)
        finally:
            getattr(result, "close", lambda: None)()
        time.sleep(slowness.late_s)
        start_response(*answer)
        return [body]

    return slow


@pytest.fixture
def sqs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Slowness]]:
    """A plain SQS client on the slow endpoint, which every default client now reaches."""
    slowness = Slowness()
    with moto_behind(lambda app: _slow(app, slowness), monkeypatch) as client:
        yield client, slowness


def test_a_run_on_a_slow_sqs_ends_within_its_time(sqs: tuple[Any, Slowness]) -> None:
    client, slowness = sqs
    queue, _ = _parked(client, LETTERS, batched=True)
    slowness.late_s = CALL_S
    audit = MemoryAuditSink()

    started = time.monotonic()
    report = Redriver(ledger=MemoryRedriveLedger(), audit=audit).run(
        _dead_letter_queue(queue), RedrivePlan(max_seconds=BUDGET_S)
    )
    took = time.monotonic() - started

    # Before: 10 receives (25 s in the deployed times, 10 s here), no time left to send, then
    # 10 visibility changes: about 50 s (20 s here), nothing moved.
    assert took <= BUDGET_S + CALL_S + SLACK_S, (took, dict(slowness.calls))
    assert report.stopped == "time limit"
    assert report.moved > 0, "a slow SQS still moves letters"
    assert (len(audit.records), report.hidden) == (report.moved, 0)
    slowness.late_s = 0.0
    assert _counts(client, queue.source_url) == (report.moved, 0)
    assert _counts(client, queue.dlq_url) == (LETTERS - report.moved, 0), "the rest given back"


def test_a_filtered_run_on_a_slow_sqs_shows_what_it_held_again_within_its_time(
    sqs: tuple[Any, Slowness],
) -> None:
    client, slowness = sqs
    queue, _ = _parked(client, LETTERS, batched=True)
    slowness.late_s = CALL_S
    # No letter matches: the run holds each one it looks at until it ends.
    plan = RedrivePlan(selection=RedriveFilter(topics=("sport.#",)), max_seconds=BUDGET_S)

    started = time.monotonic()
    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        _dead_letter_queue(queue), plan
    )
    took = time.monotonic() - started

    # Before: as above, with the letters held shown again after the time was up.
    assert took <= BUDGET_S + CALL_S + SLACK_S, (took, dict(slowness.calls))
    assert (report.stopped, report.scanned > 0, report.moved, report.hidden) == (
        "time limit",
        True,
        0,
        0,
    )
    slowness.late_s = 0.0
    assert _counts(client, queue.dlq_url) == (LETTERS, 0), "every letter visible again"


@dataclass
class _SlowAudit(MemoryAuditSink):
    """An audit sink that takes ``late_s`` to store a batch: the run's time runs out between
    a batch's sends and its deletes."""

    late_s: float = 0.0

    def emit(
        self,
        records: Sequence[AuditRecord],
        bodies: Mapping[str, bytes] | None = None,
        *,
        prepared: PreparedAudit | None = None,
    ) -> bool:
        time.sleep(self.late_s)
        return super().emit(records, bodies, prepared=prepared)


def test_letters_moved_but_not_deleted_in_time_are_only_removed_by_the_next_run(
    sqs: tuple[Any, Slowness], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An audit slower than the grace deletes and visibility changes have past the run's time
    # (25 s as deployed; 5 s in the deployed times, to keep the test short, and scaled here).
    monkeypatch.setattr(sqs_dlq, "_SETTLE_GRACE_S", 5.0 / SCALE)
    client, slowness = sqs
    queue, _ = _parked(client, LETTERS, batched=True)
    slowness.late_s = CALL_S
    ledger = MemoryRedriveLedger()
    audit = _SlowAudit(late_s=BUDGET_S)

    started = time.monotonic()
    report = Redriver(ledger=ledger, audit=audit).run(
        _dead_letter_queue(queue), RedrivePlan(max_seconds=BUDGET_S)
    )
    took = time.monotonic() - started

    # Moved and recorded, then no time left to delete them or to show any letter held again:
    # they stay hidden until their hold ends (the report counts them), and the ledger knows
    # the moved ones.
    assert (report.stopped, report.hidden) == ("time limit", report.scanned)
    assert report.moved > 0
    assert slowness.calls["DeleteMessageBatch"] == 0
    assert took <= 2 * BUDGET_S + CALL_S + SLACK_S, took  # the audit's time, then no call
    slowness.late_s = 0.0
    assert _counts(client, queue.source_url) == (report.moved, 0)
    assert _counts(client, queue.dlq_url) == (LETTERS - report.scanned, report.scanned)

    # Their hold ends (as after 16 minutes): the next run removes them, sending none again.
    _hold_ends(queue.dlq_url)
    again = Redriver(ledger=ledger, audit=MemoryAuditSink()).run(
        _dead_letter_queue(queue), RedrivePlan(max_messages=LETTERS)
    )
    assert again.already_moved == report.moved
    assert again.moved == LETTERS - report.moved
    assert _counts(client, queue.source_url) == (LETTERS, 0), "each letter at its source once"
    assert _counts(client, queue.dlq_url) == (0, 0)


def _hold_ends(url: str) -> None:
    """Every letter of ``url`` visible again, as when the hold of the run that took it ended."""
    name = url.rpartition("/")[2]
    for message in sqs_backends[DEFAULT_ACCOUNT_ID][REGION].get_queue(name)._messages:
        message.change_visibility(0)


def test_one_slow_call_does_not_stop_a_run_that_holds_many_letters_with_its_time_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Calls of 20 ms and one of 5 s (an answer the SDK retried): the calls that would settle
    # 1,700 held letters (171) are priced at the median, not at the 5 s, so a receive begins in
    # a run with 800 s left. Priced at the slowest, they "needed" 855 s and the run stopped at
    # once, moving nothing of a filtered queue.
    clock = [1000.0]
    monkeypatch.setattr(sqs_dlq.time, "monotonic", lambda: clock[0])
    calls = sqs_dlq._Calls()
    calls.limit(800.0)
    for took in (0.02, 5.0, 0.02):
        begun = clock[0]
        clock[0] += took
        calls.took(begun)
    assert calls.fit(after=sqs_dlq._settling(1700) + 1)
    # Still no call begins that its own slowest estimate would take past the deadline.
    clock[0] += 796.0
    assert not calls.fit()
