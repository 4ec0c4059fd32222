"""The whole graph materialized by Dagster on a temporary DuckDB, checked against the reference.

The session's `sample_run` is the main job (`audiences run`) on the sample data in `data/`. Its
members must be exactly what the independent reference evaluator computes from the same users.
"""

from __future__ import annotations

import json
import shutil

import dagster as dg
import duckdb
import pytest

from audiences.conditions.reference import evaluate_audience
from audiences.definitions import evaluation_order, load_definitions
from condition_harness import copy_store, NOW, ROOT
from pipelines import build_definitions

pytestmark = pytest.mark.slow


def reference_members(connection) -> dict[str, set[str]]:
    users = [{"id": user_id, **json.loads(properties)} for user_id, properties in
             connection.execute("select user_id, properties from raw.users where deleted_at is null").fetchall()]
    definitions = load_definitions(ROOT / "data" / "audiences")
    members: dict[str, set[str]] = {}
    for key in evaluation_order(definitions):
        definition = definitions[key]
        if definition.type != "dynamic":
            # Static members come from data/syncs.yml (sources/vip_accounts.csv): identified users only.
            members[key] = {uid for (uid,) in connection.execute(
                "select distinct user_id from raw.static_audience_members where audience_key = $k "
                "and user_id in (select user_id from raw.users where deleted_at is null)", {"k": key}).fetchall()}
            continue
        members[key] = {
            user["id"] for user in users
            if evaluate_audience(definition.raw, user, now=NOW, is_member=lambda other, uid: uid in members[other])
        }
    return members


def compiled_members(connection) -> dict[str, set[str]]:
    rows = connection.execute(
        "select members.audience_key, users.user_id from main.audience_members as members "
        "join raw.users as users using (user_key)").fetchall()
    members: dict[str, set[str]] = {}
    for key, user_id in rows:
        members.setdefault(key, set()).add(user_id)
    return members


def test_sample_run_members_equal_the_reference_evaluator(sample_run):
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        expected = reference_members(connection)
        actual = compiled_members(connection)
    for key, ids in expected.items():
        assert actual.get(key, set()) == ids, key
    assert all(len(ids) > 0 for ids in expected.values())
    assert expected["vip-customers"] == {"user_00042", "user_00107", "user_00311"}
    # The hand-written SQL audience is evaluated beside the defined ones.
    assert set(actual) == {key for key, ids in expected.items() if ids} | {"high_value_accounts"}
    assert 0 < len(actual["high_value_accounts"]) < 2964


def test_sample_run_records_users_quarantine_and_evaluation_time(sample_run):
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        users, quarantined = connection.execute(
            "select (select count(*) from raw.users where deleted_at is null), (select count(*) from raw.users_quarantine)"
        ).fetchone()
        evaluations = connection.execute(
            "select audience_key, strftime(evaluated_at, '%Y-%m-%dT%H:%M:%SZ') from main.audience_evaluations").fetchall()
        registry = connection.execute("select count(*) from raw.audience_registry").fetchone()[0]
    assert (users, quarantined) == (2964, 26)
    assert len(evaluations) == 15 and {time for _, time in evaluations} == {"2026-11-01T00:00:00Z"}
    assert registry == 14


def test_reevaluation_moves_users_as_time_passes_and_reports_counts(sample_run, tmp_path, monkeypatch):
    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(sample_run, copy)
    copy_store(sample_run.parent / "store.sqlite", tmp_path / "store.sqlite")
    (tmp_path / "sinks.yml").write_text("default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n")
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    defs = build_definitions()
    later = "2026-11-27T00:00:00+00:00"
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("reevaluate_audiences").execute_in_process(
            run_config={"ops": {"audience_models": {"config": {"evaluation_time": later}}}},
            instance=instance,
        )
    assert result.success
    materializations = {
        event.asset_key.to_user_string(): event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events()
    }
    # The definitions did not change: the audience views were not rebuilt, their members were.
    assert "audiences/eu_customers" not in materializations
    observed = {
        event.asset_key.to_user_string(): event.event_specific_data.asset_observation.metadata
        for event in result.all_events if event.event_type_value == "ASSET_OBSERVATION"
    }
    assert observed["audiences/new_signups_this_week"]["member_count"].value == 0
    assert observed["audiences/eu_customers"]["member_count"].value > 0
    assert materializations["audience_members"]["member_counts"].value["eu_customers"] > 0
    checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert checks["every_audience_built"] is True
    assert checks["no_mass_membership_change"] is True
    # Time passing alone moves users: last week's sign-ups leave, and their exits are events.
    changes = materializations["membership_changes"]
    assert changes["exited"].value > 0
    assert "| new-signups-this-week | 0 | 80 |" in changes["changes_per_audience"].value
    assert materializations["published_membership_events"]["events_published"].value == (
        changes["entered"].value + changes["exited"].value)
    delivered = materializations["workflow_trigger_deliveries"]["delivered"].value
    lines = (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
    assert delivered == len(lines) > 0
    assert {json.loads(line)["data"]["event"] for line in lines} <= {"entered", "exited"}
    with duckdb.connect(str(copy), read_only=True) as connection:
        history = connection.execute(
            "select count(distinct evaluated_at), count(*) from main.audience_evaluations").fetchone()
        signups = connection.execute(
            "select member_count from main.audience_evaluations where audience_key = 'new-signups-this-week' "
            "order by evaluated_at").fetchall()
    assert history == (2, 30)
    assert signups[0][0] > 0 and signups[1][0] == 0


def test_uploads_dropped_in_the_folder_become_static_members_in_the_warehouse(sample_run, tmp_path, monkeypatch):
    shutil.copy(sample_run, tmp_path / "warehouse.duckdb")
    copy_store(sample_run.parent / "store.sqlite", tmp_path / "store.sqlite")
    shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    (tmp_path / "uploads" / "vip-customers").mkdir(parents=True)
    (tmp_path / "uploads" / "vip-customers" / "vips.csv").write_text(
        "id,tenant_id,tier\nuser_00042,acme,gold\nuser_00042,globex,gold\nbrand-new-user,,silver\n ,x,y\n")
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("AUDIENCES_DEFINITIONS", str(tmp_path / "audiences"))
    monkeypatch.setenv("AUDIENCES_USERS_SOURCE", str(ROOT / "data" / "sources" / "user_updates.parquet"))
    monkeypatch.setenv("AUDIENCES_SOURCE_MODE", "stream")
    with dg.DagsterInstance.ephemeral() as instance:
        result = build_definitions().resolve_job_def("audiences_job").execute_in_process(
            run_config={"ops": {"audience_models": {"config": {"evaluation_time": "2026-11-01T00:00:00+00:00"}}}},
            instance=instance)
    assert result.success
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        static = connection.execute("select user_id, tenant from audiences.vip_customers order by user_id, tenant").fetchall()
        new_user = connection.execute(
            "select properties ->> '$.tier' from raw.users where user_id = 'brand-new-user'").fetchall()
    # The upload's members beside the sample sync's (user_00042 under acme and globex is in both).
    assert static == [("brand-new-user", None), ("user_00042", "acme"), ("user_00042", "globex"),
                      ("user_00107", "acme"), ("user_00311", None)]
    assert new_user == [("silver",)]
    processed = sorted(p.name for p in (tmp_path / "uploads" / "vip-customers" / "processed").iterdir())
    assert len(processed) == 2 and any(name.endswith(".rejects.csv") for name in processed)
