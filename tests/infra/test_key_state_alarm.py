"""A fabric key disabled, scheduled for deletion or given a new policy pages on-call: the rule
matches those calls on the fabric's own keys, its message says what happened and what to do,
and EventBridge may publish it to the encrypted on-call topic (for this rule only)."""

from __future__ import annotations

import copy
import re
from typing import Any

from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import render
from tests.infra.test_functions import of_type, services
from tests.infra.test_key_policies import _applies, _deny
from tests.infra.test_keys import _keys_by_alias

# The CloudTrail record of a DisableKey, as the KMS developer guide shows it (ct-disablekey),
# inside the envelope EventBridge puts around an "AWS API Call via CloudTrail" event.
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
CALLER = "arn:aws:sts::111111111111:assumed-role/Admin/alice"


def _event(key_arn: str, *, name: str = "DisableKey", **extra: Any) -> dict[str, Any]:
    return {
        "version": "0",
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws.kms",
        "resources": [],
        "detail": {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AssumedRole", "arn": CALLER},
            "eventTime": "2025-03-04T00:52:43Z",
            "eventSource": "kms.amazonaws.com",
            "eventName": name,
            "sourceIPAddress": "192.0.2.0",
            "userAgent": "aws-cli/2.15.0",
            "requestParameters": {"keyId": key_arn.rsplit("/", 1)[-1]},
            "responseElements": {"keyId": key_arn},
            "readOnly": False,
            "resources": [{"ARN": key_arn, "accountId": "111111111111", "type": "AWS::KMS::Key"}],
            "eventType": "AwsApiCall",
            **extra,
        },
    }


_ABSENT = object()


def _matches(pattern: Any, value: Any) -> bool:
    """EventBridge's matching, for what the rule uses: every field of the pattern must match;
    a list of values matches a field equal to (or, for an array, holding) one of them, or
    absent under ``{"exists": false}``; in an array of objects, any object may match."""
    if isinstance(pattern, dict):
        if isinstance(value, list):
            return any(_matches(pattern, item) for item in value)
        return isinstance(value, dict) and all(
            _matches(wanted, value.get(field, _ABSENT)) for field, wanted in pattern.items()
        )
    for wanted in pattern:
        if isinstance(wanted, dict):
            if wanted == {"exists": False} and value is _ABSENT:
                return True
        elif value == wanted or (isinstance(value, list) and wanted in value):
            return True
    return False


def _path(event: dict[str, Any], path: str) -> Any:
    """An input path such as ``$.detail.resources[0].ARN`` on ``event``."""
    value: Any = event
    for part in re.findall(r"[^.\[\]$]+|\[\d+\]", path):
        value = value[int(part[1:-1])] if part.startswith("[") else value[part]
    return value


def _rule(template: dict[str, Any], stage: str) -> tuple[str, dict[str, Any]]:
    ((logical_id, rule),) = [
        (k, r["Properties"])
        for k, r in of_type(template, "AWS::Events::Rule").items()
        if r["Properties"].get("Name") == f"fabric-{stage}-key-state"
    ]
    return logical_id, rule


def _key(reference: Any, stateful: dict[str, Any]) -> str:
    """The stateful stack's key (logical id) that a services-stack reference to its ARN names."""
    output = stateful["Outputs"][reference["Fn::GetStackOutput"]["OutputName"]]
    logical_id, attribute = output["Value"]["Fn::GetAtt"]
    assert attribute == "Arn"
    assert stateful["Resources"][logical_id]["Type"] == "AWS::KMS::Key"
    return str(logical_id)


def _stand_in(env: Synthesized, logical_id: str) -> str:
    return f"arn:aws:kms:{env.region}:{env.stage.stateful.account}:key/{logical_id}"


def _concrete(pattern: dict[str, Any], env: Synthesized) -> dict[str, Any]:
    """The rule's pattern with each fabric key's ARN as its stand-in."""
    concrete = copy.deepcopy(pattern)
    arns = concrete["detail"]["resources"]["ARN"]
    concrete["detail"]["resources"]["ARN"] = [_stand_in(env, _key(a, env.json)) for a in arns]
    return concrete


