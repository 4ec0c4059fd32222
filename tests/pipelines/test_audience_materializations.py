"""What the Dagster UI shows of audiences: every audience asset materialized by each run with its
members, who entered and who exited (numeric, so the asset's Plots tab draws them over time), the
membership-changes table, and the held-batch check telling a person what to run."""

from __future__ import annotations

from datetime import datetime

import dagster as dg
import duckdb
import pytest
from condition_harness import copy_sample_run

from pipelines import build_definitions

pytestmark = pytest.mark.slow

LATER = "2026-11-27T00:00:00+00:00"


def test_a_reevaluation_materializes_every_audience_with_its_members_and_holds_a_mass_exit(
    sample_run, tmp_path, monkeypatch
):
    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    # When "now" moves 26 days, 431 users enter churn-risk (338 members): over a breaker of 400 users.
    monkeypatch.setenv("AUDIENCES_BREAKER_MINIMUM", "400")
    with dg.DagsterInstance.ephemeral() as instance:
        result = (
            build_definitions()
            .resolve_job_def("reevaluate_audiences")
            .execute_in_process(
                run_config={"ops": {"audience_models": {"config": {"evaluation_time": LATER}}}},
                instance=instance,
            )
        )
        assert result.success
        latest_eu = instance.get_latest_materialization_event(
            dg.AssetKey(["audiences", "eu_customers"])
        )
    with duckdb.connect(str(copy), read_only=True) as connection:
        members = dict(
            connection.execute(
                "select catalog.model_name, evaluations.member_count from main.audience_evaluations as evaluations "
                "join main.audience_catalog as catalog using (audience_key) where evaluated_at = $t",
                {"t": datetime.fromisoformat(LATER)},
            ).fetchall()
        )
        keys = dict(
            connection.execute(
                "select model_name, audience_key from main.audience_catalog"
            ).fetchall()
        )
        types = dict(
            connection.execute(
                "select audience_key, audience_type from main.audience_catalog"
            ).fetchall()
        )
        moved = {
            (key, event): count
            for key, event, count in connection.execute(
                "select audience_key, event_type, count(*) from raw.membership_outbox where occurred_at = $t group by all",
                {"t": datetime.fromisoformat(LATER)},
            ).fetchall()
        }
        [(batch, held_key)] = connection.execute(
            "select batch_id, audience_key from raw.membership_batches"
        ).fetchall()

    materialized = {}
    for event in result.get_asset_materialization_events():
        key = event.asset_key
        assert key not in materialized, f"{key.to_user_string()} materialized twice in one run"
        materialized[key] = event.step_materialization_data.materialization.metadata
    observed = [
        event for event in result.all_events if event.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observed == []
    assert (
        len(members) == 19
    )  # 18 definitions (3 of them event audiences, 1 per tenant) and the custom SQL audience
    for model, member_count in members.items():
        metadata = materialized[dg.AssetKey(["audiences", model])]
        assert isinstance(metadata["member_count"], dg.IntMetadataValue), model
        assert metadata["member_count"].value == member_count, model
        if types[keys[model]] == "static":
            continue
        assert isinstance(metadata["entered"], dg.IntMetadataValue) and isinstance(
            metadata["exited"], dg.IntMetadataValue
        )
        assert (metadata["entered"].value, metadata["exited"].value) == (
            moved.get((keys[model], "entered"), 0),
            moved.get((keys[model], "exited"), 0),
        ), model
    signups = materialized[dg.AssetKey(["audiences", "new_signups_this_week"])]
    assert (signups["member_count"].value, signups["entered"].value, signups["exited"].value) == (
        0,
        0,
        80,
    )
    assert (
        materialized[dg.AssetKey(["audiences", "eu_customers"])]["member_count"].value
        == members["eu_customers"]
        > 0
    )
    # The instance knows the audience as materialized (the UI's "Never materialized" was this).
    assert (
        latest_eu is not None
        and latest_eu.asset_materialization.metadata["member_count"].value
        == members["eu_customers"]
    )

    # Members before: an audience nobody entered or left had its members before, not 0.
    table = materialized[dg.AssetKey("membership_changes")]["changes_per_audience"].value
    assert f"| eu-customers | 0 | 0 | {members['eu_customers']} |" in table
    assert "| new-signups-this-week | 0 | 80 | 80 |  |" in table
    assert f"| churn-risk | 431 | 0 | 338 | held: {batch} |" in table
    assert held_key == "churn-risk"

    # The failed check names the batch and the commands that release or discard it.
    [check] = [
        evaluation
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.check_name == "no_mass_membership_change"
    ]
    assert check.passed is False
    assert check.metadata["held_batches"].value == [batch]
    instructions = check.metadata["to_release"].value
    assert (
        f"audiences release {batch}" in instructions
        and f"audiences discard {batch}" in instructions
    )
    assert "<batch>" not in instructions


def test_the_first_run_materializes_every_audience_with_its_first_members_as_entered(
    sample_run, monkeypatch
):
    """`audiences run` with DAGSTER_HOME set (the sample run): a full dbt build, whose audience
    views dbt rebuilt, is what the UI shows for each audience: a materialization with its members."""
    monkeypatch.setenv("DAGSTER_HOME", str(sample_run.parent / "dagster_home"))
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        audiences = connection.execute(
            "select catalog.model_name, catalog.audience_type, evaluations.member_count "
            "from main.audience_evaluations as evaluations join main.audience_catalog as catalog using (audience_key)"
        ).fetchall()
    assert len(audiences) == 19
    with dg.DagsterInstance.get() as instance:
        for model, audience_type, member_count in audiences:
            event = instance.get_latest_materialization_event(dg.AssetKey(["audiences", model]))
            assert event is not None, model
            metadata = event.asset_materialization.metadata
            assert metadata["member_count"] == dg.IntMetadataValue(member_count), model
            assert metadata["status"].value == "success"  # dbt built the view in this run
            if audience_type != "static":  # a first evaluation: every member entered
                assert (metadata["entered"], metadata["exited"]) == (
                    dg.IntMetadataValue(member_count),
                    dg.IntMetadataValue(0),
                ), model
