"""The idempotency table: Powertools' schema, encrypted with its own key, recoverable, protected."""

from __future__ import annotations

from typing import Any

import pytest

from tests.infra.conftest import Assembly, Synthesized


def _table(env: Synthesized) -> tuple[str, dict[str, Any]]:
    ((logical_id, table),) = env.resources("AWS::DynamoDB::Table").items()
    return logical_id, table


def test_the_table_has_the_schema_powertools_idempotency_uses(env: Synthesized) -> None:
    _, table = _table(env)
    props = table["Properties"]
    assert props["TableName"] == f"fabric-{env.stage.stage_name}-idempotency"
    assert props["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert props["AttributeDefinitions"] == [{"AttributeName": "id", "AttributeType": "S"}]
    # Records delete themselves when Powertools' expiry (epoch seconds) passes.
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    assert props["BillingMode"] == "PAY_PER_REQUEST"


def test_the_table_is_encrypted_with_the_tables_key_and_recoverable(env: Synthesized) -> None:
    _, table = _table(env)
    props = table["Properties"]
    sse = props["SSESpecification"]
    assert sse["SSEEnabled"] is True
    assert sse["SSEType"] == "KMS"
    key_id = sse["KMSMasterKeyId"]["Fn::GetAtt"][0]
    aliases = {
        a["Properties"]["TargetKeyId"]["Fn::GetAtt"][0]: a["Properties"]["AliasName"]
        for a in env.resources("AWS::KMS::Alias").values()
    }
    assert aliases[key_id] == f"alias/fabric/{env.stage.stage_name}/tables"
    spec = props["PointInTimeRecoverySpecification"]
    assert spec["PointInTimeRecoveryEnabled"] is True


@pytest.mark.parametrize(
    ("name", "protected", "policy"),
    [("dev", False, "Delete"), ("staging", True, "Retain"), ("prod", True, "Retain")],
)
def test_retained_environments_protect_the_table_from_deletion(
    assembly: Assembly, name: str, protected: bool, policy: str
) -> None:
    _, table = _table(assembly.envs[name])
    assert table["Properties"].get("DeletionProtectionEnabled", False) is protected
    assert table["DeletionPolicy"] == policy
    assert table["UpdateReplacePolicy"] == policy


def test_the_runbook_finds_the_table_by_its_output(env: Synthesized) -> None:
    logical_id, _ = _table(env)
    output = env.json["Outputs"]["IdempotencyTableName"]
    assert output["Value"] == {"Ref": logical_id}
