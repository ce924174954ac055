"""The local fabric's own checks: strict template resolution and the copy comparison."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

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
