"""One rotated customer key per purpose, an asymmetric signing key, and narrow key policies."""

from __future__ import annotations

from typing import Any

from tests.infra.conftest import Assembly, Synthesized

PURPOSES = ("messages", "topics", "queues", "audit", "secrets", "tables", "logs")


def _keys_by_alias(env: Synthesized) -> dict[str, dict[str, Any]]:
    keys = env.resources("AWS::KMS::Key")
    result = {}
    for alias in env.resources("AWS::KMS::Alias").values():
        name = alias["Properties"]["AliasName"]
        target = alias["Properties"]["TargetKeyId"]["Fn::GetAtt"][0]
        result[name.rsplit("/", 1)[-1]] = keys[target]
    return result


def test_every_purpose_has_its_own_rotated_symmetric_key(env: Synthesized) -> None:
    keys = _keys_by_alias(env)
    name = env.stage.stage_name
    assert set(keys) == {*PURPOSES, "audit-signing"}
    for purpose in PURPOSES:
        props = keys[purpose]["Properties"]
        assert props["EnableKeyRotation"] is True, purpose
        assert props.get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT"
    aliases = {a["Properties"]["AliasName"] for a in env.resources("AWS::KMS::Alias").values()}
    assert f"alias/fabric/{name}/messages" in aliases


def test_audit_checkpoints_are_signed_by_an_asymmetric_key(env: Synthesized) -> None:
    props = _keys_by_alias(env)["audit-signing"]["Properties"]
    assert props["KeySpec"] == "ECC_NIST_P256"
    assert props["KeyUsage"] == "SIGN_VERIFY"


def test_keys_that_protect_the_audit_trail_outlive_the_stack_even_in_dev(
    assembly: Assembly,
) -> None:
    for env in assembly.envs.values():
        keys = _keys_by_alias(env)
        for purpose in ("audit", "audit-signing"):
            assert keys[purpose]["DeletionPolicy"] == "Retain", (env.stage.stage_name, purpose)
    dev_keys = _keys_by_alias(assembly.envs["dev"])
    assert dev_keys["messages"]["DeletionPolicy"] == "Delete"
    assert _keys_by_alias(assembly.envs["prod"])["messages"]["DeletionPolicy"] == "Retain"


def test_topics_and_queues_use_different_keys(env: Synthesized) -> None:
    topic_keys = {
        t["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]
        for t in env.resources("AWS::SNS::Topic").values()
    }
    queue_keys = {
        q["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]
        for q in env.resources("AWS::SQS::Queue").values()
    }
    assert len(topic_keys) == 1
    assert len(queue_keys) == 1
    assert topic_keys.isdisjoint(queue_keys)


def test_key_policies_grant_services_only_what_they_use(env: Synthesized) -> None:
    """Only the account root holds kms:*; services get named actions under conditions.

    Denies give nothing: tests/infra/test_key_policies.py checks them.
    """
    for logical_id, key in env.resources("AWS::KMS::Key").items():
        for statement in key["Properties"]["KeyPolicy"]["Statement"]:
            if statement["Effect"] == "Deny":
                continue
            principal = statement["Principal"]
            actions = (
                statement["Action"]
                if isinstance(statement["Action"], list)
                else [statement["Action"]]
            )
            if "Service" in principal:
                assert "kms:*" not in actions, logical_id
                assert "Condition" in statement, (logical_id, statement)
            else:
                assert set(principal) == {"AWS"}, (logical_id, statement)
                assert ":root" in str(principal["AWS"]), (logical_id, statement)
