"""The trail reader's AWS clients (replay, compliance report) give up inside their functions'
margins: one call that never answers costs at most its attempts' read timeouts."""

from __future__ import annotations

from fabric.bootstrap import _reader_client
from fabric.compliance_run import ANSWER_MARGIN_S


def test_a_call_that_never_answers_gives_up_within_the_replays_and_the_reports_margin() -> None:
    config = _reader_client("s3").meta.config
    attempts = config.retries["total_max_attempts"]
    worst = attempts * (config.connect_timeout + config.read_timeout)
    # The replay keeps 120 s of its 900 s timeout (REPLAY_MAX_SECONDS 780), as the report keeps
    # ANSWER_MARGIN_S; a call that never answers must give up well within it. Before: 30 s
    # reads, 6 attempts, 181 s measured.
    assert worst <= 60 < ANSWER_MARGIN_S
