"""CloudFormation applies the topology again when its broker or a user's secret is replaced."""

from __future__ import annotations

from typing import Any

from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import of_type, services


def _stateful_refs(value: Any, stateful: dict[str, Any]) -> set[str]:
    """The stateful resources ``value`` refers to through the stateful stack's outputs."""
    if isinstance(value, dict):
        if "Fn::GetStackOutput" in value:
            output = stateful["Outputs"][value["Fn::GetStackOutput"]["OutputName"]]
            return {output["Value"]["Ref"]}
        return set().union(*(_stateful_refs(v, stateful) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_stateful_refs(v, stateful) for v in value))
    return set()


def test_a_replaced_broker_or_user_secret_makes_cloudformation_apply_the_topology_again(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (resource,) = of_type(template, "Custom::FabricTopology").values()
    properties = resource["Properties"]
    function_id = properties["ServiceToken"]["Fn::GetAtt"][0]
    environment = template["Resources"][function_id]["Properties"]["Environment"]["Variables"]
    stateful = env.json
    (broker_id,) = of_type(stateful, "AWS::AmazonMQ::Broker")
    secrets = of_type(stateful, "AWS::SecretsManager::Secret")
    (admin_id,) = (
        k for k, s in secrets.items() if "administrator" in s["Properties"]["Description"]
    )

    # The very values the function works with: what changes them updates the resource too.
    assert properties["ManagementUrl"] == environment["MANAGEMENT_URL"]
    assert properties["AdminSecretArn"] == environment["ADMIN_SECRET_ARN"]
    assert properties["UserSecretArns"] == environment["USER_SECRET_ARNS"]
    assert _stateful_refs(properties["ManagementUrl"], stateful) == {broker_id}
    assert _stateful_refs(properties["AdminSecretArn"], stateful) == {admin_id}
    assert _stateful_refs(properties["UserSecretArns"], stateful) == set(secrets) - {admin_id}
