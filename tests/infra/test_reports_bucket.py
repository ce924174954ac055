"""The reports bucket: nobody deletes a compliance report, as nobody deletes from the audit
bucket (docs/infrastructure.md, "Reports bucket: the same protections, without Object Lock")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.infra.conftest import Assembly


def _reports(
    assembly: Assembly, env_name: str = "prod"
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """An environment's reports bucket: its logical id, properties and bucket policy
    statements."""
    env = assembly.envs[env_name]
    ((logical_id, bucket),) = (
        (logical_id, bucket)
        for logical_id, bucket in env.resources("AWS::S3::Bucket").items()
        if logical_id.startswith("AuditStorageReports")
    )
    (statements,) = (
        policy["Properties"]["PolicyDocument"]["Statement"]
        for policy in env.resources("AWS::S3::BucketPolicy").values()
        if policy["Properties"]["Bucket"] == {"Ref": logical_id}
    )
    return logical_id, bucket["Properties"], statements


@pytest.mark.parametrize("env_name", ["staging", "prod"])
@pytest.mark.parametrize("action", ["s3:DeleteObject", "s3:DeleteObjectVersion"])
def test_nobody_may_delete_a_compliance_report(
    assembly: Assembly, env_name: str, action: str
) -> None:
    # A plain DeleteObject on the versioned bucket hides a report behind a delete marker;
    # DeleteObjectVersion removes one without a trace.
    logical_id, _, statements = _reports(assembly, env_name)
    (deny,) = [s for s in statements if s["Action"] == action]
    assert deny["Effect"] == "Deny"
    assert deny["Principal"] == {"AWS": "*"}
    assert "Condition" not in deny  # whoever asks, over TLS or not
    assert deny["Resource"] == {"Fn::Join": ["", [{"Fn::GetAtt": [logical_id, "Arn"]}, "/*"]]}
    assert not [s for s in statements if s["Effect"] == "Allow"]


def test_nothing_expires_a_compliance_report(assembly: Assembly) -> None:
    # A lifecycle expiration is S3's own delete, which no bucket policy refuses.
    _, props, _ = _reports(assembly)
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    for rule in props.get("LifecycleConfiguration", {}).get("Rules", []):
        assert not {"ExpirationInDays", "ExpirationDate", "NoncurrentVersionExpiration"} & set(
            rule
        ), rule


def test_a_destroyed_environments_reports_bucket_can_be_emptied(assembly: Assembly) -> None:
    # Dev is destroyed with its stack, and CloudFormation deletes only an empty bucket: a deny
    # on deletes there would leave the stack's deletion failed with nobody able to empty it.
    _, _, statements = _reports(assembly, "dev")
    assert not [s for s in statements if "Delete" in str(s["Action"])]
