"""Each environment lands in its region, prod is protected, and the runbook finds its outputs."""

from __future__ import annotations

from tests.infra.conftest import Assembly, Synthesized

REQUIRED_OUTPUTS = {
    "BrokerId",
    "BrokerAmqpEndpoint",
    "BrokerManagementUrl",
    "BrokerAdminSecretArn",
    "AuditBucketName",
    "ReportsBucketName",
    "AuditQueueUrl",
    "AuditDlqUrl",
    "SigningKeyArn",
    "MessagesKeyArn",
    "QueuesKeyArn",
    "TopicsKeyArn",
    "FallbackTopicArn",
    "EmergencyTopicArn",
    "FallbackGovernmentQueueUrl",
    "EmergencyMediaQueueUrl",
    "EmergencyMediaDlqUrl",
    "IngestCommunityQueueUrl",
    "IngestCommunityDlqUrl",
    "IdempotencyTableName",
    "TablesKeyArn",
}


def test_every_environment_is_synthesized_in_jakarta(assembly: Assembly) -> None:
    assert set(assembly.envs) == {"dev", "staging", "prod"}
    for env in assembly.envs.values():
        assert env.region == "ap-southeast-3"


def test_only_prod_has_termination_protection(assembly: Assembly) -> None:
    protected = {
        name for name, env in assembly.envs.items() if env.stage.stateful.termination_protection
    }
    assert protected == {"prod"}


def test_outputs_give_the_runbook_what_it_needs(env: Synthesized) -> None:
    assert set(env.json["Outputs"]) >= REQUIRED_OUTPUTS


def test_the_stateful_stack_stays_inside_cloudformations_output_limit(env: Synthesized) -> None:
    # CloudFormation allows at most 200 outputs per template.
    assert len(env.json["Outputs"]) <= 200
