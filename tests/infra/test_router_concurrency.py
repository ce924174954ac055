"""The router's reserved concurrency: the SQS ingest mappings together may take at most half of
it, so an ingest backlog leaves HTTPS and direct producers (their emergencies too) the rest."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from stacks.config import ConfigError, load_app_config, read_cdk_context
from tests.conftest import ROOT
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import CONTEXT, GROUPS, of_type, router, services


def _ingest_mappings(template: dict[str, Any]) -> list[dict[str, Any]]:
    router_id, _ = router(template)
    return [
        m["Properties"]
        for m in of_type(template, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": router_id}
    ]


def test_the_ingest_queues_leave_most_of_the_routers_concurrency_to_https_and_direct(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, function = router(template)
    reserved = function["Properties"]["ReservedConcurrentExecutions"]
    mappings = _ingest_mappings(template)
    assert len(mappings) == len(GROUPS)
    configured = CONTEXT[env.stage.stage_name]["router"]["ingest_max_concurrency"]
    caps = [m["ScalingConfig"]["MaximumConcurrency"] for m in mappings]
    # Lambda's least maximum concurrency is 2.
    assert caps == [configured] * len(GROUPS)
    assert min(caps) >= 2
    # The most the five mappings run at once: at most half, so HTTPS and direct keep the rest.
    assert 2 * sum(caps) <= reserved


@pytest.mark.parametrize(
    ("reserved", "per_queue", "message"),
    [
        # What dev had: 5 x 2 = 10, all of it.
        (10, 2, r"5 x ingest_max_concurrency 2 = 10 of the router's reserved_concurrency 10"),
        (49, 5, r"raise reserved_concurrency to at least 50 or lower ingest_max_concurrency"),
    ],
)
def test_a_router_whose_ingest_could_take_most_of_it_fails_the_synth_with_the_key_named(
    reserved: int, per_queue: int, message: str
) -> None:
    context = copy.deepcopy(read_cdk_context(ROOT))
    context["environments"]["dev"]["router"].update(
        reserved_concurrency=reserved, ingest_max_concurrency=per_queue
    )
    with pytest.raises(ConfigError, match=r"context\.environments\.dev\.router: ") as error:
        load_app_config(context)
    assert error.match(message)


def test_a_mapping_cannot_be_set_below_lambdas_least_maximum_concurrency() -> None:
    context = copy.deepcopy(read_cdk_context(ROOT))
    context["environments"]["prod"]["router"]["ingest_max_concurrency"] = 1
    with pytest.raises(ConfigError, match=r"prod\.router\.ingest_max_concurrency"):
        load_app_config(context)
