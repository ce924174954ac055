"""The local fabric's own checks: strict template resolution, the copy comparison and the
broker metrics depths."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fabric.adapters.broker_metrics import EmfDepthMetrics
from fabric.broker_depth import DepthReport
from scripts import local_fabric

TEMPLATES: dict[str, dict[str, Any]] = {
    "Stateful": {
        "Outputs": {
            "KeyArn": {"Value": {"Fn::GetAtt": ["Key", "Arn"]}},
            "BrokerId": {"Value": {"Ref": "Broker"}},
        }
    },
    "Services": {
        "Resources": {
            "Fn": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Description": "routes",
                    "Environment": {
                        "Variables": {
                            "KEY": {"Fn::GetStackOutput": {"OutputName": "KeyArn"}},
                            "HOST": {
                                "Fn::Join": [
                                    "",
                                    [
                                        {"Fn::GetStackOutput": {"OutputName": "BrokerId"}},
                                        ".mq.",
                                        {"Ref": "AWS::Region"},
                                    ],
                                ]
                            },
                        }
                    },
                },
            }
        }
    },
}


def test_a_reference_without_a_local_stand_in_fails_instead_of_becoming_text() -> None:
    resolver = local_fabric.Resolver(TEMPLATES, {"Key.Arn": "arn:key"})

    with pytest.raises(LookupError, match="Broker has no local stand-in"):
        local_fabric.local_environment(TEMPLATES, resolver, "routes")


def test_only_the_overridden_variables_skip_resolution() -> None:
    resolver = local_fabric.Resolver(TEMPLATES, {"Key.Arn": "arn:key"})

    environment = local_fabric.local_environment(
        TEMPLATES, resolver, "routes", {"HOST": "127.0.0.1"}
    )

    assert environment == {"KEY": "arn:key", "HOST": "127.0.0.1"}


def test_an_override_of_a_variable_the_template_does_not_set_fails() -> None:
    resolver = local_fabric.Resolver(TEMPLATES, {"Key.Arn": "arn:key", "Broker": "b-1"})

    with pytest.raises(LookupError, match="RABBITMQ_TLS"):
        local_fabric.local_environment(TEMPLATES, resolver, "routes", {"RABBITMQ_TLS": "false"})


def test_a_join_of_outputs_and_pseudo_parameters_resolves() -> None:
    resolver = local_fabric.Resolver(TEMPLATES, {"Key.Arn": "arn:key", "Broker": "b-1"})

    environment = local_fabric.local_environment(TEMPLATES, resolver, "routes")

    assert environment["HOST"] == "b-1.mq.ap-southeast-3"


def _compare(arrived: Counter[tuple[str, str]], **kwargs: Any) -> list[str]:
    checks = local_fabric.Checks()
    expected = {"m1": {"q.a", "q.b"}, "m2": {"q.a"}}
    local_fabric.compare_copies("act", expected, arrived, checks, **kwargs)
    return checks.failures


def test_every_routed_copy_exactly_once_passes() -> None:
    assert _compare(Counter({("m1", "q.a"): 1, ("m1", "q.b"): 1, ("m2", "q.a"): 1})) == []


def test_a_lost_a_misrouted_and_a_repeated_copy_each_fail() -> None:
    failures = _compare(Counter({("m1", "q.a"): 2, ("m2", "q.a"): 1, ("m2", "q.b"): 1}))

    assert failures == [
        "act: 1 routed copies lost: [('m1', 'q.b')]",
        "act: 1 copies in a queue they were not routed to: [('m2', 'q.b')]",
        "act: 1 copies arrived more than once: [('m1', 'q.a')]",
    ]


def test_only_a_message_that_may_repeat_may_arrive_twice() -> None:
    arrived = Counter({("m1", "q.a"): 2, ("m1", "q.b"): 1, ("m2", "q.a"): 2})

    assert _compare(arrived, may_repeat=frozenset({"m1"})) == [
        "act: 1 copies arrived more than once: [('m2', 'q.a')]"
    ]


DLQ = "fabric.community.emergency.dlq"
MEASURED = ["fabric.government.dlq", DLQ, "fabric.overflow"]


class _BrokerMetricsHandler:
    """The broker metrics function's handler as the act invokes it: each run writes the EMF
    lines of the next report (the last one again once they run out)."""

    def __init__(self, *reports: DepthReport) -> None:
        self._reports = list(reports)
        self.runs = 0

    def handler(self, _event: Any, _context: Any) -> dict[str, Any]:
        report = self._reports[min(self.runs, len(self._reports) - 1)]
        self.runs += 1
        EmfDepthMetrics(environment="dev").publish(report)  # on stdout, as in Lambda
        return {}


def _measure(handler: _BrokerMetricsHandler, left: dict[str, int], **kwargs: Any) -> list[str]:
    checks = local_fabric.Checks()
    local_fabric.measure_depths(handler, MEASURED, left, checks, **kwargs)
    return checks.failures


def test_the_depth_the_act_left_in_the_dlq_is_reported_from_the_emf_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parked = DepthReport({"fabric.government.dlq": 0, DLQ: 1, "fabric.overflow": 0})

    assert _measure(_BrokerMetricsHandler(parked), {DLQ: 1}) == []
    assert capsys.readouterr().out == (
        "   broker metrics (EMF lines of the last of 1 run(s)): fabric.community.emergency.dlq 1,"
        " other DLQs 0, fabric.overflow 0, unmeasured 0\n"
    )


def test_a_stale_reading_is_measured_again_until_the_statistics_catch_up() -> None:
    stale = DepthReport({"fabric.government.dlq": 0, DLQ: 0, "fabric.overflow": 0})
    parked = DepthReport({"fabric.government.dlq": 0, DLQ: 1, "fabric.overflow": 0})
    handler = _BrokerMetricsHandler(stale, stale, parked)

    assert _measure(handler, {DLQ: 1}, interval=0) == []
    assert handler.runs == 3


def test_a_depth_other_than_the_act_left_fails_the_act() -> None:
    elsewhere = DepthReport({"fabric.government.dlq": 1, DLQ: 0, "fabric.overflow": 0})

    assert _measure(_BrokerMetricsHandler(elsewhere), {DLQ: 1}, patience=0) == [
        "broker metrics: (measured, left by the act) {'fabric.government.dlq': (1, 0),"
        " 'fabric.community.emergency.dlq': (0, 1)}, 0 queue(s) unmeasured"
    ]


def test_a_queue_the_function_could_not_measure_fails_the_act() -> None:
    missing = DepthReport({DLQ: 0, "fabric.overflow": 0}, missing=("fabric.government.dlq",))

    assert _measure(_BrokerMetricsHandler(missing), {DLQ: 0}, patience=0) == [
        "broker metrics: (measured, left by the act) {'fabric.government.dlq': (None, 0)},"
        " 1 queue(s) unmeasured"
    ]


def test_a_dlq_the_function_does_not_measure_fails_the_act() -> None:
    # The act parked its alert in a DLQ the function's BROKER_DEPTH_QUEUES lacks: that DLQ's
    # alarm is blind, whatever the other depths say.
    measured = DepthReport({"fabric.government.dlq": 0, DLQ: 0, "fabric.overflow": 0})
    left = {"fabric.media.dlq": 1}

    assert _measure(_BrokerMetricsHandler(measured), left, patience=0) == [
        "broker metrics: the function does not measure ['fabric.media.dlq']"
    ]