def test_the_rule_watches_the_calls_that_take_a_key_away_on_every_fabric_key(
    env: Synthesized, assembly: Assembly
) -> None:
    _, rule = _rule(services(env, assembly), env.stage.stage_name)
    pattern = rule["EventPattern"]
    assert pattern["source"] == ["aws.kms"]
    assert pattern["detail-type"] == ["AWS API Call via CloudTrail"]
    detail = pattern["detail"]
    assert detail["eventSource"] == ["kms.amazonaws.com"]
    assert sorted(detail["eventName"]) == ["DisableKey", "PutKeyPolicy", "ScheduleKeyDeletion"]
    # Calls that KMS refused changed nothing.
    assert detail["errorCode"] == [{"exists": False}]
    # Every key of the stateful stack, signing keys (current and retired) included, by the ARN
    # KMS resolves (detail.resources[].ARN), whatever id or ARN the caller gave.
    watched = [_key(arn, env.json) for arn in detail["resources"]["ARN"]]
    assert sorted(watched) == sorted(env.resources("AWS::KMS::Key"))


def test_only_a_successful_call_that_takes_a_fabric_key_away_matches(
    env: Synthesized, assembly: Assembly
) -> None:
    _, rule = _rule(services(env, assembly), env.stage.stage_name)
    pattern = _concrete(rule["EventPattern"], env)
    for logical_id in env.resources("AWS::KMS::Key"):
        key = _stand_in(env, logical_id)
        for name in ("DisableKey", "ScheduleKeyDeletion", "PutKeyPolicy"):
            assert _matches(pattern, _event(key, name=name)), (logical_id, name)
        for name in ("EnableKey", "CancelKeyDeletion", "DisableKeyRotation", "Decrypt"):
            assert not _matches(pattern, _event(key, name=name)), (logical_id, name)
        refused = _event(key, errorCode="AccessDeniedException", errorMessage="not authorized")
        assert not _matches(pattern, refused), logical_id
    other = f"arn:aws:kms:{env.region}:{env.stage.stateful.account}:key/{KEY_ID}"
    assert not _matches(pattern, _event(other))


def test_the_message_names_the_key_the_call_the_caller_and_the_runbook(
    env: Synthesized, assembly: Assembly
) -> None:
    _, rule = _rule(services(env, assembly), env.stage.stage_name)
    (target,) = rule["Targets"]
    transformer = target["InputTransformer"]
    (queues,) = [k for k in env.resources("AWS::KMS::Key") if k.startswith("KeysQueues")]
    event = _event(_stand_in(env, queues), name="ScheduleKeyDeletion")
    message = transformer["InputTemplate"]
    for name, path in transformer["InputPathsMap"].items():
        message = message.replace(f"<{name}>", str(_path(event, path)))
    assert "<" not in message, message
    assert f"Messaging Fabric {env.stage.stage_name}" in message
    assert "ScheduleKeyDeletion" in message
    assert _stand_in(env, queues) in message
    assert CALLER in message
    assert "docs/runbook.md, 'When a fabric key changes'" in message


def test_eventbridge_may_publish_to_the_encrypted_on_call_topic_for_this_rule_only(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    stage = env.stage.stage_name
    _, rule = _rule(template, stage)
    rule_arn = f"arn:aws:events:{env.region}:{env.stage.services.account}:rule/{rule['Name']}"
    ((topic_id, topic),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{stage}-alarms"
    ]
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": topic_id}
    assert "RoleArn" not in target  # EventBridge publishes in its own name (topic policy)
    # The topic is encrypted with the topics key ...
    topics_key = _key(topic["Properties"]["KmsMasterKeyId"], env.json)
    assert env.json["Resources"][topics_key] == _keys_by_alias(env)["topics"]
    # ... its policy admits EventBridge for this rule only ...
    (policy,) = [
        p
        for p in of_type(template, "AWS::SNS::TopicPolicy").values()
        if p["Properties"]["Topics"] == [{"Ref": topic_id}]
    ]
    (publish,) = [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s.get("Principal") == {"Service": "events.amazonaws.com"}
    ]
    assert (publish["Effect"], publish["Action"]) == ("Allow", "sns:Publish")
    assert publish["Resource"] == {"Ref": topic_id}
    assert publish["Condition"] == {"ArnEquals": {"aws:SourceArn": rule_arn}}
    # ... and so does the topics key's policy, whose deny of use outside SNS lets it through.
    (grant,) = [
        s
        for s in _keys_by_alias(env)["topics"]["Properties"]["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "events.amazonaws.com"}
    ]
    assert grant["Effect"] == "Allow"
    assert grant["Action"] == ["kms:Decrypt", "kms:GenerateDataKey*"]
    assert list(grant["Condition"]) == ["ArnEquals"]
    assert render(grant["Condition"]["ArnEquals"]["aws:SourceArn"]) == rule_arn
    deny = _deny(env, "topics")
    for action in ("kms:Decrypt", "kms:GenerateDataKey"):
        assert not _applies(deny, action, {"aws:PrincipalServiceName": "events.amazonaws.com"})
