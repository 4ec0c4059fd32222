"""The Dagster code location loads, with the asset graph we expect (a snapshot, so changes show)."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from pipelines import build_definitions

EXPECTED_ASSET_KEYS = [
    "audience_catalog",
    "audience_definitions",
    "audience_evaluations",
    "audience_members",
    "audiences/beta_invite_candidates",
    "audiences/beta_testers",
    "audiences/churn_risk",
    "audiences/dormant_free_users",
    "audiences/enterprise_admins",
    "audiences/eu_customers",
    "audiences/frequent_buyers",
    "audiences/high_value_accounts",
    "audiences/new_signups_this_week",
    "audiences/nps_promoters",
    "audiences/onboarding_incomplete",
    "audiences/power_users",
    "audiences/product_survey_sample",
    "audiences/recent_big_spenders",
    "audiences/signed_up_no_order",
    "audiences/trial_ending_soon",
    "audiences/trial_expired_unconverted",
    "audiences/vip_customers",
    "audiences/workspace_admins_trial_ending",
    "event_sources/segment_tracks",
    "events",
    "int_event_state",
    "int_event_users_to_reevaluate",
    "int_users_flattened",
    "int_users_to_reevaluate",
    "membership_changes",
    # Every environment is served (issue 15); nothing is promoted to production in the sample, so
    # production is this one asset, whose description says how to promote.
    "production/audience_definitions",
    "published_membership_events",
    "sources/crm_export",
    "sources/product_updates",
    "sources/workspace_members",
    "sources/workspaces",
    "static_audience_members",
    "static_audience_syncs",
    "static_audience_uploads",
    "stg_warehouse__tenant_memberships",
    "stg_warehouse__tenants",
    "stg_warehouse__users",
    "tenant_memberships",
    "tenants",
    "users",
    "workflow_trigger_deliveries",
]


def test_definitions_load_with_the_expected_asset_graph():
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assert sorted(key.to_user_string() for key in graph.get_all_asset_keys()) == EXPECTED_ASSET_KEYS
    assert (
        dg.AssetKey("audience_definitions")
        in graph.get(dg.AssetKey(["audiences", "power_users"])).parent_keys
    )
    assert (
        dg.AssetKey(["audiences", "power_users"])
        in graph.get(dg.AssetKey(["audiences", "beta_invite_candidates"])).parent_keys
    )
    # Event audiences read the events the `events` asset loads from the declared event sources.
    assert graph.get(dg.AssetKey("events")).parent_keys == {
        dg.AssetKey(["event_sources", "segment_tracks"])
    }
    assert (
        dg.AssetKey("events")
        in graph.get(dg.AssetKey(["audiences", "frequent_buyers"])).parent_keys
    )
    assert graph.get(dg.AssetKey("users")).parent_keys == {
        dg.AssetKey(["sources", "crm_export"]),
        dg.AssetKey(["sources", "product_updates"]),
        dg.AssetKey(["sources", "workspaces"]),
        dg.AssetKey(["sources", "workspace_members"]),
        dg.AssetKey("static_audience_uploads"),
    }


def test_every_asset_has_a_description():
    graph = build_definitions().resolve_asset_graph()
    undocumented = [
        key.to_user_string() for key in graph.get_all_asset_keys() if not graph.get(key).description
    ]
    assert undocumented == []


def test_checks_cover_unique_users_and_every_audience_built():
    defs = build_definitions()
    check_names = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert {"users_have_unique_ids", "every_audience_built"} <= check_names
    assert any(name.startswith("unique_stg_warehouse__users_user_id") for name in check_names)


def test_schedule_reevaluates_at_the_tick_time():
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("reevaluate_every_15_minutes")
    tick = datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    request = schedule.evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=tick)
    ).run_requests[0]
    # The tick's time, and the identify calls queued since the last run loaded first (not the sources).
    assert request.run_config == {
        "ops": {
            "audience_models": {"config": {"evaluation_time": tick.isoformat()}},
            "users": {"config": {"load_sources": False}},
        }
    }
    assert schedule.cron_schedule == "*/15 * * * *"
    assert "users" in {
        key.to_user_string()
        for key in defs.resolve_job_def("reevaluate_audiences").asset_layer.selected_asset_keys
    }


def test_delivery_runs_only_when_deliveries_are_due():
    defs = build_definitions()
    assert [schedule.name for schedule in defs.schedules] == ["reevaluate_every_15_minutes"]
    sensor = defs.resolve_sensor_def("deliveries_due")
    assert sensor.job_name == "deliver_workflow_triggers"
    assert defs.resolve_job_def("deliver_workflow_triggers").asset_layer.selected_asset_keys == {
        dg.AssetKey("workflow_trigger_deliveries")
    }


def test_jobs_that_write_duckdb_run_one_step_at_a_time_and_are_serialized():
    defs = build_definitions()
    for name in ("audiences_job", "reevaluate_audiences"):
        job = defs.resolve_job_def(name)
        # Dagster's default executor would run users, uploads and syncs in parallel processes,
        # and DuckDB allows one writer (seen under `dg dev`: "Could not set lock on file").
        assert job.executor_def.name == "in_process"
        assert job.tags.get("audiences/duckdb") == "writer"
    # So do assets materialized from the UI's asset graph, outside any job.
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "in_process"


def test_the_spark_engine_adds_the_spark_job_and_a_bad_engine_is_named(monkeypatch):
    """AUDIENCES_ENGINE=spark: the Spark assets and `spark_audiences_job` (evaluate on Spark,
    record and publish, deliver), serialized with the warehouse's other writers; the DuckDB jobs
    do not run the Spark assets. The default engine has none of them (EXPECTED_ASSET_KEYS); the
    run itself: tests/audiences/dbt/test_spark_models.py."""
    import pytest

    spark_keys = {
        dg.AssetKey(["spark", "audience_members"]),
        dg.AssetKey(["spark", "membership_events"]),
    }
    monkeypatch.setenv("AUDIENCES_ENGINE", "spark")
    defs = build_definitions()
    job = defs.resolve_job_def("spark_audiences_job")
    assert job.asset_layer.selected_asset_keys == spark_keys | {
        dg.AssetKey("workflow_trigger_deliveries")
    }
    assert job.executor_def.name == "in_process"
    assert job.tags.get("audiences/duckdb") == "writer"
    main = defs.resolve_job_def("audiences_job").asset_layer.selected_asset_keys
    assert not main & spark_keys
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey(["spark", "membership_events"])).parent_keys == {
        dg.AssetKey(["spark", "audience_members"])
    }

    # A schedule starts the Spark job every 15 minutes at the tick's time, in place of DuckDB's
    # re-evaluation (both would record events in the same DuckDB warehouse); the run config it
    # gives is one the job accepts.
    assert [schedule.name for schedule in defs.schedules] == ["spark_reevaluate_every_15_minutes"]
    schedule = defs.resolve_schedule_def("spark_reevaluate_every_15_minutes")
    assert schedule.job_name == "spark_audiences_job"
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    request = schedule.evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=tick)
    ).run_requests[0]
    assert request.run_key == tick.isoformat()
    assert request.run_config == {
        "ops": {"spark__audience_members": {"config": {"evaluation_time": tick.isoformat()}}}
    }
    assert dg.validate_run_config(job, request.run_config)

    monkeypatch.setenv("AUDIENCES_ENGINE", "Spark-SQL")
    with pytest.raises(
        ValueError, match="AUDIENCES_ENGINE='spark-sql' is not one of duckdb, spark"
    ):
        build_definitions()


def test_the_dbt_resource_knows_the_version_of_the_dbt_it_runs_without_asking_it():
    import subprocess

    from dagster_dbt import DbtCliResource

    from audiences.dbt.project import dbt_executable
    from pipelines.defs.resources import DbtResource

    # It replaces two steps of dagster-dbt's resource; if an upgrade renames them, this says so.
    assert callable(DbtCliResource._initialize_dbt_core_adapter)
    assert isinstance(
        DbtCliResource.__dict__["_cli_version"], type(DbtResource.__dict__["_cli_version"])
    )
    from condition_harness import ROOT

    resource = DbtResource(project_dir=str(ROOT / "dbt_project"), dbt_executable=dbt_executable())
    reported = subprocess.run(
        [dbt_executable(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"installed: {resource._cli_version}" in reported
    assert resource._initialize_dbt_core_adapter(["build"]) is None
